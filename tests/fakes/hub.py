"""The Hugging Face Hub as the job meets it: a real, in-memory HTTP server for the real ``huggingface_hub``
client (version pinned in constraints.txt), reached through ``HF_ENDPOINT`` in a subprocess, or ``endpoint=`` /
the ``hub_server`` fixture in-process.

It answers what the job and its tests call, and refuses what the real Hub refuses:

* ``whoami``                                   GET  /api/whoami-v2
* ``create_repo`` / ``create_branch``          POST /api/repos/create, POST /api/{type}s/{id}/branch/{branch}
* ``model_info`` / ``dataset_info``            GET  /api/{type}s/{id}[/revision/{rev}]
* ``list_repo_files`` / ``list_repo_tree``     GET  /api/{type}s/{id}/tree/{rev}[/{path}]
* ``get_paths_info``                           POST /api/{type}s/{id}/paths-info/{rev}
* ``list_repo_commits``                        GET  /api/{type}s/{id}/commits/{rev}  (Link-header pagination)
* ``auth_check``                               GET  /api/{type}s/{id}/auth-check[/write]
* ``hf_hub_download`` / ``snapshot_download``  HEAD|GET /[{type}s/]{id}/resolve/{rev}/{path}  (Range supported)
* ``upload_folder`` / ``create_commit``, as huggingface_hub drives them without Xet:
    1. POST /api/validate-yaml: the README's metadata; a ``base_model`` that is not a Hub repo id is refused;
    2. POST /api/{type}s/{id}/preupload/{rev}: ``lfs`` for a file above 10 MiB, for a binary file (a NUL byte or
       bytes that are not UTF-8 in its first 512 bytes: safetensors, pt, png, bin...) and for a path the branch's
       .gitattributes sends to LFS; ``regular`` otherwise;
    3. the git-LFS batch API for the ``lfs`` files: POST /{id}.git/info/lfs/objects/batch hands out one upload
       URL per object the server lacks (a presigned storage URL: it refuses an Authorization header), the client
       PUTs the bytes there (sha256 and size checked), then POSTs .../objects/verify with its token;
    4. POST /api/{type}s/{id}/commit/{rev} (NDJSON): ``file`` operations inline (base64) for regular files only,
       ``lfsFile`` operations naming uploaded objects, deletions; ``parentCommit`` is honoured (412 when the
       branch moved), and README.md's metadata is checked again.

Xet is not served. With ``hf_xet`` installed and enabled, the client sends every ``lfs`` file through Xet storage,
whose protocol this server does not speak: it answers the Xet token request with 501. ``configure_hf_client`` and
``subprocess_env`` therefore set ``HF_HUB_DISABLE_XET=1``, which sends the client down the LFS path above (the
Hub accepts both). The job in production, with hf_xet installed, uploads through Xet and commits through
huggingface_hub's pipelined ``upload_folder``, which retries a commit whose answer was lost; ``lose_commit_responses``
reproduces that answer going missing, for either path.

State lives in memory and is inspectable (``repos``, ``files()``, ``commits()``); every request is logged raw
(``request_log``) and counted per endpoint (``count()``); faults can be injected per endpoint (``fail_next()``,
``fail_next_commits()``, ``lose_commit_responses()``).

Published repos that a test reads (a base model, a dataset) are seeded with ``add_repo()``: public, private or
gated like the Hub's gated models (``gated="manual"`` / ``"auto"``; ``model_info`` shows it, and auth-check and
downloads answer 401/403 ``GatedRepo`` to anyone not in ``granted``), with files of real content and, for a
listing whose sizes matter but whose bytes must not be held in memory, ``placeholders`` (LFS files of a given
size whose content the server does not hold: downloading one answers 404).
"""

from __future__ import annotations

import base64
import binascii
import collections
import datetime as _dt
import fnmatch
import hashlib
import http.server
import json
import os
import re
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

__all__ = [
    "DEFAULT_TOKENS",
    "HubServer",
    "RequestRecord",
    "configure_hf_client",
    "hub_server",
]

# Tokens handy for tests: alice (write, member of org "acme"), alice's read token, bob (write).
DEFAULT_TOKENS: dict[str, dict] = {
    "hf_alice_write": {"user": "alice", "role": "write", "orgs": ["acme"]},
    "hf_alice_read": {"user": "alice", "role": "read", "orgs": ["acme"]},
    "hf_bob_write": {"user": "bob", "role": "write", "orgs": []},
}

# Same rules as the Hub (and huggingface_hub's validate_repo_id): [A-Za-z0-9_.-], 1..96 chars,
# must not start/end with '-' or '.', no '--' or '..', must not end with '.git'.
_NAME_RE = re.compile(r"^(?=.{1,96}$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_BAD_BRANCH_CHARS = re.compile(r"[\x00-\x20~^:?*\[\\\x7f]")
_REPO_TYPES = {"models": "model", "datasets": "dataset"}
_URL_PREFIX = {"model": "", "dataset": "datasets/"}
# The largest file the Hub takes inline in a commit; anything larger goes through LFS (or Xet).
REGULAR_FILE_LIMIT = 10 * 1024 * 1024
SAMPLE_BYTES = 512  # what the client sends of each file to /preupload
LFS_MEDIA_TYPE = "application/vnd.git-lfs+json"
_BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")

# Close to what the Hub puts in a fresh repo's initial commit.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack "
        "*.npy *.npz *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors "
        "saved_model/**/* *.tar.* *.tar *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*"
    ).split()
).encode()


def valid_repo_id(repo_id: Any) -> bool:
    """A Hub repo id: ``name`` (the oldest canonical models) or ``namespace/name``, each part by the Hub's
    naming rule. A local path (``/models/llama``, ``./out``) or a URL is not one."""
    if not isinstance(repo_id, str):
        return False
    parts = repo_id.split("/")
    return 1 <= len(parts) <= 2 and all(
        _NAME_RE.match(part) and "--" not in part and ".." not in part and not part.endswith(".git")
        for part in parts)


def is_binary(sample: bytes) -> bool:
    """What the Hub decides from a file's first bytes: a NUL byte, or bytes that are not UTF-8 text."""
    if b"\x00" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(sample) - 3  # a character cut at the end of the sample is still text
    return False


def _lfs_patterns(gitattributes: bytes | None) -> list[str]:
    patterns = []
    for line in (gitattributes or b"").decode(errors="replace").splitlines():
        fields = line.split()
        if len(fields) > 1 and "filter=lfs" in fields[1:]:
            patterns.append(fields[0])
    return patterns


def _matches(pattern: str, path: str) -> bool:
    """gitattributes matching, as far as the Hub's default patterns need it."""
    if pattern.endswith("/**/*"):
        return path.startswith(pattern[:-4])
    if "/" in pattern:
        return fnmatch.fnmatchcase(path, pattern)
    return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)


