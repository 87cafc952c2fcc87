"""The Hugging Face Hub: may HF_TOKEN read a model or dataset and push to HUB_MODEL_ID, retries of transient
failures, and publishing the committed final adapter, tokenizer and model card (job/card.py) in one commit.

Publishing is its own phase: it starts from the store's final/ (never from a retrain), checks the Hub
for a commit of this run before pushing (so a lost response or a restart never pushes twice), and
retries Hub 5xx and timeouts with backoff.
"""
from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from .config import Config, is_hub_id
from .log import Reporter
from .store.run_store import hash_file

T = TypeVar("T")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")
RETRY_ATTEMPTS = 6


class HubAccessError(Exception):
    """The token or repo name cannot work: exit 2 before training. One clear line, never the token; `detail`,
    where given, is the short text of preflight's row."""

    def __init__(self, problem: str, detail: str | None = None):
        super().__init__(problem)
        self.detail = detail


def _api(config: Config):
    from huggingface_hub import HfApi
    return HfApi(token=config.hf_token or False)


def http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _transient(exc: BaseException) -> bool:
    status = http_status(exc)
    if status is not None:
        # 412: the branch moved after we read its head (a push names its parent commit); read it again.
        return status >= 500 or status in (412, 429)
    return isinstance(exc, (OSError, TimeoutError)) or type(exc).__module__.split(".")[0].startswith("httpx")


def with_retries(what: str, call: Callable[[], T], reporter: Reporter | None = None,
                 attempts: int = RETRY_ATTEMPTS, base_delay: float = 1.0) -> T:
    """Retry transient Hub failures (5xx, 429, timeouts, resets) with exponential backoff and full jitter."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:
            if not _transient(exc) or attempt == attempts:
                raise
            delay = random.uniform(0, base_delay * 2 ** (attempt - 1))
            if reporter:
                reporter.event("hub", f"{what} failed ({describe_failure(exc)}); retry {attempt}/{attempts - 1} "
                                      f"in {delay:.1f}s")
            time.sleep(delay)
    raise AssertionError("unreachable")


def describe_failure(exc: BaseException) -> str:
    status = http_status(exc)
    return f"HTTP {status}" if status else type(exc).__name__


def check_hub_access(config: Config) -> None:
    """Before training: a token that exists, can write, and may write to HUB_MODEL_ID's namespace."""
    repo = config.hub_model_id
    if not is_hub_id(repo):
        raise HubAccessError(f"HUB_MODEL_ID={repo!r} is not an allowed Hub repo name (letters, digits, '-', '_', "
                             f"'.'; no '--' or '..'; at most 96 characters per part)")
    if not config.hf_token:
        raise HubAccessError(f"HUB_MODEL_ID={repo!r} is set but HF_TOKEN is empty; give a token with write "
                             f"access (https://huggingface.co/settings/tokens), or unset HUB_MODEL_ID")
    try:
        who = with_retries("whoami", lambda: _api(config).whoami())
    except Exception as exc:
        if http_status(exc) == 401:
            raise _token_rejected("", "create a new write token") from None
        raise
    token = who.get("auth", {}).get("accessToken", {})
    namespace = repo.split("/")[0]
    role = token.get("role")
    if role == "read":
        raise HubAccessError(f"HF_TOKEN is a read-only token; pushing to HUB_MODEL_ID={repo!r} needs a token "
                             f"with write access")
    writable = {who.get("name")} | {o.get("name") for o in who.get("orgs", [])
                                    if o.get("roleInOrg", "write") in ("write", "contributor", "admin")}
    if role == "fineGrained":
        writable = _fine_grained_writable(token.get("fineGrained", {}), who)
    if namespace not in writable and repo not in writable:
        raise HubAccessError(f"HF_TOKEN (user {who.get('name')!r}) cannot write to HUB_MODEL_ID={repo!r}: "
                             f"no write access to namespace {namespace!r}; use your own name or an org "
                             f"you can write to")


