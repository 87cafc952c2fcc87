"""The flat object store under a run's root: the interface S3Store and LocalStore implement.

Keys are '/'-separated relative paths. Everything above this (the run's layout, manifests, status) is
job/store/run_store.py; this layer knows only bytes under keys.
"""
from __future__ import annotations

import abc
import uuid
from collections.abc import Iterable
from pathlib import Path

ACCEPTED_FORMS = "s3://bucket/prefix or a local directory path"


class StoreError(Exception):
    """A permanent storage problem that a retry cannot fix. str(e) is one line without credentials."""


def check_key(key: str) -> str:
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise ValueError(f"not a valid store key: {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    if prefix:
        check_key(prefix.rstrip("/"))
    return prefix


class CheckpointStore(abc.ABC):
    """Flat key/value object store under one root (an s3://bucket/prefix or a local directory).

    Keys are '/'-separated relative paths.
    """

    uri: str

    @abc.abstractmethod
    def put_file(self, key: str, path: Path) -> tuple[int, str] | None:
        """The (size, sha256) of the bytes stored, where the store sees them pass (a local store hashes as it
        copies); None where it does not (S3)."""

    def copy(self, source: str, key: str) -> bool:
        """Store under `key` the object stored under `source`, without sending its bytes again where the store can
        (S3's server-side copy, a local store's hard link); False where it cannot, and the caller uploads them.
        Raises FileNotFoundError if `source` is absent."""
        return False

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

    def abort_uploads(self, prefix: str) -> int:
        """Abort the unfinished multipart uploads under prefix (S3 keeps, and bills, the parts of an upload killed
        midway); how many. A local store has none."""
        return 0

    # Conditional writes, for the run's lease (job/store/lease.py).

    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        """The object and a tag that changes with every write (S3: its ETag); None if the key is absent."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional writes")

    def put_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """Write only if the object is still as last seen: absent when tag is None (S3: If-None-Match: *), else
        carrying that tag (If-Match). False when it is not: another writer got there first."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional writes")

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

