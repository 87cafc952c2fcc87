"""Preflight: every check that can fail before any GPU time, each a small function with one row of the table.

`run_checks` runs them all, in the order of `CHECKS`. A failed check does not stop the others; a check that needs
what an earlier one failed to find is skipped, saying which. `report` shows the results: a table on a terminal,
one JSON event per check in a pod's log. Each failure carries one actionable line naming the variable to change.

The checks only look: what they open or read on the way (the device, the run's store, the rows, the base model's
shape) goes back to the caller in `Found`, which the run goes on with (job/run.py `Run.check`), so nothing is read
twice. `python -m job preflight` is this and nothing else; `train` runs it first. With several GPUs the launcher
runs them before starting torchrun's workers (job/run.py `launch_workers`), and the workers check again only their
own GPU.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from .config import FIELDS, BadInput, Config, is_local_model, local_store_path
from .data import Splits
from .distributed import BatchSplitError, Topology, split_batch
from .hub import HubAccessError, check_read_access, describe_failure, with_retries
from .log import Reporter
from .store.run_store import RunStore

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
GiB = 2 ** 30
# What from_pretrained reads besides the weights; one of them must be there.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "spm.model")
# (single file, shard index), in the order from_pretrained looks for them (transformers modeling_utils).
WEIGHT_LAYOUTS = (("model.safetensors", "model.safetensors.index.json"),
                  ("pytorch_model.bin", "pytorch_model.bin.index.json"))
# Room in OUTPUT_DIR beyond the checkpoints: tokenizer copies, logs, the loss curve, the datasets cache's scratch.
DISK_MARGIN = GiB // 2


class CheckFailed(Exception):
    """A check's failure. `problems`: one actionable line each (usually one), naming the variable to change;
    `detail`: the short text of the table's row."""

    def __init__(self, problems: str | list[str], detail: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self.problems[0])
        self.detail = detail or _clause(self.problems[0])


class Skip(Exception):
    """The check does not apply here; the message says why."""


class CheckedByLauncher(Skip):
    """A worker of torchrun whose launcher ran this check and showed its row: the worker shows no row for it,
    and takes from it only what the run needs (the device, the rows, the store)."""


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str                       # PASSED, FAILED or SKIPPED
    detail: str = ""
    problems: tuple[str, ...] = ()    # for a failure: one actionable line each
    warnings: tuple[str, ...] = ()    # for a pass: what the user should know, one line each; no exit
    seconds: float = 0.0              # what the check took (imports, downloads, the GPU's own tests)


@dataclass
class Found:
    """What the checks are given, and what they find on the way: later checks read it, and the run goes on with it."""
    config: Config
    topology: Topology
    launcher: bool = False                  # the process that starts torchrun's workers: it keeps off the GPUs
    early_probe: Any = None                 # the GPU row's Triton probe, started with the process (job/toolchain.py)
    device: str | None = None               # "cuda" or "cpu"
    run_store: RunStore | None = None
    splits: Splits | None = None
    model_shape: Any = None                 # the base model's transformers config (its text part)
    run_record: dict | None = None          # the run's run.json, as rank 0 found it (None: a new run)
    downloads: dict[str, int] = field(default_factory=dict)   # variable -> bytes still to fetch into the HF cache
    warnings: list[str] = field(default_factory=list)         # the running check's warnings, one line each


def failure_lines(results: list[CheckResult]) -> list[str]:
    return [line for r in results if r.status == FAILED for line in r.problems]


# ---------------------------------------------------------------- the checks

def check_config(f: Found) -> str:
    # A Config exists only once every setting parsed and passed its check (job/config.py); `config_failed`
    # shows the other case.
    _unless_launcher_checked(f)
    return f"{len(FIELDS)} settings valid; RUN_ID {f.config.resolved_run_id}"


