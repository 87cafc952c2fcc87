"""Checkpoint store: a flat object store (S3 or a local directory) and the commit protocol on top.

Layout and protocol are those of DESIGN.md: everything of a run lives under {root}/{run_id}/, and a
checkpoint exists only once its MANIFEST.json, uploaded last, lists every file with size and sha256.
"""

from __future__ import annotations

import abc
import atexit
import glob
import hashlib
import json
import logging
import os
import queue
import random
import re
import shutil
import signal
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

import boto3
import boto3.exceptions
import boto3.s3.transfer
import botocore.config
import botocore.exceptions
import botocore.session

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
ACCEPTED_FORMS = "s3://bucket/prefix or a local directory path"


class StoreError(Exception):
    """A permanent storage problem that a retry cannot fix. str(e) is one line without credentials."""


class CorruptCheckpoint(Exception):
    """A downloaded file disagrees with its manifest, or is missing."""


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise ValueError(f"not a valid store key: {key!r}")
    return key


def _check_prefix(prefix: str) -> str:
    if prefix:
        _check_key(prefix.rstrip("/"))
    return prefix


class CheckpointStore(abc.ABC):
    """Flat key/value object store under one root (an s3://bucket/prefix or a local directory).

    Keys are '/'-separated relative paths.
    """

    uri: str

    @abc.abstractmethod
    def put_file(self, key: str, path: Path) -> None: ...

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Readers see the old object or the new one, never a part."""

    @abc.abstractmethod
    def get_file(self, key: str, path: Path) -> None:
        """Raises FileNotFoundError if the key is absent."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes | None:
        """None if the key is absent."""

    @abc.abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys starting with prefix (recursive), sorted."""

    @abc.abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Absent keys are fine."""

    def probe(self) -> None:
        """Write, read back and delete a small object; StoreError on any permanent problem."""
        key = f"_probe/{uuid.uuid4().hex}"
        payload = f"probe {key}".encode()
        self.put_bytes(key, payload)
        got = self.get_bytes(key)
        self.delete([key])
        if got != payload:
            raise StoreError(
                f"CHECKPOINT_URI {self.uri}: an object written under _probe/ did not read back "
                "the same. Check that nothing else rewrites objects there."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def open_store(uri: str) -> CheckpointStore:
    """'s3://bucket/prefix' gives an S3Store; a path gives a LocalStore (created if missing)."""
    if uri.startswith("s3://"):
        return S3Store(uri)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", uri):
        scheme = uri.split("://", 1)[0]
        raise StoreError(
            f"CHECKPOINT_URI {uri}: the scheme '{scheme}://' is not supported. "
            f"Use {ACCEPTED_FORMS}."
        )
    if not uri:
        raise StoreError(f"CHECKPOINT_URI is empty. Use {ACCEPTED_FORMS}.")
    return LocalStore(uri)


# ---------------------------------------------------------------- local directory


_TMP_NAME = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")


class LocalStore(CheckpointStore):
    """A directory, e.g. a mounted volume. Every write is a temp file, fsync, then os.replace."""

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path).expanduser().resolve()
        self.uri = str(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(
                f"CHECKPOINT_URI {self.uri}: cannot create the directory ({e.strerror}). "
                "Check the path and its permissions."
            ) from e

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _write(self, key: str, fill: Callable[[object], None]) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        # The rename itself is durable only once the directory is synced; the manifest relies on it.
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as src:
            self._write(key, lambda f: shutil.copyfileobj(src, f, 1 << 20))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda f: f.write(data))

    def get_file(self, key: str, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        try:
            shutil.copyfile(self._path(key), tmp)
            os.replace(tmp, path)
        except (IsADirectoryError, NotADirectoryError):
            tmp.unlink(missing_ok=True)
            raise FileNotFoundError(f"{self.uri}/{key}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def list(self, prefix: str) -> list[str]:
        _check_prefix(prefix)
        # Same string-prefix semantics as S3: walk the deepest directory the prefix names, then filter.
        base = self.root / prefix.rpartition("/")[0]
        keys = []
        for dirpath, _, filenames in os.walk(base):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if _TMP_NAME.match(name):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            # Drop directories emptied by this delete so deleted checkpoints leave no trace.
            parent = path.parent
            while parent != self.root:
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent

    def probe(self) -> None:
        try:
            super().probe()
        except OSError as e:
            raise StoreError(
                f"CHECKPOINT_URI {self.uri}: cannot write, read and delete a test file "
                f"({e.strerror or type(e).__name__}). Check the path is a writable directory."
            ) from e


# ---------------------------------------------------------------- S3


# Codes a retry cannot fix: the text says what to check. Messages are built here, never copied from
# the service, so neither credentials nor signed URLs can leak into them.
_PERMANENT_CODES = {
    "NoSuchBucket": "bucket '{bucket}' does not exist ({code}). Create it or fix CHECKPOINT_URI.",
    "InvalidBucketName": "'{bucket}' is not a valid bucket name ({code}). Fix CHECKPOINT_URI.",
    "AccessDenied": "access denied ({code}). Check that the credentials may list, read, write and "
    "delete objects under {uri}.",
    "AllAccessDisabled": "access to bucket '{bucket}' is disabled ({code}). Use another bucket.",
    "403": "access denied (HTTP 403). Check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and their "
    "permissions on {uri}.",
    "InvalidAccessKeyId": "the endpoint does not know this access key ({code}). Check "
    "AWS_ACCESS_KEY_ID and, for MinIO and others, AWS_ENDPOINT_URL_S3.",
    "SignatureDoesNotMatch": "the request signature was rejected ({code}). Check "
    "AWS_SECRET_ACCESS_KEY.",
    "ExpiredToken": "the session token has expired ({code}). Refresh AWS_SESSION_TOKEN.",
    "InvalidToken": "the session token was rejected ({code}). Check AWS_SESSION_TOKEN.",
    "TokenRefreshRequired": "the session token was rejected ({code}). Refresh AWS_SESSION_TOKEN.",
    "PermanentRedirect": "bucket '{bucket}' is in another region ({code}). Set AWS_REGION to "
    "the bucket's region.",
    "AuthorizationHeaderMalformed": "the request was signed for the wrong region ({code}). Set "
    "AWS_REGION to the bucket's region.",
}
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
    "InternalError", "ServiceUnavailable", "OperationAborted",
}
_TRANSIENT_EXCEPTIONS = (
    botocore.exceptions.ConnectionError,  # refused, unresolved, connect timeout (outside the probe)
    botocore.exceptions.HTTPClientError,  # reset, read timeout, body stream cut
    botocore.exceptions.IncompleteReadError,
    boto3.exceptions.RetriesExceededError,  # download_file gave up re-reading a body
)
_UNREACHABLE = (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError)


def _error_code(e: botocore.exceptions.ClientError) -> tuple[str, int]:
    return (
        str(e.response.get("Error", {}).get("Code", "")),
        int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0),
    )