def upload_mode(path: str, size: int, sample: bytes, gitattributes: bytes | None) -> str:
    """``lfs`` or ``regular``, as the Hub's /preupload answers for a file going to a branch with this
    .gitattributes."""
    if size == 0:
        return "regular"
    if size > REGULAR_FILE_LIMIT or is_binary(sample[:SAMPLE_BYTES]):
        return "lfs"
    return "lfs" if any(_matches(p, path) for p in _lfs_patterns(gitattributes)) else "regular"


def metadata_errors(readme: str) -> list[str]:
    """What the Hub's YAML validation says about a README.md's front matter (the fields the job writes)."""
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme, flags=re.S)
    if not m:
        return []
    try:
        import yaml

        meta = yaml.safe_load(m.group(1))
    except Exception as e:  # yaml.YAMLError
        return [f"Invalid YAML in README.md: {e}"]
    if meta is None:
        return []
    if not isinstance(meta, dict):
        return ["YAML metadata must be a mapping"]
    errors = []
    if "base_model" in meta:
        value = meta["base_model"]
        for item in value if isinstance(value, list) else [value]:
            if not valid_repo_id(item):
                errors.append(f'"base_model" with value {json.dumps(item, default=str)} is not a valid model id: '
                              f'use the id of a model on the Hub, e.g. "meta-llama/Llama-2-7b-hf"')
    relation = meta.get("base_model_relation")
    if relation is not None and relation not in _BASE_MODEL_RELATIONS:
        errors.append(f'"base_model_relation" must be one of {", ".join(_BASE_MODEL_RELATIONS)}')
    return errors


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def git_blob_oid(data: bytes) -> str:
    """git's blob id: sha1(b"blob <len>\\0" + data) -- what the client computes for regular files."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


# --------------------------------------------------------------------------------------- state


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str  # content key in HubServer.blobs
    content_oid: str  # git blob id of the content itself
    lfs: bool = False

    @property
    def git_oid(self) -> str:  # what git (and the tree API) reports: the pointer's blob id for LFS files
        return git_blob_oid(_lfs_pointer(self.sha256, self.size)) if self.lfs else self.content_oid

    def tree_json(self, path: str) -> dict:
        d: dict[str, Any] = {"type": "file", "oid": self.git_oid, "size": self.size, "path": path}
        if self.lfs:
            d["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(_lfs_pointer(self.sha256, self.size))}
        return d


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    author: str
    date: str
    tree: dict[str, FileEntry]

    def as_dict(self) -> dict:
        return {
            "oid": self.oid,
            "message": self.title,
            "description": self.description,
            "author": self.author,
            "date": self.date,
            "parent": self.parent,
        }


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    created_at: str
    owner: str
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)  # oid -> commit
    gated: bool | str = False  # False, "auto" or "manual", as the Hub's model_info shows it
    granted: set[str] = field(default_factory=set)  # users whose access request to a gated repo was accepted

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def resolve(self, revision: str) -> tuple[str, str | None] | None:
        """revision -> (commit oid, branch name or None); None if unknown."""
        if revision.startswith("refs/heads/"):
            revision = revision[len("refs/heads/") :]
        if revision in self.branches:
            return self.branches[revision], revision
        if _COMMIT_RE.match(revision) and revision in self.commits:
            return revision, None
        return None

    def history(self, oid: str) -> list[Commit]:
        out = []
        cur: str | None = oid
        while cur is not None:
            c = self.commits[cur]
            out.append(c)
            cur = c.parent
        return out


@dataclass
class RequestRecord:
    """One raw request as received. ``headers`` keeps the original case and order."""

    method: str
    path: str  # raw path + query string, as sent (still URL-quoted)
    headers: list[tuple[str, str]]
    body: bytes
    endpoint: str = "unknown"
    status: int | None = None  # status actually sent back (None if the connection was dropped)
    injected: bool = False  # a fault from fail_next() was applied to this request

    def header(self, name: str, default: str | None = None) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return default

    def decoded_payloads(self) -> list[bytes]:
        """Base64 payloads carried inside the body, decoded (commit file contents, preupload samples)."""
        out: list[bytes] = []
        if not self.body or self.body[:1] not in (b"{", b"["):
            return out
        for line in self.body.splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            stack = [item]
            while stack:
                cur = stack.pop()
                if isinstance(cur, dict):
                    for k, v in cur.items():
                        if k in ("content", "sample") and isinstance(v, str):
                            try:
                                out.append(base64.b64decode(v, validate=True))
                            except (binascii.Error, ValueError):
                                pass
                        else:
                            stack.append(v)
                elif isinstance(cur, list):
                    stack.extend(cur)
        return out


@dataclass
class _Fault:
    status: int | None  # None: no error, just the delay; 0: drop the connection without answering
    delay: float
    after_apply: bool  # process the request for real, then answer with the fault anyway


class _Resp:
    def __init__(self, status: int, body: Any = None, headers: dict[str, str] | None = None):
        self.status = status
        self.headers = dict(headers or {})
        if body is None:
            self.body = b""
        elif isinstance(body, (bytes, bytearray)):
            self.body = bytes(body)
        else:
            self.body = json.dumps(body).encode()
            self.headers.setdefault("Content-Type", "application/json; charset=utf-8")
        self.head_only_length: int | None = None


def _err(status: int, message: str, code: str | None = None, extra_headers: dict | None = None) -> _Resp:
    headers = {"X-Error-Message": " ".join(message.split())}  # a header is one line; the body keeps the lines
    if code:
        headers["X-Error-Code"] = code
    headers.update(extra_headers or {})
    return _Resp(status, {"error": message}, headers)


class _HubError(Exception):
    def __init__(self, resp: _Resp):
        self.resp = resp


# --------------------------------------------------------------------------------------- server


class HubServer:
    """In-memory Hugging Face Hub fake. See the module docstring for the covered API.

    ``tokens``: token -> {"user": name, "role": "write" | "read" | "fineGrained",
    "orgs": [org name | {"name": org, "roleInOrg": "read"|"write"|"admin"}], optional "displayName",
    "email", "fullname", "fineGrained": {...}}. A fine-grained token may write iff its fineGrained
    dict mentions "repo.write".
    """

    def __init__(self, tokens: dict[str, dict], *, host: str = "127.0.0.1"):
        self.tokens = tokens
        self.host = host
        self.commits_page_size = 50
        self.repos: dict[str, Repo] = {}  # "user/name" for models, "datasets/user/name" for datasets
        self.blobs: dict[str, bytes] = {}  # sha256 hex -> content
        self.request_log: list[RequestRecord] = []
        self.errors: list[str] = []  # internal server errors (tracebacks): a bug in this fake
        self._counts: collections.Counter[str] = collections.Counter()
        self._faults: dict[str, collections.deque[_Fault]] = collections.defaultdict(collections.deque)
        self._lfs_pending: dict[str, tuple[int, str]] = {}  # sha256 -> (size, signature of its upload URL)
        self._lock = threading.RLock()
        self._seq = 0
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self.endpoint: str | None = None
        self.hf_home: str | os.PathLike | None = None  # set by the hub_server fixture

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        server = self

        class Handler(_Handler):
            hub = server

        httpd = http.server.ThreadingHTTPServer((self.host, 0), Handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self.endpoint = f"http://{self.host}:{httpd.server_address[1]}"
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # unblock keep-alive handler threads
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None

    def __enter__(self) -> "HubServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ test-facing API

    def fail_next(
        self, endpoint: str, n: int = 1, status: int | None = 500, *, delay: float = 0.0, after_apply: bool = False
    ) -> None:
        """Make the next ``n`` requests to ``endpoint`` (a name as in ``count()``) misbehave.

        status: HTTP status to answer (e.g. 500, 503, 429); ``None`` = answer normally after ``delay``
        (a slow server, to trigger client timeouts); ``0`` = close the connection without an answer.
        after_apply: perform the request for real first (e.g. the commit lands), then answer the fault
        -- a lost response.
        """
        with self._lock:
            for _ in range(n):
                self._faults[endpoint].append(_Fault(status, delay, after_apply))

    def fail_next_commits(self, n: int, status: int = 500) -> None:
        self.fail_next("commit", n, status)

    def lose_commit_responses(self, n: int = 1, status: int = 0) -> None:
        """The next ``n`` commits land, but their answers never reach the client: the connection closes without
        one (``status=0``, what a dropped connection or a restarted load balancer does), or a gateway answers
        ``status`` (502, 504) after the Hub committed. huggingface_hub's pipelined ``upload_folder`` (the path it
        takes with hf_xet) retries such a commit and so commits the same files a second time, unless the commit
        names its ``parentCommit``; ``create_commit`` passes the failure to its caller."""
        self.fail_next("commit", n, status, after_apply=True)

    def count(self, endpoint: str | None = None) -> int:
        """Requests received for ``endpoint`` (all requests if None), injected failures included.

        Endpoint names: whoami, create_repo, create_branch, repo_info, tree, paths_info, commits_list,
        validate_yaml, preupload, lfs_batch, lfs_upload, lfs_verify, commit, resolve (HEAD+GET; also
        resolve_head/resolve_get), auth_check, xet_token, agent_harnesses, unknown.
        """
        with self._lock:
            if endpoint is None:
                return sum(v for k, v in self._counts.items() if k not in ("resolve_head", "resolve_get"))
            return self._counts[endpoint]

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self.request_log.clear()

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, *, repo_type: str = "model",
                 private: bool = False, gated: bool | str = False, granted: tuple[str, ...] = (),
                 placeholders: dict[str, int] | None = None) -> Repo:
        """Seed a published repo (owned by its namespace) with one commit holding ``files``.

        ``gated``: False, "auto" or "manual"; only the users in ``granted`` (and none anonymous) pass its
        auth-check or download its files. ``placeholders``: path -> size of LFS files that are listed with that
        size, as a multi-GB weight file is, but whose content this server does not hold (a download answers 404).
        """
        if gated not in (False, "auto", "manual"):
            raise ValueError(f"gated must be False, 'auto' or 'manual', not {gated!r}")
        with self._lock:
            key = self._key(repo_id, repo_type)
            if key in self.repos:
                raise ValueError(f"repo exists: {key}")
            repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private, created_at=_now(),
                        owner=repo_id.split("/")[0], gated=gated, granted=set(granted))
            tree = {".gitattributes": self._store(DEFAULT_GITATTRIBUTES, False)}
            for path, data in (files or {}).items():
                lfs = upload_mode(path, len(data), data[:SAMPLE_BYTES], DEFAULT_GITATTRIBUTES) == "lfs"
                tree[path] = self._store(data, lfs=lfs)
            for path, size in (placeholders or {}).items():
                sha = hashlib.sha256(f"placeholder {repo_id} {path} {size}".encode()).hexdigest()
                tree[path] = FileEntry(size=size, sha256=sha, content_oid=git_blob_oid(sha.encode()), lfs=True)
            commit = self._make_commit(repo, None, "initial commit", "", repo.owner, tree)
            repo.branches["main"] = commit.oid
            self.repos[key] = repo
            return repo

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        with self._lock:
            repo = self._repo_or_raise(repo_id, repo_type)
            resolved = repo.resolve(revision)
            if resolved is None:
                raise KeyError(f"unknown revision {revision!r} of {repo_id}")
            tree = repo.commits[resolved[0]].tree
            return {path: self.blobs[e.sha256] for path, e in sorted(tree.items()) if e.sha256 in self.blobs}

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[dict]:
        """Newest first; each {"oid", "message" (the summary/title), "description", "author", "date", "parent"}.
        Includes the Hub's automatic "initial commit" (which adds .gitattributes) at the end."""
        with self._lock:
            repo = self._repo_or_raise(repo_id, repo_type)
            resolved = repo.resolve(revision)
            if resolved is None:
                raise KeyError(f"unknown revision {revision!r} of {repo_id}")
            return [c.as_dict() for c in repo.history(resolved[0])]

    def branches(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        with self._lock:
            return dict(self._repo_or_raise(repo_id, repo_type).branches)

    def leaks(self, secret: str | bytes, *, include_authorization: bool = False) -> list[RequestRecord]:
        """Requests whose path, headers, body, or base64 payloads inside the body (commit file contents,
        preupload samples) contain ``secret``. The Authorization header legitimately carries the token:
        it is skipped unless ``include_authorization``."""
        needle = secret.encode() if isinstance(secret, str) else secret
        hits = []
        with self._lock:
            log = list(self.request_log)
        for rec in log:
            haystacks = [rec.path.encode(), unquote(rec.path).encode(), rec.body, *rec.decoded_payloads()]
            for k, v in rec.headers:
                if k.lower() == "authorization" and not include_authorization:
                    continue
                haystacks.append(f"{k}: {v}".encode("latin-1", "replace"))
            if any(needle in h for h in haystacks):
                hits.append(rec)
        return hits

    def subprocess_env(self, *, hf_home: str | os.PathLike, token: str | None = None, base: dict | None = None) -> dict:
        """Environment for a child process using this server: HF_ENDPOINT, isolated HF_HOME, telemetry off,
        offline mode unset, Xet off (this server takes LFS uploads only), HF_TOKEN set (or removed)."""
        env = dict(os.environ if base is None else base)
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                    "HF_TOKEN_PATH", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN", "HF_XET_CACHE", "HF_ASSETS_CACHE"):
            env.pop(var, None)
        env.update(
            HF_ENDPOINT=self.endpoint or "",
            HF_HOME=str(hf_home),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_UPDATE_CHECK="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_XET="1",
        )
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    # ------------------------------------------------------------------ internals: helpers

    @staticmethod
    def _key(repo_id: str, repo_type: str) -> str:
        return _URL_PREFIX[repo_type] + repo_id

    def _repo_or_raise(self, repo_id: str, repo_type: str) -> Repo:
        key = self._key(repo_id, repo_type)
        if key not in self.repos:
            raise KeyError(f"no such repo: {key}")
        return self.repos[key]

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _take_fault(self, endpoint: str) -> _Fault | None:
        with self._lock:
            q = self._faults.get(endpoint)
            return q.popleft() if q else None

    def _store(self, data: bytes, lfs: bool) -> FileEntry:
        sha = hashlib.sha256(data).hexdigest()
        self.blobs.setdefault(sha, data)
        return FileEntry(size=len(data), sha256=sha, content_oid=git_blob_oid(data), lfs=lfs)

    def _make_commit(self, repo: Repo, parent: str | None, title: str, desc: str, author: str, tree: dict) -> Commit:
        date = _now()
        material = json.dumps(
            [parent, title, desc, author, date, self._next_seq(), sorted((p, e.git_oid) for p, e in tree.items())]
        ).encode()
        commit = Commit(hashlib.sha1(material).hexdigest(), parent, title, desc, author, date, dict(tree))
        repo.commits[commit.oid] = commit
        return commit

    # -- identity & permissions

    def _identity(self, token: str | None) -> dict | None:
        if token is None:
            return None
        cfg = self.tokens.get(token)
        if cfg is None:
            raise _HubError(_err(401, "Invalid credentials in Authorization header"))
        return cfg

    @staticmethod
    def _orgs(cfg: dict) -> list[dict]:
        out = []
        for org in cfg.get("orgs", []):
            out.append({"name": org, "roleInOrg": "write"} if isinstance(org, str) else dict(org))
        return out

    def _token_can_write(self, cfg: dict) -> bool:
        role = cfg.get("role", "read")
        if role in ("write", "admin"):
            return True
        if role == "fineGrained":
            return "repo.write" in json.dumps(cfg.get("fineGrained", {}))
        return False

    def _member_namespaces(self, cfg: dict | None) -> set[str]:
        if cfg is None:
            return set()
        return {cfg["user"], *(o["name"] for o in self._orgs(cfg))}

    def _writable_namespaces(self, cfg: dict | None) -> set[str]:
        if cfg is None or not self._token_can_write(cfg):
            return set()
        return {cfg["user"], *(o["name"] for o in self._orgs(cfg) if o.get("roleInOrg", "write") != "read")}

    def _repo_for_read(self, cfg: dict | None, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get(self._key(repo_id, repo_type))
        if repo is None or (repo.private and repo.namespace not in self._member_namespaces(cfg)):
            status = 401 if cfg is None else 404
            raise _HubError(_err(status, "Repository not found", "RepoNotFound"))
        return repo

    def _repo_for_write(self, cfg: dict | None, repo_type: str, repo_id: str, action: str) -> Repo:
        repo = self._repo_for_read(cfg, repo_type, repo_id)
        if cfg is None:
            raise _HubError(_err(401, "You must be authenticated to " + action))
        if repo.namespace not in self._writable_namespaces(cfg):
            if not self._token_can_write(cfg):
                msg = f"You don't have the rights to {action} in {repo_id}: this is a read-only token"
            else:
                msg = f"You don't have the rights to {action} in {repo_id}"
            raise _HubError(_err(403, msg))
        return repo

    def _check_gate(self, cfg: dict | None, repo: Repo) -> None:
        """A gated repo's files are for the users whose access was granted; its metadata is public."""
        if not repo.gated or (cfg is not None and cfg["user"] in repo.granted):
            return
        kind = repo.repo_type
        if cfg is None:
            raise _HubError(_err(401, f"Access to {kind} {repo.repo_id} is restricted. You must have access to it "
                                      "and be authenticated to access it. Please log in.", "GatedRepo"))
        raise _HubError(_err(403, f"Access to {kind} {repo.repo_id} is restricted and you are not in the authorized "
                                  f"list. Visit {_URL_PREFIX[kind]}{repo.repo_id} to ask for access.", "GatedRepo"))

    @staticmethod
    def _resolve(repo: Repo, revision: str) -> tuple[str, str | None]:
        resolved = repo.resolve(revision)
        if resolved is None:
            raise _HubError(_err(404, f"Invalid rev id: {revision}", "RevisionNotFound"))
        return resolved

    # ------------------------------------------------------------------ routing

    def _route(self, method: str, path: str) -> tuple[str, Callable[..., _Resp] | None, dict]:
        segs = [unquote(s) for s in path.split("/")[1:]]
        if segs and segs[-1] == "" and len(segs) > 1:
            segs = segs[:-1]
        if segs[:1] == ["api"]:
            rest = segs[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return "whoami", self._h_whoami, {}
            if rest == ["repos", "create"] and method == "POST":
                return "create_repo", self._h_create_repo, {}
            if rest == ["validate-yaml"] and method == "POST":
                return "validate_yaml", self._h_validate_yaml, {}
            if rest == ["agent-harnesses"] and method == "GET":
                return "agent_harnesses", lambda **_: _Resp(200, {"standardEnvVars": [], "harnesses": {}}), {}
            if len(rest) >= 3 and rest[0] in _REPO_TYPES:
                p = {"repo_type": _REPO_TYPES[rest[0]], "repo_id": f"{rest[1]}/{rest[2]}"}
                tail = rest[3:]
                op = tail[0] if tail else None
                if op is None and method == "GET":
                    return "repo_info", self._h_repo_info, {**p, "revision": None}
                if op == "revision" and len(tail) >= 2 and method == "GET":
                    return "repo_info", self._h_repo_info, {**p, "revision": "/".join(tail[1:])}
                if op == "tree" and len(tail) >= 2 and method == "GET":
                    return "tree", self._h_tree, {**p, "revision": tail[1], "subpath": "/".join(tail[2:])}
                if op == "paths-info" and len(tail) >= 2 and method == "POST":
                    return "paths_info", self._h_paths_info, {**p, "revision": tail[1]}
                if op == "commits" and len(tail) >= 2 and method == "GET":
                    return "commits_list", self._h_commits, {**p, "revision": "/".join(tail[1:])}
                if op == "preupload" and len(tail) >= 2 and method == "POST":
                    return "preupload", self._h_preupload, {**p, "revision": "/".join(tail[1:])}
                if op == "commit" and len(tail) >= 2 and method == "POST":
                    return "commit", self._h_commit, {**p, "revision": "/".join(tail[1:])}
                if op == "branch" and len(tail) >= 2 and method == "POST":
                    return "create_branch", self._h_branch, {**p, "branch": "/".join(tail[1:])}
                if op in ("xet-write-token", "xet-read-token"):
                    return "xet_token", self._h_xet, p
                if op == "auth-check" and len(tail) <= 2 and tail[1:] in ([], ["write"]) and method == "GET":
                    return "auth_check", self._h_auth_check, {**p, "write": tail[1:] == ["write"]}
            return "unknown", None, {}
        # The storage behind the LFS batch API: a presigned URL, as the Hub hands out for its S3 bucket.
        if segs[:1] == ["__lfs_storage__"] and len(segs) == 2 and method == "PUT":
            return "lfs_upload", self._h_lfs_upload, {"oid": segs[1]}
        # /[datasets/]ns/name.git/info/lfs/objects/(batch|verify)
        if segs[-3:-1] == ["lfs", "objects"] and segs[-4:-3] == ["info"] and method == "POST":
            head = segs[:-4]
            repo_type = "model"
            if head and head[0] == "datasets":
                repo_type, head = "dataset", head[1:]
            if len(head) == 2 and head[1].endswith(".git") and segs[-1] in ("batch", "verify"):
                handler = self._h_lfs_batch if segs[-1] == "batch" else self._h_lfs_verify
                return f"lfs_{segs[-1]}", handler, {"repo_type": repo_type, "repo_id": f"{head[0]}/{head[1][:-4]}"}
        # /[datasets/]ns/name/resolve/rev/path...
        repo_type, rest = "model", segs
        if rest and rest[0] == "datasets":
            repo_type, rest = _REPO_TYPES[rest[0]], rest[1:]
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            name = "resolve_head" if method == "HEAD" else "resolve_get"
            return name, self._h_resolve, {
                "repo_type": repo_type,
                "repo_id": f"{rest[0]}/{rest[1]}",
                "revision": rest[3],
                "filename": "/".join(rest[4:]),
            }
        return "unknown", None, {}

    # ------------------------------------------------------------------ handlers
    # Each handler gets: method, query (dict of lists), body (bytes), headers (Message), base (str), cfg (token
    # identity or None), plus route params. Handlers run under self._lock.

    def _h_whoami(self, cfg, **_) -> _Resp:
        if cfg is None:
            return _err(401, "Invalid credentials in Authorization header")
        user = cfg["user"]
        orgs = [
            {
                "type": "org",
                "id": hashlib.md5(o["name"].encode()).hexdigest()[:24],
                "name": o["name"],
                "fullname": o.get("fullname", o["name"]),
                "email": None,
                "canPay": False,
                "avatarUrl": f"https://cdn-avatars.huggingface.co/{o['name']}.png",
                "periodEnd": None,
                "roleInOrg": o.get("roleInOrg", "write"),
            }
            for o in self._orgs(cfg)
        ]
        access_token: dict[str, Any] = {
            "displayName": cfg.get("displayName", f"{user}-{cfg.get('role', 'read')}"),
            "role": cfg.get("role", "read"),
            "createdAt": "2024-01-01T00:00:00.000Z",
        }
        if cfg.get("role") == "fineGrained":
            access_token["fineGrained"] = cfg.get("fineGrained", {"canReadGatedRepos": False, "global": [], "scoped": []})
        return _Resp(
            200,
            {
                "type": "user",
                "id": hashlib.md5(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": cfg.get("fullname", user.title()),
                "email": cfg.get("email", f"{user}@example.com"),
                "emailVerified": True,
                "canPay": False,
                "periodEnd": None,
                "isPro": False,
                "avatarUrl": f"https://cdn-avatars.huggingface.co/{user}.png",
                "orgs": orgs,
                "auth": {"type": "access_token", "accessToken": access_token},
            },
        )

    def _h_create_repo(self, cfg, body, base, **_) -> _Resp:
        if cfg is None:
            return _err(401, "You must be authenticated to create a repo")
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            return _err(400, "Invalid JSON body")
        name = payload.get("name")
        namespace = payload.get("organization") or cfg["user"]
        repo_type = payload.get("type") or "model"
        if repo_type not in ("model", "dataset"):
            return _err(400, f"Unsupported repo type for this fake hub: {repo_type}")
        if not self._token_can_write(cfg):
            return _err(403, f"You don't have the rights to create a {repo_type} under the namespace \"{namespace}\": "
                             "this is a read-only token")
        if namespace not in self._writable_namespaces(cfg):
            return _err(403, f"You don't have the rights to create a {repo_type} under the namespace \"{namespace}\"")
        for part in (namespace, name):
            if (
                not isinstance(part, str)
                or not _NAME_RE.match(part)
                or "--" in part
                or ".." in part
                or part.endswith(".git")
            ):
                return _err(400, f"Invalid repo name: {namespace}/{name}. Repo names can only contain alphanumeric "
                                 "chars, '-', '_' and '.', cannot start or end with '-' or '.', cannot contain '--' "
                                 "or '..' and cannot be longer than 96 chars.")
        repo_id = f"{namespace}/{name}"
        url = f"{base}/{_URL_PREFIX[repo_type]}{repo_id}"
        key = self._key(repo_id, repo_type)
        if key in self.repos:
            msg = f"You already created this {repo_type} repo"
            return _Resp(409, {"error": msg, "url": url}, {"X-Error-Message": msg})
        visibility = payload.get("visibility")
        private = visibility in ("private", "protected") if visibility is not None else bool(payload.get("private"))
        repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private, created_at=_now(), owner=cfg["user"])
        init = self._make_commit(
            repo, None, "initial commit", "", cfg["user"], {".gitattributes": self._store(DEFAULT_GITATTRIBUTES, False)}
        )
        repo.branches["main"] = init.oid
        self.repos[key] = repo
        return _Resp(200, {"url": url, "name": repo_id, "id": uuid.uuid4().hex[:24]})

    def _h_validate_yaml(self, body, **_) -> _Resp:
        content = json.loads(body or b"{}").get("content", "")
        errors = metadata_errors(content)
        return _Resp(400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []})

    def _h_repo_info(self, cfg, repo_type, repo_id, revision, query, **_) -> _Resp:
        repo = self._repo_for_read(cfg, repo_type, repo_id)
        oid, _branch = self._resolve(repo, revision or "main")
        commit = repo.commits[oid]
        with_blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, e in sorted(commit.tree.items()):
            s: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                s.update(size=e.size, blobId=e.git_oid)
                if e.lfs:
                    s["lfs"] = {"size": e.size, "sha256": e.sha256, "pointerSize": len(_lfs_pointer(e.sha256, e.size))}
            siblings.append(s)
        info = {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo.namespace,
            "sha": oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.tree.values()),
        }
        if repo_type == "model":
            info.update(modelId=repo_id, spaces=[])
        return _Resp(200, info)

    def _h_auth_check(self, cfg, repo_type, repo_id, write, **_) -> _Resp:
        # The Hub's answers: 401/404 RepoNotFound for a repo the caller can't see, 401/403 GatedRepo for a gated
        # one without granted access, 403 for write without the right; 200 with an empty body otherwise.
        repo = self._repo_for_read(cfg, repo_type, repo_id)
        if write:
            self._repo_for_write(cfg, repo_type, repo_id, "write to this repo")
        else:
            self._check_gate(cfg, repo)
        return _Resp(200, {})

    def _last_commit(self, repo: Repo, head: str, path: str, is_dir: bool) -> dict:
        def sig(c: Commit):
            if is_dir:
                return sorted((p, e.git_oid) for p, e in c.tree.items() if p.startswith(path + "/"))
            e = c.tree.get(path)
            return e.git_oid if e else None

        hist = repo.history(head)
        target, last = sig(hist[0]), hist[0]
        for c in hist[1:]:
            if sig(c) != target:
                break
            last = c
        return {"id": last.oid, "title": last.title, "date": last.date}

    def _tree_entries(self, repo: Repo, oid: str, paths: list[str] | None, subpath: str, recursive: bool,
                      expand: bool) -> list[dict]:
        tree = repo.commits[oid].tree
        dirs: set[str] = set()
        for p in tree:
            parts = p.split("/")
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
        out = []

        def dir_entry(d: str) -> dict:
            listing = sorted((p, e.git_oid) for p, e in tree.items() if p.startswith(d + "/"))
            return {"type": "directory", "oid": hashlib.sha1(json.dumps(listing).encode()).hexdigest(), "size": 0,
                    "path": d}

        if paths is not None:  # paths-info
            for p in paths:
                p = p.strip("/")
                if p in tree:
                    out.append(tree[p].tree_json(p))
                elif p in dirs:
                    out.append(dir_entry(p))
        else:
            prefix = subpath.strip("/")
            if prefix and prefix not in dirs:
                if prefix in tree:
                    raise _HubError(_err(400, f"{prefix} is a file, not a directory"))
                raise _HubError(_err(404, f"Entry not found: {prefix}", "EntryNotFound",
                                     {"X-Repo-Commit": oid}))

            def wanted(p: str) -> bool:
                if prefix and not p.startswith(prefix + "/"):
                    return False
                rel = p[len(prefix) + 1:] if prefix else p
                return recursive or "/" not in rel

            out.extend(dir_entry(d) for d in sorted(dirs) if wanted(d))
            out.extend(tree[p].tree_json(p) for p in sorted(tree) if wanted(p))
        if expand:
            for item in out:
                item["lastCommit"] = self._last_commit(repo, oid, item["path"], item["type"] == "directory")
        return out

    def _h_tree(self, cfg, repo_type, repo_id, revision, subpath, query, **_) -> _Resp:
        repo = self._repo_for_read(cfg, repo_type, repo_id)
        oid, _ = self._resolve(repo, revision)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = query.get("expand", ["false"])[0].lower() in ("1", "true")
        return _Resp(200, self._tree_entries(repo, oid, None, subpath, recursive, expand))

    def _h_paths_info(self, cfg, repo_type, repo_id, revision, body, headers, **_) -> _Resp:
        repo = self._repo_for_read(cfg, repo_type, repo_id)
        oid, _ = self._resolve(repo, revision)
        if "json" in (headers.get("Content-Type") or ""):
            form = json.loads(body or b"{}")
            paths = form.get("paths", [])
            expand = bool(form.get("expand"))
        else:
            form = parse_qs(body.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = form.get("expand", ["False"])[0].lower() in ("1", "true")
        return _Resp(200, self._tree_entries(repo, oid, list(paths), "", False, expand))

    def _h_commits(self, cfg, repo_type, repo_id, revision, query, base, path, **_) -> _Resp:
        repo = self._repo_for_read(cfg, repo_type, repo_id)
        oid, _ = self._resolve(repo, revision)
        hist = repo.history(oid)
        page = int(query.get("p", ["0"])[0])
        size = self.commits_page_size
        chunk = hist[page * size:(page + 1) * size]
        items = [
            {
                "id": c.oid,
                "title": c.title,
                "message": c.description,
                "authors": [{"user": c.author, "avatar": f"https://cdn-avatars.huggingface.co/{c.author}.png"}],
                "date": c.date,
            }
            for c in chunk
        ]
        headers = {"X-Total-Count": str(len(hist))}
        if (page + 1) * size < len(hist):
            headers["Link"] = f'<{base}{urlsplit(path).path}?p={page + 1}>; rel="next"'
        return _Resp(200, items, headers)

    def _gitattributes(self, tree: dict[str, FileEntry]) -> bytes | None:
        entry = tree.get(".gitattributes")
        return self.blobs.get(entry.sha256) if entry is not None else None

    def _h_preupload(self, cfg, repo_type, repo_id, revision, body, query, **_) -> _Resp:
        repo = self._repo_for_write(cfg, repo_type, repo_id, "upload files")
        if query.get("create_pr"):
            return _err(400, "create_pr is not supported by this fake hub")
        oid, _branch = self._resolve(repo, revision)
        tree = repo.commits[oid].tree
        gitattributes = self._gitattributes(tree)
        files = []
        for f in json.loads(body or b"{}").get("files", []):
            path, size = f["path"], int(f.get("size", 0))
            try:
                sample = base64.b64decode(f.get("sample") or "", validate=True)
            except (binascii.Error, ValueError):
                return _err(400, f"Invalid base64 sample for {path}")
            mode = upload_mode(path, size, sample, gitattributes)
            item: dict[str, Any] = {"path": path, "uploadMode": mode, "shouldIgnore": False}
            existing = tree.get(path)
            if existing is not None:  # lets the client skip a file that did not change
                item["oid"] = existing.sha256 if mode == "lfs" else existing.content_oid
            files.append(item)
        return _Resp(200, {"files": files, "commitOid": oid})

    def _h_commit(self, cfg, repo_type, repo_id, revision, body, query, base, **_) -> _Resp:
        repo = self._repo_for_write(cfg, repo_type, repo_id, "create a commit")
        if query.get("create_pr"):
            return _err(400, "create_pr is not supported by this fake hub")
        oid, branch = self._resolve(repo, revision)
        if branch is None:
            return _err(400, f"Revision {revision} is not a branch: commits can only be made on branches")
        header: dict | None = None
        ops = []
        for n, line in enumerate(body.splitlines()):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                return _err(400, f"Invalid NDJSON at line {n + 1}")
            if item.get("key") == "header":
                header = item.get("value") or {}
            else:
                ops.append(item)
        if header is None or not (header.get("summary") or "").strip():
            return _err(400, "Commit summary (header line) is required")
        parent = header.get("parentCommit")
        if parent and not oid.startswith(parent):
            return _err(412, "A commit has happened since. Please refresh and try again.")
        tree = dict(repo.commits[oid].tree)
        gitattributes = self._gitattributes(tree)
        for op in ops:
            key, value = op.get("key"), op.get("value") or {}
            path = (value.get("path") or "").strip("/")
            if not path:
                return _err(400, f"Missing path in operation {key}")
            if key == "file":
                content = value.get("content", "")
                if value.get("encoding", "utf-8") == "base64":
                    try:
                        data = base64.b64decode(content, validate=True)
                    except (binascii.Error, ValueError):
                        return _err(400, f"Invalid base64 content for {path}")
                else:
                    data = content.encode()
                if len(data) > REGULAR_FILE_LIMIT:
                    return _err(400, f"Your push was rejected because it contains files larger than 10 MiB "
                                     f"({path}). Upload them through LFS or Xet.")
                if upload_mode(path, len(data), data[:SAMPLE_BYTES], gitattributes) == "lfs":
                    return _err(400, f"Your push was rejected because it contains binary files ({path}). Upload "
                                     f"them through LFS or Xet.")
                tree[path] = self._store(data, lfs=False)
            elif key == "lfsFile":
                sha = value.get("oid")
                if value.get("algo", "sha256") != "sha256" or not isinstance(sha, str) or sha not in self.blobs:
                    return _err(422, f"LFS object {sha} for {path} was not uploaded")
                if value.get("size") is not None and int(value["size"]) != len(self.blobs[sha]):
                    return _err(422, f"LFS object {sha} has a different size")
                data = self.blobs[sha]
                tree[path] = FileEntry(len(data), sha, git_blob_oid(data), lfs=True)
            elif key == "deletedFile":
                if path not in tree:
                    return _err(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del tree[path]
            elif key == "deletedFolder":
                doomed = [p for p in tree if p.startswith(path + "/")]
                if not doomed:
                    return _err(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del tree[p]
            else:
                return _err(400, f"Unsupported commit operation: {key}")
        readme = tree.get("README.md")
        if readme is not None and readme.sha256 in self.blobs:
            errors = metadata_errors(self.blobs[readme.sha256].decode(errors="replace"))
            if errors:
                return _err(400, "Invalid metadata in README.md.\n" + "\n".join(f"- {e}" for e in errors))
        commit = self._make_commit(repo, oid, header["summary"], header.get("description") or "", cfg["user"], tree)
        repo.branches[branch] = commit.oid
        return _Resp(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{base}/{_URL_PREFIX[repo_type]}{repo_id}/commit/{commit.oid}",
                "hookOutput": "",
            },
        )

    def _h_branch(self, cfg, repo_type, repo_id, branch, body, **_) -> _Resp:
        repo = self._repo_for_write(cfg, repo_type, repo_id, "create a branch")
        if (
            not branch
            or _BAD_BRANCH_CHARS.search(branch)
            or ".." in branch
            or branch.startswith(("/", "-", "refs/"))
            or branch.endswith(("/", ".lock", "."))
            or "//" in branch
            or branch == "HEAD"
            or _COMMIT_RE.match(branch)
        ):
            return _err(400, f"Invalid branch name: {branch}")
        if branch in repo.branches:
            return _err(409, f"Reference already exists: refs/heads/{branch}")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        oid, _ = self._resolve(repo, start)
        repo.branches[branch] = oid
        return _Resp(200, {})

    def _h_xet(self, **_) -> _Resp:
        return _err(501, "This Hub test server does not serve Xet storage: set HF_HUB_DISABLE_XET=1 so that "
                         "huggingface_hub uploads through LFS")

    @staticmethod
    def _xml_error(status: int, code: str, message: str) -> _Resp:
        body = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>'
        return _Resp(status, body.encode(), {"Content-Type": "application/xml"})

    def _h_lfs_batch(self, cfg, repo_type, repo_id, body, base, headers, **_) -> _Resp:
        """git-LFS batch API (https://github.com/git-lfs/git-lfs/blob/main/docs/api/batch.md), upload only."""
        if LFS_MEDIA_TYPE not in (headers.get("Accept") or ""):
            return _err(406, f"The LFS batch API answers only Accept: {LFS_MEDIA_TYPE}")
        self._repo_for_write(cfg, repo_type, repo_id, "upload LFS files")
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            return _err(400, "Invalid JSON body")
        if payload.get("operation") != "upload":
            return _err(400, "This Hub test server takes only the 'upload' LFS operation")
        if "basic" not in (payload.get("transfers") or ["basic"]) or payload.get("hash_algo", "sha256") != "sha256":
            return _err(422, "Only the basic transfer and sha256 are supported")
        objects = []
        for obj in payload.get("objects", []):
            sha, size = obj.get("oid"), obj.get("size")
            item: dict[str, Any] = {"oid": sha, "size": size}
            if not isinstance(sha, str) or not _SHA256_RE.match(sha) or not isinstance(size, int) or size < 0:
                item["error"] = {"code": 422, "message": "Invalid object: oid must be a sha256, size a count"}
            elif sha not in self.blobs:  # already stored: no actions, the client skips the upload
                signature = uuid.uuid4().hex
                self._lfs_pending[sha] = (size, signature)
                item["authenticated"] = True
                item["actions"] = {
                    "upload": {"href": f"{base}/__lfs_storage__/{sha}?X-Amz-Expires=3600&X-Amz-Signature="
                                       f"{signature}", "expires_in": 3600},
                    "verify": {"href": f"{base}/{_URL_PREFIX[repo_type]}{repo_id}.git/info/lfs/objects/verify",
                               "expires_in": 3600},
                }
            objects.append(item)
        return _Resp(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                     {"Content-Type": LFS_MEDIA_TYPE})

    def _h_lfs_upload(self, oid, body, query, headers, **_) -> _Resp:
        # The storage bucket behind a presigned URL: the signature in the query authorizes this one object, and
        # like S3 it refuses a request that carries a second authorization (the client must not send its token).
        if headers.get("Authorization"):
            return self._xml_error(400, "InvalidArgument", "Only one auth mechanism allowed")
        pending = self._lfs_pending.get(oid)
        if pending is None or query.get("X-Amz-Signature", [""])[0] != pending[1]:
            return self._xml_error(403, "SignatureDoesNotMatch", "The request signature does not match")
        if len(body) != pending[0] or hashlib.sha256(body).hexdigest() != oid:
            return self._xml_error(400, "BadDigest", "The content does not match the oid and size of the batch")
        self.blobs[oid] = body
        del self._lfs_pending[oid]
        return _Resp(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def _h_lfs_verify(self, cfg, repo_type, repo_id, body, **_) -> _Resp:
        self._repo_for_write(cfg, repo_type, repo_id, "verify LFS files")
        payload = json.loads(body or b"{}")
        sha = payload.get("oid")
        if sha not in self.blobs or len(self.blobs[sha]) != payload.get("size"):
            return _err(404, f"LFS object {sha} not found")
        return _Resp(200, {})

    def _h_resolve(self, cfg, method, repo_type, repo_id, revision, filename, headers, **_) -> _Resp:
        repo = self._repo_for_read(cfg, repo_type, repo_id)
        self._check_gate(cfg, repo)
        oid, _ = self._resolve(repo, revision)
        entry = repo.commits[oid].tree.get(filename)
        if entry is None:
            raise _HubError(_err(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid}))
        if entry.sha256 not in self.blobs:  # a placeholder: listed with its size, content never held
            raise _HubError(_err(404, f"{filename} is a placeholder without content in this fake hub"))
        data = self.blobs[entry.sha256]
        etag = entry.sha256 if entry.lfs else entry.git_oid
        name = filename.rsplit("/", 1)[-1]
        h = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{etag}"',
            "X-Repo-Commit": oid,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";",
        }
        if entry.lfs:
            h.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(entry.size)})
        status, start, end = 200, 0, len(data)
        rng = headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m or (m.group(1) == "" and m.group(2) == ""):
                return _Resp(416, b"", {**h, "Content-Range": f"bytes */{len(data)}"})
            if m.group(1) == "":  # suffix range
                start = max(0, len(data) - int(m.group(2)))
            else:
                start = int(m.group(1))
                if m.group(2) != "":
                    end = min(len(data), int(m.group(2)) + 1)
            if start >= len(data) and len(data) > 0:
                return _Resp(416, b"", {**h, "Content-Range": f"bytes */{len(data)}"})
            status = 206
            h["Content-Range"] = f"bytes {start}-{max(start, end - 1)}/{len(data)}"
        return _Resp(status, data[start:end], h)

    # ------------------------------------------------------------------ request processing

    def _process(self, method: str, raw_path: str, headers, body: bytes, base: str, rec: RequestRecord):
        """Returns a _Resp, or None to drop the connection."""
        path, _, qs = raw_path.partition("?")
        endpoint, handler, params = self._route(method, path)
        rec.endpoint = endpoint
        with self._lock:
            self._counts[endpoint] += 1
            if endpoint in ("resolve_head", "resolve_get"):
                self._counts["resolve"] += 1
        fault = self._take_fault(endpoint)
        if fault is not None:
            rec.injected = True
            if fault.delay:
                time.sleep(fault.delay)
            if fault.status is not None and not fault.after_apply:
                return None if fault.status == 0 else _err(fault.status, f"Injected failure ({fault.status})")
        if handler is None:
            resp = _err(404, f"Not found: {method} {path} is not implemented by the fake hub")
        else:
            auth = headers.get("Authorization") or ""
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
            try:
                with self._lock:
                    cfg = self._identity(token)
                    resp = handler(
                        method=method, path=raw_path, query=parse_qs(qs, keep_blank_values=True), body=body,
                        headers=headers, base=base, cfg=cfg, **params,
                    )
            except _HubError as e:
                resp = e.resp
        if fault is not None and fault.after_apply and fault.status is not None:
            return None if fault.status == 0 else _err(fault.status, f"Injected failure ({fault.status})")
        return resp