def check_gpu(f: Found) -> str:
    """The GPUs the settings ask for (`check_machine`), and bitsandbytes' 4-bit NF4 kernels on one."""
    import torch

    config = f.config
    try:
        f.device = check_machine(config)
    except BadInput as exc:
        raise CheckFailed(str(exc), _machine_trouble(config)) from None
    if f.device == "cpu" and f.topology.launcher_checked:
        raise CheckedByLauncher()   # the same CPU and bitsandbytes that the launcher checked
    if f.device == "cuda" and f.launcher:   # a CUDA context here would hold GPU memory for the whole run
        return (f"{torch.cuda.device_count()} CUDA GPUs visible, torch {torch.__version__} CUDA {torch.version.cuda}; "
                f"each worker checks its own GPU and its 4-bit kernels")
    if f.device == "cuda":
        index = torch.cuda.current_device()
        where = (f"{torch.cuda.get_device_name(index)}, driver {_driver_version()}, torch {torch.__version__} "
                 f"CUDA {torch.version.cuda}")
    else:
        where = f"CPU (REQUIRE_GPU=false), torch {torch.__version__}"
    detail = f"{where}, {_matmul_4bit(config, f.device, where)}"
    if f.device == "cuda":   # Liger's kernels and torch.compile build Triton kernels with the C compiler
        from .toolchain import ToolchainMissing, gpu_toolchain
        try:
            detail += gpu_toolchain(config, f.topology.world_size, f.early_probe)
        except ToolchainMissing as exc:
            raise CheckFailed(exc.line, exc.detail) from None
    return detail


def check_machine(config: Config) -> str:
    """The GPUs the settings ask for are here, and the batch splits over them; returns "cuda" or "cpu".
    Run by the launcher before it starts workers, and by every worker."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if config.require_gpu and device != "cuda":
        raise BadInput("REQUIRE_GPU=true but no CUDA GPU is visible; run on a GPU node "
                       "(docker: --gpus all; k8s: nvidia.com/gpu) or set REQUIRE_GPU=false to train on the CPU")
    wanted = config.nproc_per_node
    if device == "cuda" and wanted > torch.cuda.device_count():
        raise BadInput(f"NPROC_PER_NODE={wanted} but this node has {torch.cuda.device_count()} GPU(s) visible; "
                       f"ask for {wanted} GPUs (k8s: nvidia.com/gpu: {wanted}) or lower NPROC_PER_NODE")
    try:
        split_batch(config, config.nproc_per_node * config.nnodes)
    except BatchSplitError as exc:
        raise BadInput(str(exc)) from None
    return device


def check_base_model(f: Found) -> str:
    if f.topology.launcher_checked:
        if f.device == "cuda":   # each worker's memory check needs the shape; its launcher fetched config.json
            f.model_shape = _model_shape("BASE_MODEL", f.config.base_model, _config_folder(f.config))
        raise CheckedByLauncher()
    if not f.topology.is_main:
        raise Skip("rank 0 checks it")
    shape, detail, folder = _check_model("BASE_MODEL", f.config.base_model, f)
    f.model_shape = shape
    return detail + _check_target_modules(f.config, folder)


def check_nli_model(f: Found) -> str:
    _unless_launcher_checked(f)
    if not f.config.nli_model:
        raise Skip("NLI_MODEL empty: replies are scored by word overlap")
    if not f.topology.is_main:
        raise Skip("rank 0 checks it")
    from .evaluate import nli_labels
    shape, detail, _ = _check_model("NLI_MODEL", f.config.nli_model, f)
    try:
        nli_labels(f.config.nli_model, getattr(shape, "id2label", None) or {})
    except ValueError as exc:
        raise CheckFailed(str(exc), "not an NLI classifier") from None
    return detail


def check_dataset(f: Found) -> str:
    """Access first (so a gated or missing Hub dataset gets its own clear line), then every row's schema."""
    from huggingface_hub import constants

    from .data import DataError, is_local_dataset, load_splits

    name = f.config.dataset
    local = is_local_dataset(name)
    if not local and f.topology.is_main and not f.topology.launcher_checked:
        _read_access("DATASET", name, "dataset", f.config)
    try:
        f.splits = load_splits(f.config)
    except DataError as exc:
        raise CheckFailed(str(exc)) from None
    except Exception as exc:   # datasets raises many types for a Hub dataset it cannot fetch or read
        if not local and constants.HF_HUB_OFFLINE:
            raise CheckFailed(f"DATASET={name!r} is not in the datasets cache and HF_HUB_OFFLINE=1; load it once "
                              f"online into the same HF_HOME, or unset HF_HUB_OFFLINE", "not cached, offline") from None
        raise CheckFailed(f"DATASET={name!r}: cannot load it{'' if local else ' from the Hub'} "
                          f"({type(exc).__name__}: {_first_line(exc)})", "cannot load") from None
    _unless_launcher_checked(f)   # the rows are read: every worker trains on them
    where = f"local file {name}" if local else f"Hub {name}"
    return (f"{where}: every row fits the persona-chat schema; {len(f.splits.train)} train / "
            f"{len(f.splits.eval)} eval rows")