def _redact_url(url: str | None) -> str:
    parts = urllib.parse.urlsplit(url or "")
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _checksums_when_required(session: botocore.session.Session) -> botocore.config.Config:
    """Checksums only where S3 requires one (DeleteObjects), unless the user's AWS settings choose otherwise.

    boto3 1.36 and later add CRC checksums to every upload and validate them on every download, which older
    Ceph and MinIO releases and other S3-compatible stores refuse. An explicit client Config outranks the AWS_*
    variables and the profile, so it is set only where neither AWS_REQUEST_CHECKSUM_CALCULATION /
    AWS_RESPONSE_CHECKSUM_VALIDATION nor the profile's request_checksum_calculation /
    response_checksum_validation says anything."""
    chosen = {}
    for name in ("request_checksum_calculation", "response_checksum_validation"):
        if not os.environ.get(f"AWS_{name.upper()}") and name not in session.get_scoped_config():
            chosen[name] = "when_required"
    return botocore.config.Config(**chosen)


class S3Store(CheckpointStore):
    """A bucket and key prefix on S3 or an S3-compatible store (MinIO, R2, Ceph...).

    Credentials, region and endpoint come only from boto3's own configuration (AWS_* environment
    variables, including AWS_ENDPOINT_URL_S3 and AWS_ENDPOINT_URL, which botocore reads itself).
    """

    def __init__(self, uri: str, *, max_attempts: int = 10, object_attempts: int = 4, backoff_s: float = 1.0):
        parts = urllib.parse.urlsplit(uri)
        self.bucket = parts.netloc
        prefix = parts.path.strip("/")
        self.uri = f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"
        if parts.scheme != "s3" or not re.fullmatch(r"[A-Za-z0-9.\-_]{1,255}", self.bucket):
            raise StoreError(f"CHECKPOINT_URI {uri}: no valid bucket name. Use {ACCEPTED_FORMS}.")
        if prefix:
            try:
                _check_key(prefix)
            except ValueError:
                raise StoreError(f"CHECKPOINT_URI {uri}: the key prefix '{prefix}' has empty, '.' or "
                                 f"'..' parts. Use {ACCEPTED_FORMS}.") from None
        self._base = f"{prefix}/" if prefix else ""
        self._object_attempts = object_attempts
        self._backoff_s = backoff_s
        # botocore retries single requests (5xx, SlowDown, resets, timeouts) with exponential backoff
        # and full jitter. A custom endpoint already gets path-style addressing, which MinIO needs,
        # unless s3.addressing_style says 'virtual', so nothing is set for it here.
        config = botocore.config.Config(
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=10,
            read_timeout=120,
            max_pool_connections=16,
        )
        # The probe is the first contact: a refused connection or unknown host there is a wrong
        # endpoint, not a blip, so it gets few attempts and a short connect timeout.
        probe_config = config.merge(
            botocore.config.Config(retries={"mode": "standard", "total_max_attempts": 3}, connect_timeout=5)
        )
        try:
            botocore_session = botocore.session.Session()
            config = config.merge(_checksums_when_required(botocore_session))
            probe_config = probe_config.merge(_checksums_when_required(botocore_session))
            session = boto3.session.Session(botocore_session=botocore_session)  # not thread-safe; clients are
            self._client = session.client("s3", config=config)
            self._probe_client = session.client("s3", config=probe_config)
        except ValueError as e:
            raise StoreError(
                f"CHECKPOINT_URI {self.uri}: the S3 endpoint URL is not valid. Check "
                "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL."
            ) from e
        except botocore.exceptions.BotoCoreError as e:
            raise StoreError(f"CHECKPOINT_URI {self.uri}: cannot set up the S3 client "
                             f"({type(e).__name__}). Check the AWS_* settings.") from e
        self._transfer = boto3.s3.transfer.TransferConfig(
            multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=8
        )

    def _key(self, key: str) -> str:
        return self._base + _check_key(key)

    def _permanent(self, text: str) -> StoreError:
        return StoreError(f"CHECKPOINT_URI {self.uri}: {text}")

    def _call(self, what: str, fn: Callable[[], object], *, probe: bool = False):
        """Run one whole-object operation, retrying transient failures that botocore gave up on.

        botocore retries each HTTP request; this loop also covers what it cannot: a body stream
        cut mid-read, a managed transfer that failed, and a retry budget spent during an outage.
        """
        for attempt in range(1, self._object_attempts + 1):
            try:
                return fn()
            except (botocore.exceptions.ClientError, boto3.exceptions.S3UploadFailedError) as e:
                # upload_file wraps the ClientError in S3UploadFailedError without chaining it explicitly.
                cause = e if isinstance(e, botocore.exceptions.ClientError) else e.__context__
                if not isinstance(cause, botocore.exceptions.ClientError):
                    raise
                code, status = _error_code(cause)
                if code in _PERMANENT_CODES:
                    raise self._permanent(
                        _PERMANENT_CODES[code].format(code=code, bucket=self.bucket, uri=self.uri)
                    ) from e
                if not (code in _TRANSIENT_CODES or status >= 500 or status == 429):
                    if probe:
                        raise self._permanent(
                            f"{what} failed ({code or 'HTTP'} {status}). Check the bucket, the "
                            "credentials and AWS_ENDPOINT_URL_S3."
                        ) from e
                    raise
                error, failure = e, f"{code} (HTTP {status})"
            except (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError) as e:
                raise self._permanent(
                    "no complete AWS credentials found. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."
                ) from e
            except botocore.exceptions.SSLError as e:
                if probe:
                    raise self._permanent(
                        f"TLS with {_redact_url(self._probe_client.meta.endpoint_url)} failed. Check "
                        "the endpoint URL's scheme and AWS_CA_BUNDLE."
                    ) from e
                error, failure = e, type(e).__name__
            except _UNREACHABLE as e:
                if probe:
                    raise self._permanent(
                        f"cannot connect to the S3 endpoint {_redact_url(self._probe_client.meta.endpoint_url)} "
                        f"({self._why_unreachable(e)}). Check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL "
                        "and that the server is up."
                    ) from e
                error, failure = e, type(e).__name__
            except _TRANSIENT_EXCEPTIONS as e:
                error, failure = e, type(e).__name__
            if attempt == self._object_attempts:
                raise error  # the last transient error, unchanged: a later retry may still work
            delay = random.uniform(0, min(30.0, self._backoff_s * 2 ** (attempt - 1)))
            log.warning("%s: %s failed (%s); attempt %d of %d in %.1fs", self.uri, what, failure,
                        attempt + 1, self._object_attempts, delay)
            time.sleep(delay)

    @staticmethod
    def _why_unreachable(e: Exception) -> str:
        if isinstance(e, botocore.exceptions.ConnectTimeoutError):
            return "connect timed out"
        detail = str(getattr(e, "kwargs", {}).get("error", "")).lower()
        if "refused" in detail:
            return "connection refused"
        if any(s in detail for s in ("name or service not known", "nodename nor servname", "name resolution")):
            return "host name not found"
        return "connection failed"

    def put_file(self, key: str, path: Path) -> None:
        k = self._key(key)
        self._call(f"upload {key}", lambda: self._client.upload_file(
            str(path), self.bucket, k, Config=self._transfer))

    def put_bytes(self, key: str, data: bytes) -> None:
        k = self._key(key)
        self._call(f"put {key}", lambda: self._client.put_object(Bucket=self.bucket, Key=k, Body=data))

    def get_file(self, key: str, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        k = self._key(key)

        def download():
            try:
                self._client.download_file(self.bucket, k, str(path), Config=self._transfer)
            except botocore.exceptions.ClientError as e:
                if _error_code(e)[0] in ("404", "NoSuchKey"):
                    raise FileNotFoundError(f"{self.uri}/{key}") from None
                raise

        self._call(f"download {key}", download)

    def get_bytes(self, key: str) -> bytes | None:
        k = self._key(key)

        def get():
            try:
                return self._client.get_object(Bucket=self.bucket, Key=k)["Body"].read()
            except botocore.exceptions.ClientError as e:
                if _error_code(e)[0] == "NoSuchKey":
                    return None
                raise

        return self._call(f"get {key}", get)

    def list(self, prefix: str) -> list[str]:
        full = self._base + _check_prefix(prefix)

        def scan():
            keys = []
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):  # "folder" markers some consoles create
                        keys.append(obj["Key"][len(self._base):])
            return keys

        return sorted(self._call(f"list {prefix or '/'}", scan))

    def delete(self, keys: Iterable[str]) -> None:
        full = [self._key(k) for k in keys]
        for start in range(0, len(full), 1000):  # the most one DeleteObjects call takes
            batch = full[start:start + 1000]

            def delete_batch():
                reply = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
                errors = reply.get("Errors", [])
                if errors:  # per-key failures arrive in a 200 reply; raise them like request errors
                    raise botocore.exceptions.ClientError(
                        {"Error": {"Code": errors[0].get("Code", ""), "Message": ""},
                         "ResponseMetadata": {"HTTPStatusCode": 500 if errors[0].get("Code") in
                                              _TRANSIENT_CODES else 400}},
                        "DeleteObjects",
                    )

            self._call(f"delete {len(batch)} objects", delete_batch)

    def probe(self) -> None:
        key = f"_probe/{uuid.uuid4().hex}"
        k = self._key(key)
        payload = f"probe {key}".encode()
        c = self._probe_client
        self._call("probe write", lambda: c.put_object(Bucket=self.bucket, Key=k, Body=payload), probe=True)
        got = self._call("probe read", lambda: c.get_object(Bucket=self.bucket, Key=k)["Body"].read(), probe=True)
        self._call("probe delete", lambda: c.delete_object(Bucket=self.bucket, Key=k), probe=True)
        if got != payload:
            raise self._permanent("an object written under _probe/ did not read back the same. "
                                  "Check the endpoint is an S3-compatible store.")