class _Handler(http.server.BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    timeout = 60
    server_version = "fake-hf-hub/1.0"

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._conns.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.hub._lock:
                self.hub._conns.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr logging
        pass

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        method = self.command
        body = self._read_body()
        rec = RequestRecord(method=method, path=self.path, headers=list(self.headers.items()), body=body)
        with self.hub._lock:
            self.hub.request_log.append(rec)
        host = self.headers.get("Host") or f"{self.hub.host}:{self.server.server_address[1]}"
        base = f"http://{host}"
        try:
            resp = self.hub._process(method, self.path, self.headers, body, base, rec)
        except Exception:
            tb = traceback.format_exc()
            with self.hub._lock:
                self.hub.errors.append(f"{method} {self.path}\n{tb}")
            resp = _err(500, "Internal error in fake hub (see HubServer.errors)")
        if resp is None:  # injected connection drop
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        rec.status = resp.status
        headers = {"X-Request-Id": rec.header("X-Amzn-Trace-Id") or uuid.uuid4().hex, **resp.headers}
        headers["Content-Length"] = str(len(resp.body))
        try:
            self.send_response(resp.status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if method != "HEAD" and resp.body:
                self.wfile.write(resp.body)
        except (BrokenPipeError, ConnectionResetError):  # client gave up (e.g. timed out during a delay)
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _handle


# --------------------------------------------------------------------------------------- pytest glue


def configure_hf_client(monkeypatch: pytest.MonkeyPatch, endpoint: str, hf_home: str | os.PathLike) -> None:
    """Point huggingface_hub at ``endpoint`` with an isolated HF_HOME, telemetry off, offline mode unset, and Xet
    off (this server takes uploads through LFS only).

    Sets the environment (what a subprocess sees: HF_ENDPOINT, HF_HOME, ...) and, because
    huggingface_hub reads those variables once at import, also the matching already-imported
    ``huggingface_hub.constants`` values, so in-process code using defaults (``HfApi()``,
    ``hf_hub_download`` without ``endpoint=``) reaches this server too. Everything is undone by
    ``monkeypatch`` at teardown. HF_TOKEN is removed: pass tokens explicitly (or set HF_TOKEN).
    """
    hf_home = str(hf_home)
    os.makedirs(hf_home, exist_ok=True)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH",
                "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_XET_CACHE", "HF_ASSETS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", hf_home)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return
    values = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": os.path.join(hf_home, "hub"),
        "HUGGINGFACE_HUB_CACHE": os.path.join(hf_home, "hub"),
        "HF_ASSETS_CACHE": os.path.join(hf_home, "assets"),
        "HF_XET_CACHE": os.path.join(hf_home, "xet"),
        "HF_TOKEN_PATH": os.path.join(hf_home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(hf_home, "stored_tokens"),
        "AGENT_HARNESSES_PATH": os.path.join(hf_home, ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": os.path.join(hf_home, ".check_for_update_done"),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
    }
    for name, value in values.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)


@pytest.fixture
def hub_server(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Factory fixture: ``server = hub_server(tokens=None, *, configure_client=True)``.

    Starts a HubServer (``DEFAULT_TOKENS`` if ``tokens`` is None), points huggingface_hub at it (see
    ``configure_hf_client``; ``server.hf_home`` is the isolated HF_HOME), stops it at teardown, and
    fails the test if the fake hit an internal error. tests/conftest.py imports it for every test module.
    """
    servers: list[HubServer] = []

    def factory(tokens: dict[str, dict] | None = None, *, configure_client: bool = True) -> HubServer:
        server = HubServer(DEFAULT_TOKENS if tokens is None else tokens)
        endpoint = server.start()
        servers.append(server)
        server.hf_home = tmp_path_factory.mktemp("hf_home")
        if configure_client:
            configure_hf_client(monkeypatch, endpoint, server.hf_home)
        return server

    yield factory
    errors = []
    for server in servers:
        server.stop()
        errors.extend(server.errors)
    if errors:
        pytest.fail("fake hub internal errors:\n" + "\n".join(errors), pytrace=False)
