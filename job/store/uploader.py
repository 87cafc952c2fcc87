"""Checkpoint uploads in the background, so training goes on while a commit is hashed and uploaded."""
from __future__ import annotations

import atexit
import logging
import os
import queue
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from . import open_store
from .blob import StoreError
from .lease import Lease, LeaseLost
from .run_store import RunStore

log = logging.getLogger(__name__)

class UploadStalled(Exception):
    """No checkpoint committed for UPLOAD_STALL_SECONDS since a save: the job stops rather than train on with nothing
    durable. `permanent`: the last failure is one a retry cannot fix (a StoreError: access denied, no bucket)."""

    def __init__(self, message: str, permanent: bool):
        super().__init__(message)
        self.permanent = permanent


class BackgroundUploader:
    """One worker thread that runs RunStore.commit_checkpoint jobs in order, so training goes on.

    With isolate=True the hashing and uploading run in a child process, and the thread only hands jobs over and
    waits. In the training process they competed for the GIL with a training thread that is itself bound by
    Python, and slowed its steps (measured in docs/PERFORMANCE.md, "Checkpoints on the H100"). The child reopens
    the store from its URI and ignores SIGTERM and SIGINT, so a stop signal sent to the whole process group cannot
    cut the last checkpoint's upload short; it ends when the uploader is closed, or with the job.

    A submitted local_dir must stay unchanged until on_committed(step) or on_failed(step, error) has been called
    for it. A failed upload is only reported: the next checkpoint submitted is tried as if nothing had happened.
    """

    def __init__(self, run_store: RunStore, on_committed: Callable[[int], None] | None = None,
                 isolate: bool = False, on_failed: Callable[[int, BaseException], None] | None = None):
        self._run_store = run_store
        self._on_committed = on_committed
        self._on_failed = on_failed
        self._jobs: queue.Queue = queue.Queue()
        self._state = threading.Condition()
        self._pending = 0
        self._newest: int | None = None   # the newest step submitted
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
            step, local_dir, fingerprint, written = job
            committed = False
            try:
                if self._child:
                    self._child.commit(step, local_dir, fingerprint, written)
                else:
                    self._run_store.commit_checkpoint(step, local_dir, fingerprint, written)
                committed = True
                with self._state:
                    self._last = step
                if self._on_committed is not None:
                    self._on_committed(step)
            except Exception as e:
                with self._state:
                    self._errors.append(e)
                if committed or self._on_failed is None:
                    log.error("checkpoint step %d: %s: %s", step,
                              "upload failed" if not committed else "on_committed failed", e)
                else:
                    self._report_failure(step, e)
            finally:
                with self._state:
                    self._pending -= 1
                    self._state.notify_all()

    def _report_failure(self, step: int, error: Exception) -> None:
        try:
            self._on_failed(step, error)
        except Exception as e:  # noqa: BLE001 - the worker must go on to the next checkpoint
            log.error("checkpoint step %d: upload failed: %s; on_failed failed: %s", step, error, e)

    def submit(self, step: int, local_dir: Path, fingerprint: str,
               written: dict[str, tuple[int, str]] | None = None) -> None:
        """`written`: each file's (size, sha256) as it was written (CheckpointWriter.seal), which the manifest
        lists; None: as hashed now."""
        with self._state:
            if self._closed:
                raise RuntimeError("BackgroundUploader is closed")
            self._pending += 1
            self._newest = step
        self._jobs.put((step, Path(local_dir), fingerprint, written))

    def wait(self, timeout: float | None = None) -> bool:
        """True once every submitted job has ended and the newest submitted one has committed; False on timeout or
        if that one failed (an earlier failure, overtaken by a later commit, no longer counts)."""
        with self._state:
            done = self._state.wait_for(lambda: self._pending == 0, timeout)
            return done and self._last == self._newest

    def idle(self, timeout: float | None = None) -> bool:
        """True once every submitted job has ended, committed or failed; False on timeout."""
        with self._state:
            return self._state.wait_for(lambda: self._pending == 0, timeout)

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
        self._run_store = run_store
        ticket = run_store.lease.ticket if run_store.lease else None   # the child commits under the same lease
        self._process = context.Process(target=_commit_worker, name="checkpoint-upload", daemon=True,
                                        args=(child_end, run_store.store.uri, run_store.run_id, os.getpid(), ticket))
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

    def commit(self, step: int, local_dir: Path, fingerprint: str,
               written: dict[str, tuple[int, str]] | None = None) -> None:
        try:
            self._conn.send((step, str(local_dir), fingerprint, written))
            error = self._conn.recv()
        except (EOFError, OSError) as e:
            raise StoreError(f"checkpoint step {step}: the upload process ended "
                             f"(exit code {self._process.exitcode})") from e
        if error is not None:
            lease = self._run_store.lease
            if isinstance(error, LeaseLost) and lease is not None and lease.on_lost:
                lease.on_lost(error)   # the job stops here, as it would had this process found the loss itself
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


def _commit_worker(conn, uri: str, run_id: str, parent: int, ticket=None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # the parent decides when uploads end (BackgroundUploader)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    _die_with(parent)
    run_store = RunStore(open_store(uri), run_id)
    if ticket is not None:
        run_store.hold(Lease.join(run_store.store, ticket))
    while True:
        try:
            job = conn.recv()
        except EOFError:   # the job is gone
            return
        if job is None:
            return
        step, local_dir, fingerprint, written = job
        try:
            run_store.commit_checkpoint(step, Path(local_dir), fingerprint, written)
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