# ---------------------------------------------------------------- one run: layout and commit protocol


def _hash_file(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _valid_manifest(raw: bytes | None, step: int | None) -> dict | None:
    """The manifest if it has the agreed structure, else None (which means: not committed)."""
    if raw is None:
        return None
    try:
        m = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(m, dict) or not isinstance(m.get("fingerprint"), str):
        return None
    if "step" not in m or m["step"] != step or (step is not None and type(m["step"]) is not int):
        return None
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        return None
    for rel, entry in files.items():
        try:
            _check_key(rel)
        except ValueError:
            return None
        if rel == MANIFEST or not isinstance(entry, dict):
            return None
        size, digest = entry.get("size"), entry.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return None
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            return None
    return m


class RunStore:
    """Everything of one run under {root}/{run_id}/: run.json, status.json, checkpoints/, final/."""

    def __init__(self, store: CheckpointStore, run_id: str):
        if "/" in run_id or run_id in ("", ".", ".."):
            raise ValueError(f"RUN_ID must be one path segment, got {run_id!r}")
        _check_key(run_id)
        self.store = store
        self.run_id = run_id
        self._root = f"{run_id}/"
        self._checkpoints = f"{run_id}/checkpoints/"
        self._final = f"{run_id}/final/"

    def checkpoint_prefix(self, step: int) -> str:
        return f"{self._checkpoints}step-{step:08d}/"

    # run.json and status.json

    def _read_json(self, name: str) -> dict | None:
        raw = self.store.get_bytes(self._root + name)
        if raw is None:
            return None
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            obj = None
        if not isinstance(obj, dict):
            raise StoreError(f"{self.store.uri}/{self._root}{name} is not a JSON object. "
                             "Delete it or use another RUN_ID.")
        return obj

    def read_run(self) -> dict | None:
        return self._read_json("run.json")

    def write_run(self, run: dict) -> None:
        self.store.put_bytes(self._root + "run.json", _json_bytes(run))

    def read_status(self) -> dict | None:
        return self._read_json("status.json")

    def write_status(self, status: dict) -> None:
        self.store.put_bytes(self._root + "status.json", _json_bytes({**status, "updated_at": _utc_now()}))

    # commit protocol

    def _delete_prefix(self, prefix: str) -> None:
        keys = self.store.list(prefix)
        manifest = prefix + MANIFEST
        if manifest in keys:
            # The manifest goes first: a checkpoint deleted halfway must not look committed.
            self.store.delete([manifest])
        self.store.delete([k for k in keys if k != manifest])

    def _commit(self, prefix: str, local_dir: Path, fingerprint: str, step: int | None,
                files: Iterable[str] | None = None) -> str:
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise NotADirectoryError(f"nothing to commit: {local_dir} is not a directory")
        if files is None:
            rels = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
        else:
            rels = sorted({_check_key(Path(r).as_posix()) for r in files})
            missing = [r for r in rels if not (local_dir / r).is_file()]
            if missing:
                raise FileNotFoundError(f"cannot commit {local_dir}: no file {missing[0]}")
        files = [local_dir / r for r in rels]
        if not files:
            raise ValueError(f"nothing to commit: {local_dir} holds no files")
        if MANIFEST in rels:
            raise ValueError(f"{local_dir} already holds a {MANIFEST}; the store writes its own")
        # Committing a step again (after its first copy proved corrupt) replaces it; it must not
        # look committed while its files are being replaced.
        self._delete_prefix(prefix)
        entries = {}
        for path, rel in zip(files, rels):
            size, digest = _hash_file(path)
            entries[rel] = {"size": size, "sha256": digest}
            self.store.put_file(prefix + rel, path)
        manifest = {"step": step, "fingerprint": fingerprint, "created_at": _utc_now(), "files": entries}
        self.store.put_bytes(prefix + MANIFEST, _json_bytes(manifest))
        return prefix

    def _manifest(self, prefix: str, step: int | None) -> dict | None:
        return _valid_manifest(self.store.get_bytes(prefix + MANIFEST), step)

    def _download(self, prefix: str, step: int | None, dest: Path) -> Path:
        manifest = self._manifest(prefix, step)
        if manifest is None:
            raise FileNotFoundError(f"{self.store.uri}/{prefix}: not committed (no valid {MANIFEST})")
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        for stale in dest.parent.glob(f".{glob.escape(dest.name)}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a download that was killed
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            for rel, want in manifest["files"].items():
                where = f"{self.store.uri}/{prefix}{rel}"
                try:
                    self.store.get_file(prefix + rel, tmp / rel)
                except FileNotFoundError:
                    raise CorruptCheckpoint(f"{where}: listed in {MANIFEST} but missing from the store") from None
                size, digest = _hash_file(tmp / rel)
                if size != want["size"]:
                    raise CorruptCheckpoint(f"{where}: {size} bytes, {MANIFEST} says {want['size']}")
                if digest != want["sha256"]:
                    raise CorruptCheckpoint(f"{where}: sha256 {digest[:12]}... differs from "
                                            f"{MANIFEST}'s {want['sha256'][:12]}...")
            # Verified files move in one by one; anything else in dest (OUTPUT_DIR's scratch) stays.
            for rel in manifest["files"]:
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / rel, dest / rel)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def commit_checkpoint(self, step: int, local_dir: Path, fingerprint: str) -> str:
        """Upload every file under local_dir, then MANIFEST.json. Returns the checkpoint's key prefix."""
        return self._commit(self.checkpoint_prefix(step), local_dir, fingerprint, step)

    def _checkpoint_dirs(self) -> dict[int, list[str]]:
        dirs: dict[int, list[str]] = {}
        for key in self.store.list(self._checkpoints):
            m = re.match(r"step-(\d{8,})/", key[len(self._checkpoints):])
            if m and f"{int(m[1]):08d}" == m[1]:
                dirs.setdefault(int(m[1]), []).append(key)
        return dirs

    def committed_steps(self) -> list[int]:
        """Steps whose MANIFEST.json exists and is well formed, ascending."""
        return sorted(
            step for step, keys in self._checkpoint_dirs().items()
            if self.checkpoint_prefix(step) + MANIFEST in keys
            and self._manifest(self.checkpoint_prefix(step), step) is not None
        )

    def download_checkpoint(self, step: int, dest: Path) -> Path:
        """Download every file the manifest lists and verify it; only verified files land in dest."""
        return self._download(self.checkpoint_prefix(step), step, dest)

    def latest_verified_checkpoint(self, dest_root: Path, log: Callable[[str], None] = print) -> tuple[int, Path] | None:
        """The newest checkpoint that downloads and verifies, falling back to older ones."""
        for step in reversed(self.committed_steps()):
            try:
                return step, self.download_checkpoint(step, Path(dest_root) / f"step-{step:08d}")
            except (CorruptCheckpoint, FileNotFoundError) as e:
                log(f"checkpoint step {step} is unusable, trying the next older one: {e}")
        return None

    def prune(self, keep: int, protect: Iterable[int] = ()) -> list[int]:
        """Delete committed checkpoints beyond the newest `keep`, except those in `protect`."""
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        steps = self.committed_steps()
        kept = set(steps[-keep:]) | set(protect)
        doomed = [s for s in steps if s not in kept]
        for step in doomed:
            self._delete_prefix(self.checkpoint_prefix(step))
        return doomed

    def clean_uncommitted(self, older_than_step: int | None = None) -> list[str]:
        """Delete leftovers of uploads that never wrote their manifest (a crash mid-upload).

        Pass the step being uploaded now as older_than_step so that upload is left alone.
        """
        dirs = self._checkpoint_dirs()  # listed before checking manifests: a commit landing now is kept
        deleted = []
        for step in sorted(dirs):
            if older_than_step is not None and step >= older_than_step:
                continue
            prefix = self.checkpoint_prefix(step)
            if self._manifest(prefix, step) is None:
                self._delete_prefix(prefix)
                deleted.append(prefix)
        return deleted

    def commit_final(self, local_dir: Path, fingerprint: str, files: Iterable[str] | None = None) -> None:
        """Commit the finished adapter under final/: every file under local_dir, or only `files`
        (paths relative to local_dir) when OUTPUT_DIR also holds scratch."""
        self._commit(self._final, local_dir, fingerprint, None, files)

    def final_committed(self) -> bool:
        return self._manifest(self._final, None) is not None

    def download_final(self, dest: Path) -> Path:
        """Like download_checkpoint, for final/. Other files already in dest are left alone."""
        return self._download(self._final, None, dest)


# ---------------------------------------------------------------- background uploads


class BackgroundUploader:
    """One worker thread that runs RunStore.commit_checkpoint jobs in order, so training goes on.

    With isolate=True the hashing and uploading run in a child process, and the thread only hands jobs over and
    waits. In the training process they competed for the GIL with a training thread that is itself bound by
    Python, and slowed its steps (docs/PERFORMANCE.md: a loop of small tensor operations ran 2.4x slower beside
    an upload thread, unchanged beside an upload process). The child reopens the store from its URI and ignores
    SIGTERM and SIGINT, so a stop signal sent to the whole process group cannot cut the last checkpoint's upload
    short; it ends when the uploader is closed, or with the job.

    A submitted local_dir must stay unchanged until on_committed(step) has been called for it.
    """

    def __init__(self, run_store: RunStore, on_committed: Callable[[int], None] | None = None,
                 isolate: bool = False):
        self._run_store = run_store
        self._on_committed = on_committed
        self._jobs: queue.Queue = queue.Queue()
        self._state = threading.Condition()
        self._pending = 0
        self._failed = 0
        self._last: int | None = None
        self._errors: list[BaseException] = []
        self._closed = False
        self._child = _CommitProcess(run_store) if isolate else None
        # A daemon thread: a stuck upload must not keep a signalled process alive past its grace
        # period. wait(timeout) is how the caller bounds the wait.
        self._thread = threading.Thread(target=self._work, name="checkpoint-uploader", daemon=True)
        self._thread.start()

    @property
    def worker_pid(self) -> int:
        """The process that hashes and uploads: the child's with isolate=True, else this one."""
        return self._child.pid if self._child else os.getpid()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            step, local_dir, fingerprint = job
            committed = False
            try:
                if self._child:
                    self._child.commit(step, local_dir, fingerprint)
                else:
                    self._run_store.commit_checkpoint(step, local_dir, fingerprint)
                committed = True
                with self._state:
                    self._last = step
                if self._on_committed is not None:
                    self._on_committed(step)
            except Exception as e:
                log.error("checkpoint step %d: %s: %s", step,
                          "upload failed" if not committed else "on_committed failed", e)
                with self._state:
                    self._errors.append(e)
            finally:
                with self._state:
                    self._pending -= 1
                    self._failed += not committed
                    self._state.notify_all()

    def submit(self, step: int, local_dir: Path, fingerprint: str) -> None:
        with self._state:
            if self._closed:
                raise RuntimeError("BackgroundUploader is closed")
            self._pending += 1
        self._jobs.put((step, Path(local_dir), fingerprint))

    def wait(self, timeout: float | None = None) -> bool:
        """True once every submitted job has committed; False on timeout or if any job failed."""
        with self._state:
            done = self._state.wait_for(lambda: self._pending == 0, timeout)
            return done and self._failed == 0

    def last_committed(self) -> int | None:
        with self._state:
            return self._last

    def errors(self) -> list[BaseException]:
        with self._state:
            return list(self._errors)

    def close(self) -> None:
        """Finish the queued jobs and stop the worker. For a bounded wait call wait(timeout) first."""
        with self._state:
            if self._closed:
                return
            self._closed = True
        self._jobs.put(None)
        self._thread.join()
        if self._child:
            self._child.close()


class _CommitProcess:
    """A spawned child process (none of the parent's CUDA state or threads) committing checkpoints of one run."""

    def __init__(self, run_store: RunStore):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._conn, child_end = context.Pipe()
        self._process = context.Process(target=_commit_worker, name="checkpoint-upload", daemon=True,
                                        args=(child_end, run_store.store.uri, run_store.run_id, os.getpid()))
        # Blocked here, the stop signals stay blocked in the child from its first instruction (the mask survives
        # fork and exec) until it ignores them; this thread gets any that came meanwhile once unblocked. The
        # resource tracker, which spawning starts the first time, is started first: starting it unblocks them.
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        stops = {signal.SIGTERM, signal.SIGINT}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            self._process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        child_end.close()
        self.pid = self._process.pid
        # At exit multiprocessing terminates daemonic children with SIGTERM, which this one ignores, and then
        # waits for them; so an upload the job gave up waiting for is ended here first.
        atexit.register(self._end)

    def commit(self, step: int, local_dir: Path, fingerprint: str) -> None:
        try:
            self._conn.send((step, str(local_dir), fingerprint))
            error = self._conn.recv()
        except (EOFError, OSError) as e:
            raise StoreError(f"checkpoint step {step}: the upload process ended "
                             f"(exit code {self._process.exitcode})") from e
        if error is not None:
            raise error

    def close(self) -> None:
        """Let the child finish what it has and end (it is killed if that takes over 10 s)."""
        atexit.unregister(self._end)
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._process.join(10)
        self._end()
        self._conn.close()

    def _end(self) -> None:
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)


def _commit_worker(conn, uri: str, run_id: str, parent: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # the parent decides when uploads end (BackgroundUploader)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    _die_with(parent)
    run_store = RunStore(open_store(uri), run_id)
    while True:
        try:
            job = conn.recv()
        except EOFError:   # the job is gone
            return
        if job is None:
            return
        step, local_dir, fingerprint = job
        try:
            run_store.commit_checkpoint(step, Path(local_dir), fingerprint)
            conn.send(None)
        except Exception as e:  # noqa: BLE001 - every failure goes back to the parent, which records it
            conn.send(_portable(e))


def _die_with(parent: int) -> None:
    """End this process when `parent` dies, as in a pod whose job is killed: an orphan could otherwise commit a
    checkpoint while a restarted job is cleaning up that very step's leftovers."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:   # it died before that took effect
        os._exit(1)


def _portable(error: BaseException) -> BaseException:
    """The error itself if it survives pickling, else a StoreError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return StoreError(f"{type(error).__name__}: {error}")