def check_store(f: Found) -> str:
    """CHECKPOINT_URI: write, read back and delete a probe object (rank 0; the others only open the store)."""
    import botocore.exceptions

    from .pod import local_checkpoints_problem
    from .store import StoreError, open_store
    from .store.run_store import RunStore

    uri = f.config.checkpoint_uri
    lost = local_checkpoints_problem(uri, f.config.allow_pod_local_checkpoints, os.environ)
    if lost:
        raise CheckFailed(lost, "local, lost with the pod")
    try:
        store = open_store(uri)
        if f.topology.is_main and not f.topology.launcher_checked:
            store.probe()
    except StoreError as exc:
        raise CheckFailed(str(exc)) from None
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        # A failure that outlasted the retries; our words, as botocore's text may carry a signed URL.
        raise CheckFailed(f"CHECKPOINT_URI {uri}: the write/read/delete probe failed ({type(exc).__name__}) after "
                          f"retries. Check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and try again") from None
    f.run_store = RunStore(store, f.config.resolved_run_id)
    if f.topology.is_main:   # rank 0 compares run.json with these settings (job/run.py `Run._same_run`)
        try:   # a run.json or status.json that is not the job's is no retry's to fix
            f.run_record = f.run_store.read_run()
            f.run_store.read_status()
        except StoreError as exc:
            raise CheckFailed(str(exc), "run.json or status.json unreadable") from None
    _unless_launcher_checked(f)
    if not f.topology.is_main:
        raise Skip("opened; rank 0 probes it")
    return f"{store.uri}: wrote, read back and deleted a probe object"


def check_hub_push(f: Found) -> str:
    from huggingface_hub import constants

    from .hub import check_hub_access

    _unless_launcher_checked(f)
    config = f.config
    if not config.hub_model_id:
        raise Skip("HUB_MODEL_ID empty: no push")
    if not f.topology.is_main:
        raise Skip("rank 0 checks it")
    if constants.HF_HUB_OFFLINE:
        raise CheckFailed(f"HUB_MODEL_ID={config.hub_model_id!r} is set but HF_HUB_OFFLINE=1: the push would fail; "
                          f"unset HF_HUB_OFFLINE or HUB_MODEL_ID", "offline")
    try:
        check_hub_access(config)
    except HubAccessError as exc:
        raise CheckFailed(str(exc)) from None
    except Exception as exc:   # the Hub down or unreachable after retries
        raise CheckFailed(f"cannot check that HF_TOKEN may push to HUB_MODEL_ID={config.hub_model_id!r}: the Hub at "
                          f"{constants.ENDPOINT} failed ({describe_failure(exc)}); check the network and HF_ENDPOINT",
                          "Hub unreachable") from None
    from .card import hub_base_model
    if hub_base_model(config) is None:   # the Hub's metadata check refuses a path as base_model
        f.warnings.append(f"BASE_MODEL={config.base_model!r} is a local directory whose config.json names no Hub "
                          f"model: the model card will leave base_model out; set BASE_MODEL_ID to the Hub id it "
                          f"came from to name it")
    return f"HF_TOKEN may push to {config.hub_model_id} (branch {config.hub_revision})"


