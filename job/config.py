"""The job's whole configuration: one typed, frozen object read from the environment in one place.

Every field of `Config` is one environment variable (its name in upper case), with its default,
its help line and its check. `.env.example`, `python -m job config` and the README table are
generated from this definition, so this file is the single source of truth.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

SECRET_MARK = "***"
# Matched with fullmatch: `$` also matches before a trailing newline, which a ConfigMap block scalar adds.
RUN_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
HUB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")

# Variables that other libraries read themselves (boto3, huggingface_hub, torchrun, the shell).
# They are documented here so that `.env.example` and the near-miss check know them.
FOREIGN_VARIABLES = {
    "AWS_ACCESS_KEY_ID": "S3 access key (read by boto3)",
    "AWS_SECRET_ACCESS_KEY": "S3 secret key (read by boto3)",
    "AWS_SESSION_TOKEN": "S3 session token, if any (read by boto3)",
    "AWS_DEFAULT_REGION": "S3 region, e.g. us-east-1 (read by boto3)",
    "AWS_ENDPOINT_URL_S3": "S3-compatible endpoint for MinIO, R2, ... (read by boto3); empty = AWS",
    "HF_ENDPOINT": "Hugging Face Hub endpoint (read by huggingface_hub); empty = huggingface.co",
    "HF_HOME": "cache of Hub models and datasets (read by huggingface_hub)",
}


class ExitCode(enum.IntEnum):
    """What the job's exit status tells the orchestrator (DESIGN.md; k8s/job.yaml's podFailurePolicy)."""
    DONE = 0         # done, also "already done"
    FAILED = 1       # anything else
    BAD_INPUT = 2    # bad configuration or input: a retry cannot fix it
    STOPPED = 75     # stopped by a signal after committing a checkpoint: retry to resume
    LEASE_HELD = 73  # another live process writes this run (its lease), or took it over from this one


class ConfigError(ValueError):
    """Bad configuration. Each entry of `problems` is one clear line."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class BadInput(Exception):
    """Bad configuration or input that a retry cannot fix: exit 2. The message is one clear line."""


def setting(default: Any, help: str, *, check: Callable[[Any], str | None] | None = None,
            choices: Callable[[], list[str]] | None = None, secret: bool = False,
            affects_result: bool = True, left_out_at_default: bool = False) -> Any:
    """A config field: its default, one help line, an optional check, and whether it changes the trained weights.
    `left_out_at_default`, for a setting added once runs exist: at its default it stays out of the fingerprint, so
    those runs keep their RUN_ID and resume."""
    return field(default=default, metadata=dict(help=help, check=check, choices=choices, secret=secret,
                                                affects_result=affects_result,
                                                left_out_at_default=left_out_at_default))


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be >= {low:g}"


def _positive(v: float) -> str | None:
    return None if v > 0 and math.isfinite(v) else "must be a positive number"


