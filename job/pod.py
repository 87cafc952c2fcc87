"""Inside a Kubernetes pod, a local CHECKPOINT_URI must be on a volume that outlives the pod.

A pod's own disk (its root filesystem, an emptyDir, a tmpfs) is deleted with the pod, and every resume happens in a
new pod: checkpoints kept there are lost at the first preemption, silently. Preflight refuses that (exit 2) unless
ALLOW_POD_LOCAL_CHECKPOINTS=true says it is meant (a test, a throwaway run).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, NamedTuple

# The kubelet sets this in every container of a pod (enableServiceLinks: false does not remove it).
POD_MARKER = "KUBERNETES_SERVICE_HOST"
MOUNTINFO = Path("/proc/self/mountinfo")


class Mount(NamedTuple):
    point: str        # where it is mounted in this container
    root: str         # which part of its source filesystem it shows
    fstype: str


def in_pod(environ: Mapping[str, str]) -> bool:
    return bool(environ.get(POD_MARKER))


def mounts(mountinfo: Path | None = None) -> list[Mount]:
    """This process's mounts (proc(5) mountinfo: field 4 the root, 5 the mount point, after ' - ' the type)."""
    found = []
    for line in (mountinfo or MOUNTINFO).read_text().splitlines():
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        found.append(Mount(_unescape(parts[4]), _unescape(parts[3]), rest.split()[0] if rest else ""))
    return found


def mount_of(path: Path, table: list[Mount]) -> Mount:
    """The mount that holds `path` (the longest mount point above it; the last one mounted there wins)."""
    best = None
    for mount in table:
        point = Path(mount.point)
        if (path == point or point in path.parents) and (best is None or len(mount.point) >= len(best.point)):
            best = mount
    return best or Mount("/", "/", "")


def pod_disk(mount: Mount) -> str | None:
    """Why this mount dies with the pod, or None if it is a volume that can outlive it (a PersistentVolumeClaim,
    hostPath, NFS, ...)."""
    if mount.point == "/":
        return "on the container's own root filesystem"
    if "kubernetes.io~empty-dir" in mount.root:
        return f"on an emptyDir volume ({mount.point})"
    if mount.fstype == "tmpfs":
        return f"on a memory-backed tmpfs ({mount.point})"
    return None


def local_checkpoints_problem(checkpoint_uri: str, allowed: bool, environ: Mapping[str, str],
                              mountinfo: Path | None = None) -> str | None:
    """One line if this is a pod whose local CHECKPOINT_URI dies with it; None when fine or not a pod."""
    if allowed or checkpoint_uri.startswith("s3://") or not in_pod(environ):
        return None
    try:
        table = mounts(mountinfo)
    except OSError:   # no /proc: nothing to judge by
        return None
    from .config import local_store_path
    path = Path(os.path.abspath(os.path.expanduser(local_store_path(checkpoint_uri))))
    why = pod_disk(mount_of(path, table))
    if why is None:
        return None
    return (f"CHECKPOINT_URI={checkpoint_uri} is {why} in this Kubernetes pod, so its checkpoints are lost with the "
            f"pod and a resumed pod starts over; set CHECKPOINT_URI to s3://bucket/prefix or a path on a "
            f"PersistentVolumeClaim, or ALLOW_POD_LOCAL_CHECKPOINTS=true if that is meant")


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as octal escapes (\040 ...).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