def check_read_access(variable: str, repo_id: str, repo_type: str, config: Config):
    """May HF_TOKEN (or no token) read this repo? One line for each way it can't. Returns the HfApi, or None
    under HF_HUB_OFFLINE=1 (only the id's form is checked then)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    kind = "dataset" if repo_type == "dataset" else "model"
    accepted = "a local .jsonl/.json/.parquet file" if kind == "dataset" else "a local model directory"
    if not is_hub_id(repo_id):
        raise HubAccessError(f"{variable}={repo_id!r} is neither {accepted} nor a Hub {kind} id 'user/name'",
                             "not a path or Hub id")
    if constants.HF_HUB_OFFLINE:
        return None
    api = HfApi(token=config.hf_token or None)
    url = f"{constants.ENDPOINT}/{'datasets/' if kind == 'dataset' else ''}{repo_id}"
    try:
        with_retries("access check", lambda: api.auth_check(repo_id, repo_type=repo_type), attempts=3)
    except GatedRepoError:
        if not config.hf_token:
            raise HubAccessError(f"{variable}={repo_id!r} is gated and HF_TOKEN is empty; accept its license at "
                                 f"{url} and set HF_TOKEN to a token of that account", "gated, no token") from None
        raise HubAccessError(f"{variable}={repo_id!r} is gated and the account of HF_TOKEN has no access; accept the "
                             f"license at {url} with the account of HF_TOKEN", "gated, no access") from None
    except RepositoryNotFoundError:
        hint = "check the name, or set HF_TOKEN if it is private" if not config.hf_token else \
            "check the name, and that HF_TOKEN's account can see it if it is private"
        raise HubAccessError(f"{variable}={repo_id!r}: no such {kind} on the Hub ({constants.ENDPOINT}); {hint}",
                             "not found on the Hub") from None
    except Exception as exc:
        if http_status(exc) == 401 and not config.hf_token:
            raise HubAccessError(f"{variable}={repo_id!r}: the Hub at {constants.ENDPOINT} wants a token (401) and "
                                 f"HF_TOKEN is empty; set HF_TOKEN to a token that can read it",
                                 "token needed") from None
        if http_status(exc) == 401:
            raise _token_rejected(f" when reading {variable}={repo_id!r}",
                                  f"create a new one at {constants.ENDPOINT}/settings/tokens",
                                  "HF_TOKEN rejected") from None
        raise HubAccessError(f"{variable}={repo_id!r}: cannot check access on the Hub at {constants.ENDPOINT} "
                             f"({describe_failure(exc)}); check the network and HF_ENDPOINT, or set "
                             f"HF_HUB_OFFLINE=1 with the {kind} in the cache", "Hub unreachable") from None
    return api


def _token_rejected(when: str, remedy: str, detail: str | None = None) -> HubAccessError:
    """The Hub answered 401 to HF_TOKEN (for reading and for pushing alike)."""
    return HubAccessError(f"HF_TOKEN is not a valid Hugging Face token (the Hub answered 401{when}); {remedy}",
                          detail)


def _fine_grained_writable(fine: dict[str, Any], who: dict[str, Any]) -> set[str]:
    """Namespaces and repos a fine-grained token may write to."""
    names: set[str] = set()
    if "repo.write" in fine.get("global", []):
        names.add(who.get("name"))
    for scope in fine.get("scoped", []):
        if "repo.write" in scope.get("permissions", []):
            entity = scope.get("entity", {})
            names.add(entity.get("name"))
    return names


def commit_title(config: Config, merged: bool = False) -> str:
    what = "merged 16-bit weights" if merged else "adapter, tokenizer and model card"
    return f"persona-qlora run {config.resolved_run_id}: {what}"


def publish(config: Config, reporter: Reporter, final_dir: Path) -> str:
    """Push the adapter, tokenizer and card from final_dir in one commit; returns the commit URL.

    A commit of this run already on the branch (a push whose answer was lost, or a restart after a crash
    between push and status) is found and reused, so the Hub never gets the same run twice.
    """
    api = _api(config)
    repo = config.hub_model_id
    with_retries("create repo", lambda: api.create_repo(repo, private=config.hub_private_repo, exist_ok=True),
                 reporter)
    if config.hub_revision != "main":
        with_retries("create branch",
                     lambda: api.create_branch(repo, branch=config.hub_revision, exist_ok=True), reporter)
    _, adapter = hash_file(final_dir / ADAPTER_FILES[0])
    url = _push_once(config, reporter, repo, config.hub_revision, adapter,
                     lambda stage: _stage_adapter(config, final_dir, stage))
    if config.push_merged:
        url_merged = _push_once(config, reporter, repo, config.hub_merged_revision, adapter,
                                lambda stage: _stage_merged(config, final_dir, stage), merged=True)
        reporter.event("hub", "merged 16-bit weights pushed", revision=config.hub_merged_revision, url=url_merged)
    return url


def _push_once(config: Config, reporter: Reporter, repo: str, revision: str, adapter_sha256: str,
               stage: Callable[[Path], None], merged: bool = False) -> str:
    api = _api(config)
    if merged and revision != "main":
        with_retries("create branch", lambda: api.create_branch(repo, branch=revision, exist_ok=True), reporter)
    title = commit_title(config, merged)
    ours = {"RUN_ID": config.resolved_run_id, "adapter_sha256": adapter_sha256}

    def look() -> tuple[str | None, str | None]:
        return _find_run_commit(api, repo, revision, title, ours, reporter)

    found, _ = look()
    if found:
        reporter.event("hub", "this run is already on the Hub; not pushing again", revision=revision, url=found)
        return found
    with tempfile.TemporaryDirectory(prefix="publish-") as tmp:
        staging = Path(tmp)
        stage(staging)

        def push() -> str:
            found, head = look()
            if found:  # the previous attempt landed; its answer was lost
                return found
            try:
                # parent_commit pins the branch head we just read: if the Hub commits this push but its answer
                # is lost, huggingface_hub's own retry of the commit (upload_folder retries it) gets 412 instead
                # of committing the same files a second time.
                info = api.upload_folder(
                    repo_id=repo, folder_path=staging, revision=revision, commit_message=title, parent_commit=head,
                    # A merged branch starts as a copy of main: drop the adapter there, so it loads as a plain model.
                    delete_patterns=list(ADAPTER_FILES) if merged else None,
                    commit_description=" ".join(f"{k}={v}" for k, v in ours.items())
                    + f" fingerprint={config.fingerprint()}")
            except Exception:
                found, _ = look()
                if found:  # it landed, and what failed was its answer or the client's retry of it
                    return found
                raise
            return _commit_url(repo, revision, getattr(info, "oid", None)) if info else ""

        url = with_retries("push", push, reporter)
    reporter.event("hub", "pushed", repo=repo, revision=revision, url=url)
    return url


def _find_run_commit(api, repo: str, revision: str, title: str, ours: dict[str, str],
                     reporter: Reporter) -> tuple[str | None, str | None]:
    """(URL of the commit on `revision` that pushed this run's adapter, or None; the branch head, or None).

    A commit is this run's when its title is this push's and its description names the run's RUN_ID and the
    sha256 of the adapter it carries: a different adapter under the same RUN_ID (the store was wiped and the run
    trained again) is pushed anew."""
    from huggingface_hub.errors import RevisionNotFoundError
    try:
        commits = with_retries("list commits", lambda: api.list_repo_commits(repo, revision=revision), reporter)
    except RevisionNotFoundError:
        return None, None
    head = commits[0].commit_id if commits else None
    for commit in commits:
        fields = dict(word.split("=", 1) for word in (commit.message or "").split() if "=" in word)
        if commit.title == title and all(fields.get(k) == v for k, v in ours.items()):
            return _commit_url(repo, revision, commit.commit_id), head
    return None, head


def _commit_url(repo: str, revision: str, oid: str | None) -> str:
    from huggingface_hub import constants
    return f"{constants.ENDPOINT}/{repo}/commit/{oid}" if oid else f"{constants.ENDPOINT}/{repo}/tree/{revision}"


def _stage_card(config: Config, final_dir: Path, stage: Path, merged: bool = False) -> None:
    """The model card and the picture it shows (loss_curve.png, where it was drawn)."""
    from .card import model_card
    from .plot import LOSS_CURVE
    if (final_dir / LOSS_CURVE).exists():
        shutil.copy2(final_dir / LOSS_CURVE, stage / LOSS_CURVE)
    (stage / "README.md").write_text(model_card(config, final_dir, merged=merged))


def _stage_adapter(config: Config, final_dir: Path, stage: Path) -> None:
    for name in ADAPTER_FILES + TOKENIZER_FILES:
        if (final_dir / name).exists():
            shutil.copy2(final_dir / name, stage / name)
    missing = [n for n in ADAPTER_FILES if not (stage / n).exists()]
    if missing:
        raise FileNotFoundError(f"final adapter incomplete in {final_dir}: missing {missing}")
    _stage_card(config, final_dir, stage)


def _stage_merged(config: Config, final_dir: Path, stage: Path) -> None:
    """Merge the adapter into the 16-bit base weights (not dequantized 4-bit ones) and save them."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import device_dtype, grow_vocabulary

    dtype = device_dtype("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(final_dir)
    base = AutoModelForCausalLM.from_pretrained(config.base_model, dtype=dtype, token=config.hf_token or None,
                                                low_cpu_mem_usage=True)
    grow_vocabulary(base, len(tokenizer))
    merged = PeftModel.from_pretrained(base, final_dir).merge_and_unload()
    merged.save_pretrained(stage)
    tokenizer.save_pretrained(stage)
    _stage_card(config, final_dir, stage, merged=True)