def _fraction(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be >= 0 and < 1"


def _max_steps(v: int) -> str | None:
    return None if v == -1 or v > 0 else "must be -1 (use NUM_TRAIN_EPOCHS) or a positive number of steps"


def _target_modules(v: str) -> str | None:
    names = [m.strip() for m in v.split(",")]
    if v.strip() == "all-linear" or (names and all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", n) for n in names)):
        return None
    return "must be a comma list of module names (e.g. q_proj,v_proj) or all-linear"


def _run_id(v: str) -> str | None:
    return None if v == "" or RUN_ID_PATTERN.fullmatch(v) else \
        "must be empty (derived) or 1-63 chars of a-z, 0-9, '.', '_', '-' starting with a letter or digit"


def _hub_id(v: str) -> str | None:
    return None if v == "" or HUB_ID_PATTERN.fullmatch(v) else "must be empty (no push) or 'user/name'"


def is_hub_id(name: str) -> bool:
    """A repo id by huggingface_hub's own rules: 'name' or 'namespace/name'."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_local_model(name: str) -> bool:
    """A model setting (BASE_MODEL, NLI_MODEL) that names a directory, not a Hub id: what transformers loads from
    disk (an existing path), and anything path-like, which is meant as one."""
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1


def _model_id(v: str) -> str | None:
    """A Hub model id ('name' or 'namespace/name'), as a card's base_model needs."""
    return None if v == "" or is_hub_id(v) else \
        "must be empty or a Hub model id such as NousResearch/Llama-2-7b-chat-hf (not a local path)"


def _branch(v: str) -> str | None:
    """A branch name the Hub accepts: git's ref-name rules (git check-ref-format --branch)."""
    bad = (v == "" or v.startswith(("-", "/", ".")) or v.endswith(("/", ".", ".lock"))
           or any(part in v for part in ("..", "//", "@{", "/."))
           or any(ch in v for ch in " ~^:?*[\\") or any(ord(ch) < 32 or ord(ch) == 127 for ch in v))
    return "must be a git branch name, e.g. main (no spaces, '..', '~^:?*[\\', control characters; " \
           "not starting with '-', '.' or '/')" if bad else None


CHECKPOINT_URI_FORMS = "s3://bucket/prefix, an absolute path, ./path or file:///path"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_USER_INFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*:/*)[^/@]*@")


def checkpoint_uri_problem(uri: str) -> str | None:
    """What is wrong with a CHECKPOINT_URI, or None. Strict, because a mistyped S3 URI used to become a folder in
    the container, lost with it while the logs looked healthy. The text never repeats credentials."""
    accepted = f"use {CHECKPOINT_URI_FORMS}"
    if _USER_INFO.match(uri):
        return ("holds credentials (user:password@); they are refused and not shown. Remove them and set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead")
    if not uri.strip():
        return f"is empty; {accepted}"
    scheme = (_SCHEME.match(uri)[1] if _SCHEME.match(uri) else "").lower()
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[5:].partition("/")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{2,254}", bucket):
            return f"has no valid bucket name after s3:// (letters, digits, '.', '-', '_'); {accepted}"
        if prefix.strip("/") and any(p in ("", ".", "..") for p in prefix.strip("/").split("/")):
            return f"has empty, '.' or '..' parts in its key prefix; {accepted}"
        return None
    if uri.startswith("file://"):
        return None if uri[7:].startswith("/") else f"a file:// URI needs an absolute path (file:///path); {accepted}"
    if scheme == "s3":
        rest = re.sub(r"^[A-Za-z0-9]+:?/*", "", uri)
        return f"is not a valid S3 URI; did you mean s3://{rest}? ({accepted})"
    if re.match(r"^s3/+", uri):
        return f"is not a valid S3 URI; did you mean s3://{uri.lstrip('s3').lstrip('/')}? ({accepted})"
    if scheme in ("gs", "gcs"):
        return ("Google Cloud Storage is reached through its S3-interoperable API: set CHECKPOINT_URI=s3://bucket/prefix, "
                "AWS_ENDPOINT_URL_S3=https://storage.googleapis.com and HMAC keys as AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY")
    if scheme and uri[len(scheme) + 1:].startswith("/"):
        return f"the scheme '{scheme}:' is not supported; {accepted}"
    if uri.startswith(("/", "./", "../", "~/")) or uri in (".", ".."):
        return None
    return (f"is neither an S3 URI nor an explicit local path; for S3 write s3://{uri.strip('/')}, for a local "
            f"directory ./{uri}")


def without_credentials(text: str) -> str:
    """A URI with any user:password@ replaced by ***@, for messages."""
    return _USER_INFO.sub(rf"\1{SECRET_MARK}@", text)


def local_store_path(uri: str) -> str | None:
    """The directory a valid local CHECKPOINT_URI names; None for S3."""
    if uri.startswith("s3://"):
        return None
    return uri[7:] if uri.startswith("file://") else uri


def _port(v: int) -> str | None:
    return None if 1 <= v <= 65535 else "must be a TCP port, 1-65535"


def _path(v: str) -> str | None:
    return None if v.strip() else "must be a directory path, e.g. ./output"


def _scheduler_names() -> list[str]:
    from transformers.trainer_utils import SchedulerType
    return [s.value for s in SchedulerType]


def _optimizer_names() -> list[str]:
    from transformers.training_args import OptimizerNames
    return [o.value for o in OptimizerNames]


# The names most runs set, accepted without importing transformers for its lists (5-6 s): a command that fails
# on another setting says so at once. tests/test_config.py holds them to transformers' own lists.
_scheduler_names.common = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts",
                           "polynomial")
_optimizer_names.common = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_torch_fused",
                           "adamw_8bit", "adafactor", "sgd")


def _fixed(*names: str) -> Callable[[], list[str]]:
    return lambda: list(names)


@dataclass(frozen=True)
class Config:
    # --- what is trained, on what ---
    base_model: str = setting("NousResearch/Llama-2-7b-chat-hf", "base model: Hub id or local directory")
    dataset: str = setting("Cynaptics/persona-chat", "Hub dataset id, or a local .jsonl/.json/.parquet file")
    num_samples: int = setting(1000, "rows drawn after a seeded shuffle (0 = all)", check=_at_least(0))
    seed: int = setting(42, "one seed for shuffle, split, init and dropout")
    max_seq_length: int = setting(1024, "tokens per example; old context turns are dropped first, never the reply",
                                  check=_at_least(32))
    eval_fraction: float = setting(0.05, "share of conversations held out for eval loss (0 = no eval)",
                                   check=_fraction)
    # --- the adapter ---
    lora_r: int = setting(64, "LoRA rank", check=_at_least(1))
    lora_alpha: float = setting(16.0, "LoRA alpha (scaling = alpha / r)", check=_positive)
    lora_dropout: float = setting(0.1, "dropout on the LoRA input", check=_fraction)
    lora_target_modules: str = setting("q_proj,v_proj", "comma list of module names, or all-linear",
                                       check=_target_modules)
    # --- the optimisation ---
    per_device_train_batch_size: int = setting(4, "sequences per GPU per micro-step", check=_at_least(1))
    per_device_eval_batch_size: int = setting(4, "sequences per GPU per eval step", check=_at_least(1),
                                              affects_result=False)
    gradient_accumulation_steps: int = setting(1, "micro-steps per optimizer step", check=_at_least(1))
    learning_rate: float = setting(2e-4, "peak learning rate", check=_positive)
    lr_scheduler_type: str = setting("cosine", "any transformers scheduler name", choices=_scheduler_names)
    warmup_steps: float = setting(0.03, "warmup: steps if >= 1, else a fraction of all steps", check=_at_least(0))
    weight_decay: float = setting(0.001, "AdamW weight decay", check=_at_least(0))
    max_grad_norm: float = setting(0.3, "gradient clipping norm", check=_positive)
    optim: str = setting("paged_adamw_32bit", "any transformers optimizer name", choices=_optimizer_names)
    num_train_epochs: float = setting(1.0, "passes over the training rows (MAX_STEPS > 0 wins)", check=_positive)
    max_steps: int = setting(-1, "optimizer steps; -1 = from NUM_TRAIN_EPOCHS", check=_max_steps)
    compute_dtype: str = setting("auto", "4-bit compute dtype: auto (bfloat16 if the GPU has it, else float16), "
                                 "bfloat16, float16, float32", choices=_fixed("auto", "bfloat16", "float16", "float32"))
    double_quant: bool = setting(False, "NF4's per-block scales quantized as well (QLoRA's double quantization): "
                                 "~0.3 GiB less GPU memory for a 7B base, the base's weights a little coarser")
    gradient_checkpointing: str = setting("auto", "recompute activations to save memory: auto (by GPU memory), "
                                          "true (whole layers), selective (each layer's attention block only), "
                                          "offload (whole layers, their inputs in host memory), false",
                                          choices=_fixed("auto", "true", "selective", "offload", "false"),
                                          affects_result=False)
    padding_free: str = setting("auto", "each batch's sequences back to back in one row, no padding, attention kept "
                                "inside each sequence: auto (on a GPU), true, false",
                                choices=_fixed("auto", "true", "false"))
    use_liger_kernel: str = setting("auto", "Liger's fused Triton kernels for RMSNorm, SwiGLU and RoPE: auto (on a GPU "
                                    "when liger-kernel is installed), true, false",
                                    choices=_fixed("auto", "true", "false"))
    tf32: str = setting("auto", "TF32 tensor cores for the float32 LoRA matmuls: auto (on Ampere and newer GPUs), "
                        "true, false", choices=_fixed("auto", "true", "false"))
    torch_compile: str = setting("auto", "torch.compile each decoder layer (a one-time compile of 10-15 s at the "
                                 "first step, then faster steps): auto (on one Ampere or newer GPU when the run is "
                                 "long enough to repay it), true, false", choices=_fixed("auto", "true", "false"),
                                 affects_result=False)
    # --- evaluation of the persona (job/evaluate.py) ---
    eval_generations: int = setting(32, "held-out rows to answer greedily, base and tuned, for reply F1 and persona "
                                    "consistency (0 = losses only)", check=_at_least(0), affects_result=False)
    eval_max_new_tokens: int = setting(48, "longest greedy reply in the evaluation, in tokens", check=_at_least(1),
                                       affects_result=False)
    eval_at_checkpoints: bool = setting(False, "also evaluate the persona (loss, reply F1, consistency) at every "
                                        "checkpoint, not only at the end", affects_result=False)
    nli_model: str = setting("", "NLI model (Hub id or local directory) scoring replies against the persona facts; "
                             "empty = the word-overlap proxy", affects_result=False)
    publish_only_if_improved: bool = setting(False, "refuse to push (exit 2) unless the tuned adapter's held-out "
                                             "loss is below the base model's", affects_result=False)
    # --- cadence and storage ---
    save_steps: int = setting(50, "checkpoint every N optimizer steps", check=_at_least(1), affects_result=False)
    save_total_limit: int = setting(3, "committed checkpoints kept in the store", check=_at_least(1),
                                    affects_result=False)
    logging_steps: int = setting(10, "log loss, learning rate and speed every N steps", check=_at_least(1),
                                 affects_result=False)
    eval_steps: int = setting(50, "eval loss every N steps (and at the end)", check=_at_least(1),
                              affects_result=False)
    run_id: str = setting("", "name under which checkpoints are stored; empty = derived from the settings",
                          check=_run_id, affects_result=False)
    checkpoint_uri: str = setting("./checkpoints", f"where the run's checkpoints live: {CHECKPOINT_URI_FORMS}",
                                  check=checkpoint_uri_problem, affects_result=False)
    allow_pod_local_checkpoints: bool = setting(False, "in a Kubernetes pod, accept a local CHECKPOINT_URI on the "
                                                "pod's own disk (root filesystem, emptyDir, tmpfs), which is lost "
                                                "with the pod", affects_result=False)
    output_dir: str = setting("./output", "local scratch; the final adapter lands here too", check=_path,
                              affects_result=False)
    shutdown_budget_seconds: float = setting(20.0, "on SIGTERM: seconds to save and upload before exit 75 "
                                             "(keep below the pod's terminationGracePeriodSeconds)",
                                             check=_positive, affects_result=False)
    upload_stall_seconds: float = setting(1200.0, "stop when no checkpoint has been committed for this long since a "
                                          "save (a store refusing or down): exit 1, or 2 when the store refuses for "
                                          "good (e.g. AccessDenied)", check=_positive, affects_result=False)
    lease_ttl_seconds: float = setting(60.0, "one writer per run: its lease on the run lasts this long unless renewed "
                                       "(every third of it); a new start waits this long for a live holder, then "
                                       "exits 73", check=_at_least(2), affects_result=False)
    # --- publishing ---
    hub_model_id: str = setting("", "Hub repo 'user/name' to push the adapter to; empty = no push", check=_hub_id,
                                affects_result=False)
    hub_private_repo: bool = setting(True, "create the Hub repo private", affects_result=False)
    hub_revision: str = setting("main", "Hub branch to push to", check=_branch, affects_result=False)
    push_merged: bool = setting(False, "also push merged 16-bit weights (branch HUB_MERGED_REVISION)",
                                affects_result=False)
    hub_merged_revision: str = setting("merged", "Hub branch for the merged weights", check=_branch,
                                       affects_result=False)
    base_model_id: str = setting("", "Hub id of BASE_MODEL for the model card's base_model, when BASE_MODEL is a "
                                 "local directory; empty = BASE_MODEL, or the local config's _name_or_path",
                                 check=_model_id, affects_result=False)
    hf_token: str = setting("", "Hugging Face token (write access if HUB_MODEL_ID is set)", secret=True,
                            affects_result=False)
    # --- the machine ---
    require_gpu: bool = setting(True, "fail (exit 2) when no CUDA GPU is visible; false runs on the CPU",
                                affects_result=False)
    log_format: str = setting("auto", "auto (progress bar on a terminal, else JSON lines), bar, json",
                              choices=_fixed("auto", "bar", "json"), affects_result=False)
    log_level: str = setting("info", "info, or debug: an unexpected failure also logs its traceback (secrets masked)",
                             choices=_fixed("info", "debug"), affects_result=False)
    # --- several GPUs (torchrun's names) ---
    nproc_per_node: int = setting(1, "GPUs (worker processes) per node; > 1 starts the job under torchrun",
                                  check=_at_least(1), affects_result=False)
    nnodes: int = setting(1, "nodes in a multi-node run", check=_at_least(1), affects_result=False)
    node_rank: int = setting(0, "this node's index, 0..NNODES-1 (k8s: the pod's completion index)",
                             check=_at_least(0), affects_result=False)
    master_addr: str = setting("127.0.0.1", "address of node 0 for the rendezvous", affects_result=False)
    master_port: int = setting(29500, "port on node 0 for the rendezvous", check=_port, affects_result=False)
    scale_batch_with_gpus: bool = setting(False, "false: the effective batch stays that of one GPU, split over "
                                          "the GPUs; true: every GPU takes PER_DEVICE_TRAIN_BATCH_SIZE")

    # --- derived values ---
    @property
    def target_modules(self) -> list[str] | str:
        if self.lora_target_modules.strip() == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.lora_target_modules.split(",")]

    def result_settings(self) -> dict[str, Any]:
        """The settings that change the trained weights, by environment variable name."""
        settings = {f.name.upper(): getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.metadata["affects_result"]
                    and not (f.metadata["left_out_at_default"] and getattr(self, f.name) == f.default)}
        if self.scale_batch_with_gpus:   # then the GPU count sets the effective batch
            settings["GPUS"] = self.nproc_per_node * self.nnodes
        return settings

    def fingerprint(self) -> str:
        blob = json.dumps(self.result_settings(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def resolved_run_id(self) -> str:
        if self.run_id:
            return self.run_id
        name = re.sub(r"[^a-z0-9]+", "-", self.base_model.rstrip("/").split("/")[-1].lower()).strip("-")
        return f"{name[:40] or 'run'}-{self.fingerprint()}"

    def redacted(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name.upper()] = (SECRET_MARK if value else "") if f.metadata["secret"] else value
        out["RUN_ID"] = self.resolved_run_id
        return out

    def secrets(self) -> list[str]:
        return [getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["secret"] and getattr(self, f.name)]


FIELDS = {f.name.upper(): f for f in dataclasses.fields(Config)}


def _parse(name: str, raw: str, f: dataclasses.Field) -> tuple[Any, str | None]:
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}[f.type]
    text = raw.strip()
    if f.metadata["secret"]:
        return text, None   # a Secret made with `echo` ends in a newline, which no token has
    if kind is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True, None
        if low in ("0", "false", "no", "off"):
            return False, None
        return None, "must be true or false"
    if kind is int:
        try:
            return int(text), None
        except ValueError:
            return None, "must be a whole number"
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            return None, "must be a number"
        return (value, None) if math.isfinite(value) else (None, "must be a finite number")
    return raw, None


def _shown(f: dataclasses.Field, raw: str) -> str:
    return SECRET_MARK if f.metadata["secret"] else repr(without_credentials(raw))


def from_env(environ: Mapping[str, str]) -> Config:
    """Build the Config from environment variables; raise ConfigError listing every problem, one line each."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    for name, f in FIELDS.items():
        if name not in environ:
            continue
        raw = environ[name]
        value, problem = _parse(name, raw, f)
        if problem is None and f.metadata["check"]:
            problem = f.metadata["check"](value)
        choices = f.metadata["choices"]
        if problem is None and choices and value not in getattr(choices, "common", ()):
            allowed = choices()
            if value not in allowed:
                close = difflib.get_close_matches(value, allowed, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                problem = f"must be one of: {', '.join(allowed)}{hint}"
        if problem:
            problems.append(f"{name}={_shown(f, raw)}: {problem}")
        else:
            values[f.name] = value
    problems += _near_misses(environ)
    if problems:
        raise ConfigError(problems)
    config = Config(**values)
    if config.node_rank >= config.nnodes:
        raise ConfigError([f"NODE_RANK={config.node_rank}: must be below NNODES={config.nnodes} "
                           f"(nodes are numbered 0..NNODES-1)"])
    if config.use_liger_kernel == "true" and config.torch_compile == "true":
        # On an H200 (torch 2.11, liger-kernel 0.8.5) dynamo's trace of LigerRMSNormFunction failed an assertion at
        # the first step, after the model had loaded (docs/IMAGE.md, step c2).
        raise ConfigError(["USE_LIGER_KERNEL=true with TORCH_COMPILE=true: torch.compile cannot trace Liger's "
                           "kernels; set USE_LIGER_KERNEL=auto (compiled layers get inductor's own fusions) or "
                           "TORCH_COMPILE=false"])
    if config.publish_only_if_improved and config.eval_fraction == 0:
        raise ConfigError(["PUBLISH_ONLY_IF_IMPROVED=true needs held-out conversations to compare on; "
                           "set EVAL_FRACTION > 0 (e.g. 0.05) or PUBLISH_ONLY_IF_IMPROVED=false"])
    return config


def _near_misses(environ: Mapping[str, str]) -> list[str]:
    """A misspelt setting would silently fall back to its default; name it instead."""
    known = list(FIELDS) + list(FOREIGN_VARIABLES) + ["AWS_REGION", "AWS_ENDPOINT_URL"]
    problems = []
    for name in sorted(environ):
        if name in known or not re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+", name):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        if close:
            problems.append(f"{name} is not a setting of this job (did you mean {close[0]}?); "
                            f"rename it, or see .env.example for every setting")
    return problems


def env_example() -> str:
    """The text of `.env.example`: every variable, its default and one line of help."""
    lines = ["# Every setting of the persona QLoRA job, with its default. Copy to .env and edit.",
             "# Generated from job/config.py by `python -m job env-example`; a test fails when they drift.",
             ""]
    for name, f in FIELDS.items():
        default = f.default
        shown = str(default).lower() if isinstance(default, bool) else ("" if f.metadata["secret"] else default)
        lines += [f"# {f.metadata['help']}", f"{name}={shown}", ""]
    lines += ["# --- read by boto3 and huggingface_hub themselves; uncomment to set ---", ""]
    for name, help_line in FOREIGN_VARIABLES.items():
        lines += [f"# {help_line}", f"# {name}=", ""]
    return "\n".join(lines).rstrip() + "\n"