def check_disk(f: Found) -> str:
    """OUTPUT_DIR and the HF cache are writable and their disks have room; a local CHECKPOINT_URI on the same disk
    counts too. Without the base model's shape only writability is checked."""
    from huggingface_hub import constants

    _unless_launcher_checked(f)
    config = f.config
    cache = Path(constants.HF_HUB_CACHE)
    places = [("OUTPUT_DIR", Path(config.output_dir)), ("HF_HOME", cache)]
    for variable, path in places:
        _check_writable(variable, path)
    if f.model_shape is None:
        raise Skip(f"{_where(places)} writable; room not estimated: needs base model")
    from .speed.plan import checkpoint_bytes

    checkpoint = checkpoint_bytes(config, f.model_shape)
    # At most two checkpoints are on the local disk at once (job/trainer.py CheckpointCommitter): one uploading, and
    # the one a stop or the last step writes behind it; besides them, the checkpoint the run resumed from.
    needs = [("OUTPUT_DIR", Path(config.output_dir), 3 * checkpoint + DISK_MARGIN,
              "two checkpoints (one uploading, one written behind it), the one resumed from, the final adapter, "
              "scratch"),
             ("HF_HOME", cache, sum(f.downloads.values()),
              f"{' and '.join(v for v, size in f.downloads.items() if size)} to download into {cache}")]
    if not config.checkpoint_uri.startswith("s3://"):
        needs.append(("CHECKPOINT_URI", Path(local_store_path(config.checkpoint_uri)).expanduser().resolve(),
                      (config.save_total_limit + 2) * checkpoint, f"SAVE_TOTAL_LIMIT={config.save_total_limit} "
                      f"committed checkpoints, one in flight and one kept to resume from"))
    disks: dict[int, list[tuple[str, Path, int, str]]] = {}
    for need in needs:
        disks.setdefault(os.stat(_existing(need[1])).st_dev, []).append(need)
    lines, shown = [], []
    for group in disks.values():
        free = shutil.disk_usage(_existing(group[0][1])).free
        wanted = sum(n[2] for n in group)
        names = " and ".join(f"{n[0]}={n[1]}" for n in group)
        shown.append(f"{_gb(free)} free for {_gb(wanted)}")
        if wanted > free:
            parts = "; ".join(f"{n[0]}: {_gb(n[2])} for {n[3]}" for n in group if n[2])
            biggest = max(group, key=lambda n: n[2])[0]
            lines.append(f"{names}: {_gb(free)} free on {'their' if len(group) > 1 else 'its'} disk but about "
                         f"{_gb(wanted)} needed ({parts}); free space or point {biggest} at a larger volume")
    if lines:
        raise CheckFailed(lines, "not enough free space")
    return f"{_where(places)} writable; " + ", ".join(shown)


def check_memory(f: Found) -> str:
    """The estimated peak (see `peak_memory`) against the GPU's memory, or the host's on a CPU."""
    import torch

    from .model import compute_dtype
    from .speed.plan import host_memory, peak_memory, plan

    config = f.config
    if f.launcher and f.device == "cuda":
        raise Skip("each worker checks its own GPU")
    if f.device == "cpu" and f.topology.launcher_checked:
        raise CheckedByLauncher()   # the launcher checked this host's memory for all its workers
    speed = plan(config, f.device, f.model_shape)
    micro_batch = split_batch(config, config.nproc_per_node * config.nnodes)[0]
    dtype_bytes = torch.finfo(compute_dtype(config, f.device)).bits // 8
    # Selective recomputation keeps the MLP's activations and recomputes only the attention block: estimated as none
    # recomputed, an upper bound, until the GPU measures it (bench/speed.py job-gc-selective).
    estimate = peak_memory(config, f.model_shape, micro_batch, speed.recompute in ("layers", "offload"),
                           speed.liger_kernel, dtype_bytes, kept_weights=speed.keep_weights)
    need = sum(estimate.values())
    if f.device == "cuda":
        index = torch.cuda.current_device()
        have, what = torch.cuda.get_device_properties(index).total_memory, f"{torch.cuda.get_device_name(index)} has"
    else:   # the processes of this node share the host's memory
        need *= config.nproc_per_node
        have, what = host_memory(), "this machine has"
    parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in estimate.items())
    checkpointing = f"gradient checkpointing {'on' if speed.gradient_checkpointing else 'off'}"
    if need > have:
        more = "" if speed.gradient_checkpointing else ", or set GRADIENT_CHECKPOINTING=true"
        raise CheckFailed(
            f"PER_DEVICE_TRAIN_BATCH_SIZE={config.per_device_train_batch_size} x MAX_SEQ_LENGTH="
            f"{config.max_seq_length} needs about {need / GiB:.1f} GiB at its peak ({parts} GiB; {checkpointing}) "
            f"but {what} {have / GiB:.1f} GiB; lower PER_DEVICE_TRAIN_BATCH_SIZE or MAX_SEQ_LENGTH{more}",
            f"~{need / GiB:.1f} GiB needed, {have / GiB:.1f} GiB there")
    return f"~{need / GiB:.1f} GiB of {have / GiB:.1f} GiB at the peak ({parts} GiB; {checkpointing})"


