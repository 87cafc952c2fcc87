"""A checkpoint's tensors copied to host memory and its files written off the training thread, each through a
temporary name and a rename, hashed as it is written.

These files are scratch: the durable copy is the store's, which its commit makes (and fsyncs, in a local store)
from them, refusing any file whose bytes differ from the hash taken here (RunStore.commit_checkpoint). So they are
not fsynced: that wrote every checkpoint to the disk twice, and on the last one the run waits for both."""
from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from ..store.local import is_temporary, write_durably
from ..store.run_store import hash_file


def _write_when_ready(ready, write, snapshot, *args) -> None:
    ready()
    write(snapshot, *args)


class HostSnapshot:
    """Copies of a checkpoint's tensors in host memory, taken without stalling the training thread.

    GPU tensors are copied into pinned buffers on the current stream, so the copies are ordered before the next
    step's updates, and `ready()` (called by the writer thread) waits for them. bitsandbytes' paged optimizer
    state lives in CUDA managed memory behind CPU tensors: read on the CPU, its pages would migrate to the host
    and fault back onto the GPU in the next step, so it is copied through a CUDA view instead. Each name has two
    sets of buffers, used in turn by successive checkpoints, so a snapshot does not wait for the previous
    checkpoint's file to be written (docs/PERFORMANCE.md, "Checkpoints on the H100")."""

    def __init__(self, writer: CheckpointWriter):
        self.writer = writer
        self._buffers: dict[str, torch.Tensor] = {}
        self._writing: dict[str, concurrent.futures.Future] = {}
        self._pending: list[tuple[str, tuple]] = []
        self._turns: dict[str, int] = {}
        self._cuda = torch.cuda.is_available()

    def write(self, name: str, tree, write, *args) -> None:
        """Snapshot `tree` now; once submit() is called the writer thread calls write(snapshot, *args), after the
        copies have landed. A checkpoint's snapshots are all taken before its files are written: the writer
        thread holds the GIL for much of a write, and a snapshot taken beside it waited for it."""
        # Two sets of buffers per name, used in turn: a snapshot waits only if the write before the previous one
        # is still reading its set (at the default cadence, 100 steps earlier).
        slot = f"{name}#{self._turns.get(name, 0) % 2}"
        self._turns[name] = self._turns.get(name, 0) + 1
        if slot in self._writing:
            concurrent.futures.wait([self._writing[slot]])
        copied = self._copy(slot, tree)
        ready = lambda: None   # noqa: E731
        if self._cuda:
            done = torch.cuda.Event()
            done.record()
            ready = done.synchronize
        self._pending.append((slot, (_write_when_ready, ready, write, copied, *args)))

    def discard(self) -> None:
        """Drop the snapshots not yet submitted: their checkpoint failed before they were written."""
        self._pending = []

    def submit(self) -> None:
        """Hand the snapshots taken so far to the writer thread, in order."""
        for slot, job in self._pending:
            self._writing[slot] = self.writer.submit(*job)
        self._pending = []

    def _copy(self, key: str, value):
        if isinstance(value, torch.Tensor):
            return self._tensor(key, value.detach())
        if isinstance(value, dict):
            return {k: self._copy(f"{key}/{k}", v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._copy(f"{key}/{i}", v) for i, v in enumerate(value))
        return value

    def _tensor(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        paged = getattr(tensor, "is_paged", False) and self._cuda and tensor.dtype in _TYPESTR
        source = _cuda_view(tensor) if paged else tensor
        if not source.is_cuda:
            return tensor.clone(memory_format=torch.contiguous_format)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = self._buffers[key] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        buffer.copy_(source, non_blocking=True)
        return buffer


def _cuda_view(tensor: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor over the managed memory behind one of bitsandbytes' paged (CPU-typed) tensors."""
    class Interface:
        __cuda_array_interface__ = {"shape": tuple(tensor.shape), "typestr": _TYPESTR[tensor.dtype],
                                    "data": (tensor.data_ptr(), False), "version": 2,
                                    "strides": None}
    return torch.as_tensor(Interface(), device=f"cuda:{getattr(tensor, 'page_deviceid', 0) or 0}")


_TYPESTR = {torch.float32: "<f4", torch.float16: "<f2", torch.uint8: "|u1", torch.int32: "<i4",
            torch.int64: "<i8"}


def _key(folder: str | os.PathLike) -> Path:
    return Path(os.path.abspath(folder))


class CheckpointWriter:
    """One thread that finishes checkpoint files off the training thread, in the order they were asked for.

    It keeps, per checkpoint folder, the (size, sha256) of each file as written, and the first write that failed:
    `seal` turns a folder into the file list its commit may upload, or raises that failure."""

    def __init__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
        self._futures: list[concurrent.futures.Future] = []
        self._lock = threading.Lock()
        self._written: dict[Path, dict[str, tuple[int, str]]] = {}
        self._failed: dict[Path, BaseException] = {}

    def write(self, tree, path: str | os.PathLike, serialize: Callable[[object, object], None]) -> None:
        """serialize(tree, f) into `path` through a temporary name and a rename (write_durably, without fsync),
        hashed as written and remembered for its folder's seal; a failure is remembered too."""
        path = Path(path)
        try:
            size, digest = write_durably(path, lambda f: serialize(tree, f), sync=False)
        except Exception as e:
            self.failed(path.parent, e)
            raise
        with self._lock:
            self._written.setdefault(_key(path.parent), {})[path.name] = (size, digest)

    def failed(self, folder: str | os.PathLike, error: BaseException) -> None:
        """A write into this checkpoint folder failed: its seal raises the first such error."""
        with self._lock:
            self._failed.setdefault(_key(folder), error)

    def seal(self, folder: str | os.PathLike) -> dict[str, tuple[int, str]]:
        """Every file of a finished checkpoint folder with its (size, sha256): the files written here as they were
        written; the small ones the Trainer, peft and the tokenizer wrote on the training thread hashed now. Raises
        the first write into the folder that failed (OSError for a full disk)."""
        folder = Path(folder)
        with self._lock:
            error = self._failed.pop(_key(folder), None)
            written = self._written.pop(_key(folder), {})
        if error is not None:
            raise error
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {folder} is missing")
        files = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not is_temporary(p.name)):
            rel = path.relative_to(folder).as_posix()
            files[rel] = written[rel] if rel in written else hash_file(path)
        return files

    def submit(self, fn, *args) -> concurrent.futures.Future:
        future = self._pool.submit(fn, *args)
        self._futures.append(future)
        return future

    def wait(self, timeout: float | None) -> bool:
        """True once everything submitted has run without error; False on timeout or error."""
        _, pending = concurrent.futures.wait(self._futures, timeout)
        return not pending and not self.errors()

    def idle(self, timeout: float | None) -> bool:
        """True once everything submitted has run, failed or not; False on timeout."""
        _, pending = concurrent.futures.wait(self._futures, timeout)
        return not pending

    def errors(self) -> list[BaseException]:
        return [f.exception() for f in self._futures if f.done() and f.exception() is not None]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
