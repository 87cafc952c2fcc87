"""Where a process's time went, in time order, from py-spy's speedscope samples (`py-spy record --idle -f
speedscope`, as bench/e2e_race.py's `job-cold-spy` takes them): one thread's samples in windows of a fixed width,
each window named by the stacks it spent most of its samples in.

    python bench/spy_timeline.py FILE.speedscope.json [--thread MainThread] [--window 0.5] [--start 0] [--end 60]
        [--top 2] [--depth 3]

A stack is shown by its innermost frames of this repository (job/, bench/) and the frame it was in: the repository's
frames say what the job was doing, the innermost says on what (an import, a CUDA call, a lock). With --idle, a
sample is taken every 1/rate s whatever the thread does, so a sample's index is its time from the thread's start."""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

OURS = ("/job/", "/bench/")


def label(stack: list[dict], depth: int) -> str:
    """The stack's innermost `depth` frames of this repository, then its innermost frame."""
    ours = [f for f in stack if any(part in (f.get("file") or "") for part in OURS)]
    named = [f"{Path(f['file']).stem}.{f['name']}:{f.get('line')}" for f in ours[-depth:]]
    leaf = stack[-1] if stack else {"name": "(idle)", "file": ""}
    leaf_name = f"{Path(leaf.get('file') or '').stem}.{leaf['name']}"
    if not named or named[-1].split(":")[0] != leaf_name:
        named.append(leaf_name)
    return " > ".join(named)


def timeline(path: Path, thread: str, window: float, start: float, end: float, top: int, depth: int) -> list[str]:
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    named = [p for p in data["profiles"] if f'"{thread}"' in p["name"]]
    # py-spy cannot always read a thread's name; the main thread's id is the process's, the lowest
    profile = named[0] if named else min(data["profiles"], key=lambda p: int(p["name"].split()[1]))
    lines, t, bucket, bucket_start = [], 0.0, collections.Counter(), None
    for sample, weight in zip(profile["samples"], profile["weights"]):
        if t >= end:
            break
        if start <= t:
            if bucket_start is None:
                bucket_start = t
            bucket[label([frames[i] for i in sample], depth)] += weight
            if t + weight - bucket_start >= window - 1e-9:
                lines.append(_window(bucket_start, t + weight, bucket, top))
                bucket, bucket_start = collections.Counter(), None
        t += weight
    if bucket:
        lines.append(_window(bucket_start, min(t, end), bucket, top))
    return lines


def _window(start: float, end: float, bucket: collections.Counter, top: int) -> str:
    total = sum(bucket.values())
    parts = [f"{100 * w / total:3.0f}% {name}" for name, w in bucket.most_common(top)]
    return f"{start:6.2f}-{end:6.2f}  " + "\n               ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--thread", default="MainThread")
    parser.add_argument("--window", type=float, default=0.5)
    parser.add_argument("--start", type=float, default=0.0)
    parser.add_argument("--end", type=float, default=float("inf"))
    parser.add_argument("--top", type=int, default=2)
    parser.add_argument("--depth", type=int, default=3)
    args = parser.parse_args()
    print("\n".join(timeline(args.path, args.thread, args.window, args.start, args.end, args.top, args.depth)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