# (row name, check, the rows it needs): the table's order.
CHECKS: list[tuple[str, Callable[[Found], str], tuple[str, ...]]] = [
    ("config", check_config, ()),
    ("gpu", check_gpu, ()),
    ("base model", check_base_model, ()),
    ("nli model", check_nli_model, ()),
    ("dataset", check_dataset, ()),
    ("checkpoint store", check_store, ()),
    ("hub push", check_hub_push, ()),
    ("disk", check_disk, ()),
    ("memory", check_memory, ("gpu", "base model")),
]


def run_checks(config: Config, topology: Topology = Topology(), launcher: bool = False,
               early_probe=None) -> tuple[list[CheckResult], Found]:
    """Every check, in order; a check whose needs did not pass is skipped. `launcher`: this process is about to
    start torchrun's workers, so the checks keep off the GPUs, which the workers take next. A worker whose
    launcher ran them (`topology.launcher_checked`) checks only its own GPU (on a CPU, nothing) and shows
    only those rows. `early_probe`: the GPU row's Triton probe, started with the process; stopped here whether
    the row took its answer or not."""
    try:
        return _run_checks(Found(config, topology, launcher, early_probe))
    finally:
        if early_probe is not None:
            early_probe.stop()


def _run_checks(found: Found) -> tuple[list[CheckResult], Found]:
    results: list[CheckResult] = []
    for name, check, needs in CHECKS:
        missing = [r.name for r in results if r.name in needs and r.status != PASSED]
        if missing:
            results.append(CheckResult(name, SKIPPED, f"needs {' and '.join(missing)}"))
            continue
        found.warnings = []
        started = time.perf_counter()
        try:
            result = CheckResult(name, PASSED, check(found), warnings=tuple(found.warnings))
        except CheckedByLauncher:
            continue
        except Skip as exc:
            result = CheckResult(name, SKIPPED, str(exc))
        except CheckFailed as exc:
            result = CheckResult(name, FAILED, exc.detail, tuple(exc.problems))
        results.append(replace(result, seconds=round(time.perf_counter() - started, 2)))
    return results, found


def config_failed(config_problems: list[str]) -> list[CheckResult]:
    """The table when the settings themselves are bad: no Config exists, so nothing else can be checked."""
    count = len(config_problems)
    return [CheckResult("config", FAILED, f"{count} bad setting{'s' if count > 1 else ''}", tuple(config_problems))] + \
        [CheckResult(name, SKIPPED, "needs config") for name, _, _ in CHECKS[1:]]


# ---------------------------------------------------------------- showing the results

_MARKS = {PASSED: "ok", FAILED: "FAILED", SKIPPED: "skipped"}


def render_table(results: list[CheckResult]) -> str:
    width = max(len(r.name) for r in results)
    lines = [f"{'check':<{width}}  {'result':<7}  detail"]
    lines += [f"{r.name:<{width}}  {_MARKS[r.status]:<7}  {r.detail}" for r in results]
    counts = {status: sum(r.status == status for r in results) for status in (PASSED, FAILED, SKIPPED)}
    lines.append(f"preflight: {counts[PASSED]} passed, {counts[FAILED]} failed, {counts[SKIPPED]} skipped")
    return "\n".join(lines)


