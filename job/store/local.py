"""A local directory (a mounted volume, or the CPU demo's folder) as the checkpoint store."""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from .blob import CheckpointStore, StoreError, check_key, check_prefix

_TMP_NAME = re.compile(r"^\..+\.([0-9a-f]{32}\.tmp|lock)$")   # a write in flight, or a conditional write's lock


def is_temporary(name: str) -> bool:
    """A file name write_durably uses before the rename."""
    return bool(_TMP_NAME.match(name))


class _HashingFile:
    """A file opened for writing that hashes the bytes as they pass: what was written, not what a later read of the
    path finds."""

    def __init__(self, f):
        self._f, self._sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        written = self._f.write(view)
        self._sha256.update(view[:written])
        self.size += written
        return written

    def flush(self) -> None:
        self._f.flush()

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()


def write_durably(path: Path, fill: Callable[[object], None], sync: bool = True) -> tuple[int, str]:
    """Write `path` through a temporary name beside it: fill(f) writes the bytes, which are hashed as they pass;
    fsync, rename, fsync the folder. (size, sha256) of exactly those bytes. A failure (a full disk) leaves no file.
    `sync` False: no fsync, for scratch files whose durable copy is made elsewhere, from the hash taken here."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            hashing = _HashingFile(f)
            fill(hashing)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        fsync_folder(path.parent)   # the rename itself is durable only once the folder is synced
    return hashing.size, hashing.sha256


def fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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
        return self.root / check_key(key)

    def _write(self, key: str, fill: Callable[[object], None]) -> tuple[int, str]:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        return write_durably(dest, fill)   # the manifest relies on the rename being durable

    def put_file(self, key: str, path: Path) -> tuple[int, str]:
        with open(path, "rb") as src:
            return self._write(key, lambda f: shutil.copyfileobj(src, f, 1 << 20))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda f: f.write(data))

    def copy(self, source: str, key: str) -> bool:
        # A hard link: objects here are never changed in place (every write is a new file renamed over the key)
        # and a delete unlinks one name, so the two keys are as independent as two copies.
        src, dest = self._path(source), self._path(key)
        if not src.is_file():
            raise FileNotFoundError(f"{self.uri}/{source}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.tmp"
        try:
            os.link(src, tmp)
        except OSError:   # a file system without hard links: the caller copies
            return False
        try:
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_folder(dest.parent)
        return True

    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        data = self.get_bytes(key)
        return None if data is None else (data, hashlib.sha256(data).hexdigest())

    def put_if(self, key: str, data: bytes, tag: str | None) -> bool:
        # S3 compares and writes in one request; here an flock on a lock file beside the object makes the
        # read-compare-write one step for every process on this machine (and on NFS v4, which maps flock to locks).
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest.parent / f".{dest.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            now = self.get_tagged(key)
            if (now and now[1]) != tag:
                return False
            if tag is None:   # an exclusive create: two creators cannot both succeed
                with open(dest, "xb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                self.put_bytes(key, data)
            return True

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
        check_prefix(prefix)
        # Same string-prefix semantics as S3: walk the deepest directory the prefix names, then filter.
        base = self.root / prefix.rpartition("/")[0]
        keys = []
        for dirpath, _, filenames in os.walk(base):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if is_temporary(name):
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

