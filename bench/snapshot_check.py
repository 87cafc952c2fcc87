"""On a GPU: job.speed.snapshot.HostSnapshot copies bitsandbytes' paged optimizer state (CUDA managed memory behind
CPU-typed tensors, nested in bnb's state_dict) exactly as it was when the snapshot was taken, even though the
next optimizer step runs before the writer thread reads it; and how long the training thread spends on it, on an
idle GPU and on one still busy with queued work (as in training, where the host runs ahead of the GPU).

    python3 bench/snapshot_check.py        # prints one JSON line; exit 1 on a mismatch
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def flatten(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in flatten(value, f"{prefix}/{i}").items()}
    return {}


def step(optimizer, params) -> None:
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()


def main() -> int:
    import bitsandbytes as bnb

    from job.speed.snapshot import CheckpointWriter, HostSnapshot

    torch.manual_seed(0)
    # LoRA r64 on q_proj, v_proj of a 7B model: 64 matrices of 64 x 4096 (A) and 4096 x 64 (B), ~33.5M parameters.
    params = [torch.nn.Parameter(torch.randn(64, 4096, device="cuda") * 0.01) for _ in range(64)]
    params += [torch.nn.Parameter(torch.zeros(4096, 64, device="cuda")) for _ in range(64)]
    optimizer = bnb.optim.PagedAdamW32bit(params, lr=2e-4)
    for _ in range(3):
        step(optimizer, params)
    torch.cuda.synchronize()
    state = flatten(optimizer.state_dict())
    paged = sum(getattr(t, "is_paged", False) for t in state.values())

    written: list[dict] = []
    writer = CheckpointWriter()
    snapshot = HostSnapshot(writer)
    seconds, mismatches = [], 0
    for _ in range(3):
        torch.cuda.synchronize()
        expected = {k: t.clone() for k, t in flatten(optimizer.state_dict()).items()}   # the truth at this point
        started = time.perf_counter()
        snapshot.write("optimizer", optimizer.state_dict(), lambda tree: written.append(flatten(tree)))
        seconds.append(time.perf_counter() - started)
        snapshot.submit()
        step(optimizer, params)          # changes the state while the writer may not have read it yet
        writer.wait(None)
        got = written[-1]
        mismatches += sum(not torch.equal(got[k].cpu(), expected[k].cpu()) for k in expected) + \
            len(set(expected) ^ set(got))
    # The GPU still busy with ~0.1 s of queued work when the snapshot is taken, as after a training step.
    work = torch.randn(8192, 8192, device="cuda")
    busy_seconds = []
    for _ in range(3):
        for _ in range(100):
            work @ work
        started = time.perf_counter()
        snapshot.write("optimizer", optimizer.state_dict(), lambda tree: written.append(flatten(tree)))
        busy_seconds.append(time.perf_counter() - started)
        snapshot.submit()
        writer.wait(None)
    # A plain copy on the CPU side, for comparison: it pulls paged state to the host, and the next step pulls it back.
    torch.cuda.synchronize()
    started = time.perf_counter()
    _ = {k: t.detach().to("cpu", copy=True) for k, t in flatten(optimizer.state_dict()).items()}
    plain_seconds = time.perf_counter() - started
    started = time.perf_counter()
    step(optimizer, params)
    torch.cuda.synchronize()
    step_after_plain = time.perf_counter() - started
    started = time.perf_counter()
    step(optimizer, params)
    torch.cuda.synchronize()
    step_plain = time.perf_counter() - started
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "bitsandbytes": bnb.__version__,
              "optimizer_state_mb": round(sum(t.numel() * t.element_size() for t in state.values()) / 2**20, 1),
              "state_tensors": len(state), "paged_tensors": paged, "mismatched_tensors": mismatches,
              "snapshot_write_seconds_on_training_thread": [round(t, 4) for t in seconds],
              "snapshot_write_seconds_busy_gpu": [round(t, 4) for t in busy_seconds],
              "plain_cpu_copy_seconds": round(plain_seconds, 4),
              "optimizer_step_after_plain_copy_s": round(step_after_plain, 4),
              "optimizer_step_otherwise_s": round(step_plain, 4)}
    print(json.dumps(result), flush=True)
    return 1 if mismatches or not paged else 0


if __name__ == "__main__":
    sys.exit(main())