def report(results: list[CheckResult], reporter: Reporter) -> list[str]:
    """Show the results: a table on a terminal (LOG_FORMAT=bar), one JSON event per check otherwise, then each
    warning as a `warning:` line (stderr). Returns the failures' lines; the caller reports them as `error:` lines
    (stderr) and exits 2."""
    if reporter.mode == "json":
        for r in results:
            extra = {"problems": list(r.problems)} if r.problems else {}
            extra.update({"warnings": list(r.warnings)} if r.warnings else {})
            reporter.event("preflight", r.detail, check=r.name, status=r.status, seconds=r.seconds, **extra)
    elif results:   # none in a worker whose launcher ran every check
        reporter.text(render_table(results))
    for line in (w for r in results for w in r.warnings):
        reporter.warning(line)
    return failure_lines(results)


# ---------------------------------------------------------------- helpers

def _check_model(variable: str, name: str, f: Found) -> tuple[Any, str, Path]:
    """A model the job will load: a local directory or a Hub id it may read, with config, tokenizer and weights.
    Never downloads weights: their sizes come from the Hub's listing. Returns (its shape, the row's detail, the
    folder of its config.json)."""
    if is_local_model(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise CheckFailed(f"{variable}={name!r}: no such directory; give a local model directory (with "
                              f"config.json, tokenizer and weights) or a Hub model id 'user/name'",
                              "no such directory")
        files = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
        weights = _weight_files(variable, name, files, lambda index: (path / index).read_text())
        where, config_dir = f"local dir {name}", path
    else:
        files, weights, config_dir = _hub_model(variable, name, f)
        where = f"Hub {name}"
    if "config.json" not in files:
        raise CheckFailed(f"{variable}={name!r} has no config.json: not a transformers model; give a model "
                          f"directory or Hub id", "no config.json")
    if not any(t in files for t in TOKENIZER_FILES):
        raise CheckFailed(f"{variable}={name!r} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}); give a model "
                          f"that ships its tokenizer", "no tokenizer")
    if not weights:
        raise CheckFailed(f"{variable}={name!r} has no weights (*.safetensors or pytorch_model*.bin); give a "
                          f"complete model", "no weights")
    shape = _model_shape(variable, name, config_dir)
    size = sum(weights.values())
    fetch = f.downloads.get(variable)
    fetched = "" if fetch is None else f", {_gb(fetch)} to download" if fetch else ", all cached"
    kind = getattr(shape, "model_type", "?")
    return shape, (f"{where}: {kind}, {shape.num_hidden_layers} layers, hidden {shape.hidden_size}; "
                   f"{_gb(size)} of weights{fetched}"), config_dir


def _check_target_modules(config: Config, folder: Path) -> str:
    """Every name in LORA_TARGET_MODULES matches a linear layer of the base, as peft matches them (the module's
    name, or its dotted tail). The base is built on the meta device from its config.json: its modules without
    weights, in well under a second. peft itself would fail only after the base is loaded, and a name that
    matches nothing when another does is not an error to peft at all. Returns the row's addition."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    wanted = config.target_modules
    if wanted == "all-linear":
        return ""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
    except Exception:   # a model type this transformers can't build (custom code): peft will say at load time
        return "; LORA_TARGET_MODULES not checked (model type unknown to transformers)"
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    kinds = sorted({name.rsplit(".", 1)[-1] for name in linear})
    missing = [t for t in wanted if not any(name == t or name.endswith("." + t) for name in linear)]
    if missing:
        raise CheckFailed(f"LORA_TARGET_MODULES={config.lora_target_modules!r}: "
                          f"{', '.join(repr(m) for m in missing)} {'matches' if len(missing) == 1 else 'match'} "
                          f"no linear layer of BASE_MODEL; its linear layers are {', '.join(kinds)} "
                          f"(or use all-linear)", f"LORA_TARGET_MODULES: no layer {missing[0]!r}")
    return f"; LoRA on {', '.join(wanted)}"


def _hub_model(variable: str, name: str, f: Found) -> tuple[dict[str, int], dict[str, int], Path]:
    """The repo's file sizes, those of the weights from_pretrained would fetch, and the folder of its config.json.
    config.json and a shard index are downloaded (small JSON); records how much of the weights is still to fetch."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache


    api = _read_access(variable, name, "model", f.config)
    if api is None:   # HF_HUB_OFFLINE: what the cache holds is all there is
        cached = try_to_load_from_cache(name, "config.json")
        if not isinstance(cached, str):
            raise CheckFailed(f"{variable}={name!r} is not in the Hub cache {constants.HF_HUB_CACHE} and "
                              f"HF_HUB_OFFLINE=1; download it there first (HF_HOME), or unset HF_HUB_OFFLINE",
                              "not cached, offline")
        folder = Path(cached).parent
        f.downloads[variable] = 0
        files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
        return files, _weight_files(variable, name, files, lambda index: (folder / index).read_text()), folder
    token = f.config.hf_token or None

    def download(path: str, revision: str) -> str:
        return with_retries(path, lambda: hf_hub_download(name, path, revision=revision, token=token), attempts=3)

    try:
        info = with_retries("model info", lambda: api.model_info(name, files_metadata=True), attempts=3)
        config_file = download("config.json", info.sha)
    except Exception as exc:
        raise CheckFailed(f"{variable}={name!r}: cannot read its file list or config.json from the Hub at "
                          f"{constants.ENDPOINT} ({describe_failure(exc)}); check HF_ENDPOINT and try again",
                          "Hub read failed") from None
    files = {s.rfilename: s.size or 0 for s in info.siblings or []}
    weights = _weight_files(variable, name, files, lambda index: Path(download(index, info.sha)).read_text())
    f.downloads[variable] = sum(size for path, size in weights.items()
                                if not isinstance(try_to_load_from_cache(name, path, revision=info.sha), str))
    return files, weights, Path(config_file).parent


def _read_access(variable: str, repo_id: str, repo_type: str, config: Config):
    try:
        return check_read_access(variable, repo_id, repo_type, config)
    except HubAccessError as exc:
        raise CheckFailed(str(exc), exc.detail) from None


def _unless_launcher_checked(f: Found) -> None:
    if f.topology.launcher_checked:
        raise CheckedByLauncher()


def _config_folder(config: Config) -> Path:
    """The folder of BASE_MODEL's config.json: its directory, or the HF cache, where the launcher fetched it."""
    from huggingface_hub import hf_hub_download

    name = config.base_model
    if is_local_model(name):
        return Path(name).expanduser()
    try:
        return Path(with_retries("config.json", lambda: hf_hub_download(name, "config.json",
                                                                        token=config.hf_token or None),
                                 attempts=3)).parent
    except Exception as exc:
        raise CheckFailed(f"BASE_MODEL={name!r}: cannot read its config.json ({describe_failure(exc)}); check "
                          f"HF_ENDPOINT and try again", "config.json unreadable") from None


def _weight_files(variable: str, name: str, files: dict[str, int], read: Callable[[str], str]) -> dict[str, int]:
    """The weight files from_pretrained would read, in its order: model.safetensors, else the shards that
    model.safetensors.index.json names (a repo may ship a consolidated copy beside them, which it never reads),
    then the same for pytorch_model.bin; failing those, the top-level safetensors, else the PyTorch .bin files.
    `read(index)`: the text of a listed index file."""
    for single, index in WEIGHT_LAYOUTS:
        if single in files:
            return {single: files[single]}
        if index in files:
            try:
                shards = set(json.loads(read(index))["weight_map"].values())
            except Exception as exc:   # unreachable, not JSON, or no weight_map
                raise CheckFailed(f"{variable}={name!r}: cannot read its {index}, which names the weight files "
                                  f"({describe_failure(exc)}); give a complete model", f"{index} unreadable") from None
            return {n: s for n, s in files.items() if n in shards}
    top = {n: s for n, s in files.items() if "/" not in n}
    safetensors = {n: s for n, s in top.items() if n.endswith(".safetensors")}
    return safetensors or {n: s for n, s in top.items() if n.startswith("pytorch_model") and n.endswith(".bin")}


def _model_shape(variable: str, name: str, folder: Path):
    """The transformers config (its text part, for multimodal models); the raw JSON for an unknown model type."""
    try:
        from transformers import AutoConfig
        shape = AutoConfig.from_pretrained(str(folder)).get_text_config()
    except Exception:   # a model type this transformers doesn't know (custom code): read the numbers directly
        try:
            raw = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise CheckFailed(f"{variable}={name!r}: config.json is unreadable ({type(exc).__name__}); give a "
                              f"complete model", "config.json unreadable") from None
        shape = SimpleNamespace(**{**raw, **raw.get("text_config", {})})
    for attribute in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if not isinstance(getattr(shape, attribute, None), int):
            raise CheckFailed(f"{variable}={name!r}: config.json has no {attribute}; this job trains decoder "
                              f"language models (Llama-style)", f"no {attribute} in config.json")
    return shape


def _matmul_4bit(config: Config, device: str, where: str) -> str:
    """A tiny NF4 matmul through bitsandbytes' own kernels (quantize, dequantize, matmul_4bit, as Linear4bit runs
    them), checked against the same product in float32."""
    import torch

    from .model import compute_dtype

    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception as exc:   # not installed, or its native library does not load for this CUDA
        raise CheckFailed(f"bitsandbytes cannot be imported on {where} ({type(exc).__name__}: {_first_line(exc)}); "
                          f"install the version pinned in requirements.txt for this torch and CUDA",
                          "bitsandbytes does not import") from None
    dtype = compute_dtype(config, device)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 256, generator=generator).to(device, dtype)
    inputs = torch.randn(8, 256, generator=generator).to(device, dtype)
    try:
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", blocksize=64)
        restored = bnbf.dequantize_4bit(packed, state)
        product = bnb.matmul_4bit(inputs, packed.t(), quant_state=state)
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:
        raise CheckFailed(f"bitsandbytes {bnb.__version__} failed a 4-bit NF4 matmul on {where} "
                          f"({type(exc).__name__}: {_first_line(exc)}); install a bitsandbytes built for this GPU "
                          f"and CUDA (the version in requirements.txt)", "4-bit matmul failed") from None
    quantization_error = _relative_error(restored, weight)
    matmul_error = _relative_error(product, inputs.float() @ restored.float().t())
    if not (quantization_error < 0.15 and matmul_error < 0.02):
        raise CheckFailed(f"bitsandbytes {bnb.__version__} computes wrong 4-bit results on {where} (NF4 error "
                          f"{quantization_error:.3f}, matmul error {matmul_error:.3g}); install a bitsandbytes built "
                          f"for this GPU and CUDA", "4-bit matmul wrong") from None
    return f"bitsandbytes {bnb.__version__}: 4-bit NF4 matmul ok"


