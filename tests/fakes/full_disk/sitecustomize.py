"""A full disk at the file layer, for a job run as a subprocess: put this folder on PYTHONPATH and set FULL_DISK to
one or more regular expressions separated by ';'. The first file opened for writing whose path matches each of them
takes half of its first write and then fails with ENOSPC, as a disk that fills up in the middle of a file does;
every other file is written as usual.

It works on Python's file objects (builtins.open and io.open), which is how the job writes a checkpoint's files and
how transformers writes trainer_state.json. Nothing in the job knows it is there."""
from __future__ import annotations

import builtins
import errno
import io
import os
import re
import threading

_patterns = [re.compile(p) for p in os.environ.get("FULL_DISK", "").split(";") if p]
_lock = threading.Lock()
_real_open = io.open


class _FillsUp:
    """A file whose disk fills up during the first write: half of it lands, then ENOSPC."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


def _open(file, mode="r", *args, **kwargs):
    f = _real_open(file, mode, *args, **kwargs)
    if not any(c in mode for c in "wax+") or not isinstance(file, (str, bytes, os.PathLike)):
        return f
    path = os.fsdecode(file)
    with _lock:
        for pattern in _patterns:
            if pattern.search(path):
                _patterns.remove(pattern)
                return _FillsUp(f)
    return f


if _patterns:
    builtins.open = _open
    io.open = _open
