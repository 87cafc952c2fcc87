"""One run's layout in the store and the commit protocol (DESIGN.md): everything of a run lives under
{root}/{run_id}/, and a checkpoint exists only once its MANIFEST.json, uploaded last, lists every file with size
and sha256.

Every change this module makes to a run's checkpoints goes through two methods: `_put_manifest` (the commit) and
`_delete_prefix` (retention, leftovers, a replaced commit). Each first renews the writer's lease (lease.py), if the
RunStore holds one, so that a process that lost the run commits and deletes nothing.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

from .blob import CheckpointStore, StoreError, check_key
from .lease import Lease, LeaseLost

MANIFEST = "MANIFEST.json"


class CorruptCheckpoint(Exception):
    """A downloaded file disagrees with its manifest, or is missing."""


def hash_file(path: Path) -> tuple[int, str]:
    """(size, sha256) of a file, as a manifest lists them."""
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
            check_key(rel)
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
        check_key(run_id)
        self.store = store
        self.run_id = run_id
        self._root = f"{run_id}/"
        self._checkpoints = f"{run_id}/checkpoints/"
        self._final = f"{run_id}/final/"
        self.lease: Lease | None = None

    def hold(self, lease: Lease) -> None:
        """From now on every commit and delete first checks (renews) this lease."""
        self.lease = lease

    def check_lease(self) -> None:
        """Raises LeaseLost (after telling lease.on_lost) if this process no longer holds the run."""
        if self.lease is None:
            return
        try:
            self.lease.renew()
        except LeaseLost as lost:
            if self.lease.on_lost:
                self.lease.on_lost(lost)
            raise

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
        if keys:
            self.check_lease()
        manifest = prefix + MANIFEST
        if manifest in keys:
            # The manifest goes first: a checkpoint deleted halfway must not look committed.
            self.store.delete([manifest])
        self.store.delete([k for k in keys if k != manifest])

    def _commit(self, prefix: str, local_dir: Path, fingerprint: str, step: int | None,
                files: Iterable[str] | None = None, written: dict[str, tuple[int, str]] | None = None,
                in_store: dict[str, tuple[str, int, str]] | None = None) -> str:
        """`written`: the files to commit, each with its (size, sha256) as it was written; the manifest lists those,
        and a file that no longer matches them is not committed. `in_store`: files whose bytes the store already
        holds under another key, rel -> (key, size, sha256), copied there by the store where it can."""
        local_dir = Path(local_dir)
        if written is not None:
            files = written
        if not local_dir.is_dir():
            raise NotADirectoryError(f"nothing to commit: {local_dir} is not a directory")
        if files is None:
            rels = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
        else:
            rels = sorted({check_key(Path(r).as_posix()) for r in files})
            missing = [r for r in rels if not (local_dir / r).is_file()]
            if missing:
                raise FileNotFoundError(f"cannot commit {local_dir}: no file {missing[0]}")
        files = [local_dir / r for r in rels]
        if not files:
            raise ValueError(f"nothing to commit: {local_dir} holds no files")
        if MANIFEST in rels:
            raise ValueError(f"{local_dir} already holds a {MANIFEST}; the store writes its own")
        self.check_lease()   # before a byte is uploaded: a stale writer must not touch another holder's files
        # Committing a step again (after its first copy proved corrupt) replaces it; it must not
        # look committed while its files are being replaced.
        self._delete_prefix(prefix)
        entries = {}
        for path, rel in zip(files, rels):
            if in_store and rel in in_store and self.store.copy(in_store[rel][0], prefix + rel):
                entries[rel] = {"size": in_store[rel][1], "sha256": in_store[rel][2]}
                continue
            # A store that hashes what it stores (local) is asked first: one read of the file, not two. Either
            # way the manifest lists what was stored, and a file that differs from what was written is not
            # committed (its manifest is never written).
            stored = self.store.put_file(prefix + rel, path)
            size, digest = stored if stored is not None else hash_file(path)
            if written is not None and (size, digest) != tuple(written[rel]):
                raise CorruptCheckpoint(f"{path}: changed since it was written ({size} bytes, sha256 "
                                        f"{digest[:12]}...; written: {written[rel][0]} bytes, "
                                        f"{written[rel][1][:12]}...); not committed")
            entries[rel] = {"size": size, "sha256": digest}
        self._put_manifest(prefix, {"step": step, "fingerprint": fingerprint, "created_at": _utc_now(),
                                    "files": entries})
        return prefix

    def _put_manifest(self, prefix: str, manifest: dict) -> None:
        """The commit itself: from here on the files under prefix are a checkpoint (or final/)."""
        self.check_lease()
        self.store.put_bytes(prefix + MANIFEST, _json_bytes(manifest))

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
                size, digest = hash_file(tmp / rel)
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

    def commit_checkpoint(self, step: int, local_dir: Path, fingerprint: str,
                          written: dict[str, tuple[int, str]] | None = None) -> str:
        """Upload every file under local_dir (only those in `written`, when given: see _commit), then
        MANIFEST.json. Returns the checkpoint's key prefix."""
        return self._commit(self.checkpoint_prefix(step), local_dir, fingerprint, step, written=written)

    def _checkpoint_dirs(self) -> dict[int, list[str]]:
        dirs: dict[int, list[str]] = {}
        for key in self.store.list(self._checkpoints):
            m = re.match(r"step-(\d{8,})/", key[len(self._checkpoints):])
            if m and f"{int(m[1]):08d}" == m[1]:
                dirs.setdefault(int(m[1]), []).append(key)
        return dirs

    def committed_steps(self) -> list[int]:
        """Steps whose MANIFEST.json exists and is well formed, ascending."""
        return sorted(self._committed())

    def _committed(self) -> dict[int, dict]:
        """The committed checkpoints' manifests by step."""
        manifests = {}
        for step, keys in self._checkpoint_dirs().items():
            if self.checkpoint_prefix(step) + MANIFEST in keys:
                manifest = self._manifest(self.checkpoint_prefix(step), step)
                if manifest is not None:
                    manifests[step] = manifest
        return manifests

    def fingerprint_of(self, step: int | None) -> str | None:
        """The settings fingerprint a committed checkpoint (or, for None, final/) was written with."""
        manifest = self._manifest(self._final if step is None else self.checkpoint_prefix(step), step)
        return manifest["fingerprint"] if manifest else None

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

    def abort_stale_uploads(self) -> int:
        """At start, under the lease: abort this run's multipart uploads that a killed writer left unfinished
        (the bucket's AbortIncompleteMultipartUpload lifecycle rule is the backstop, docs/DEPLOY.md)."""
        self.check_lease()
        return self.store.abort_uploads(self._root)

    def commit_final(self, local_dir: Path, fingerprint: str, files: Iterable[str] | None = None) -> None:
        """Commit the finished adapter under final/: every file under local_dir, or only `files`
        (paths relative to local_dir) when OUTPUT_DIR also holds scratch. A file whose bytes the newest committed
        checkpoint holds under the same name (the adapter, whose last step is always committed; the tokenizer) is
        copied from it inside the store rather than uploaded again."""
        local_dir = Path(local_dir)
        files = None if files is None else list(files)   # read twice: below and by _commit
        self._commit(self._final, local_dir, fingerprint, None, files,
                     in_store=self._in_newest_checkpoint(local_dir, files, fingerprint))

    def _in_newest_checkpoint(self, local_dir: Path, files: Iterable[str] | None,
                              fingerprint: str) -> dict[str, tuple[str, int, str]]:
        """The files of local_dir that the newest committed checkpoint of this fingerprint holds byte for byte (by
        its manifest's sizes and hashes): rel -> (key, size, sha256)."""
        committed = self._committed()
        newest = max(committed, default=None)
        manifest = committed.get(newest)
        if manifest is None or manifest.get("fingerprint") != fingerprint:
            return {}
        same = {}
        for rel in (files if files is not None else manifest["files"]):
            want, path = manifest["files"].get(rel), local_dir / rel
            if want is None or not path.is_file() or path.stat().st_size != want["size"]:
                continue
            size, digest = hash_file(path)
            if digest == want["sha256"]:
                same[rel] = (self.checkpoint_prefix(newest) + rel, size, digest)
        return same

    def final_committed(self) -> bool:
        return self._manifest(self._final, None) is not None

    def download_final(self, dest: Path) -> Path:
        """Like download_checkpoint, for final/. Other files already in dest are left alone."""
        return self._download(self._final, None, dest)