def _relative_error(got, want) -> float:
    want = want.float()
    return float((got.float() - want).norm() / want.norm().clamp_min(1e-12))


def _machine_trouble(config: Config) -> str:
    import torch
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        return f"no CUDA GPU visible (torch {torch.__version__}, {build})"
    if config.nproc_per_node > torch.cuda.device_count():
        return f"{torch.cuda.device_count()} GPU(s) visible for NPROC_PER_NODE={config.nproc_per_node}"
    return "the batch does not split over the GPUs"


def _driver_version() -> str:
    """The NVIDIA driver's version, from the kernel module (no nvidia-smi needed), else the CUDA driver API's."""
    try:   # "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build ..."
        found = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)*)\s", Path("/proc/driver/nvidia/version").read_text())
        if found:
            return found.group(1)
    except OSError:
        pass
    import torch
    try:
        version = torch._C._cuda_getDriverVersion()
        return f"CUDA driver API {version // 1000}.{version % 1000 // 10}"
    except Exception:
        return "unknown"


def _check_writable(variable: str, path: Path) -> None:
    """Create the directory if missing, then a file in it, then delete that file."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".preflight-"):
            pass
    except OSError as exc:
        raise CheckFailed(f"{variable}={path}: cannot create a file there ({exc.strerror or type(exc).__name__}); "
                          f"point {variable} at a writable directory", "not writable") from None


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _where(places: list[tuple[str, Path]]) -> str:
    return " and ".join(variable for variable, _ in places)


def _gb(size: int) -> str:
    return f"{size / 1e9:,.1f} GB" if size >= 1e8 else f"{size / 1e6:,.1f} MB"


def _clause(line: str) -> str:
    """The start of a problem line, for the table's narrow cell."""
    head = line.split("; ")[0]
    return head if len(head) <= 90 else head[:87] + "..."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""

