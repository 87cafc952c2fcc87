"""Several GPUs: torchrun starts one worker per GPU; the workers agree on when to stop, and only rank 0
talks to the store and the Hub.

The effective batch is that of the single-GPU run unless SCALE_BATCH_WITH_GPUS=true: the same sequences per
optimizer step are split over the GPUs, so with the Trainer's seeded sampler every optimizer step sees the
same samples whatever the GPU count, and a checkpoint's step maps to the same data position at any world size.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Mapping

from .config import Config, ExitCode

# Set by `launch` for its workers: their launcher passed the preflight checks. Internal, not a setting: the
# leading underscore keeps it out of the config's misspelt-setting check.
LAUNCHER_CHECKED = "_JOB_LAUNCHER_CHECKED"
# The Trainer's ddp_timeout (30 min), not NCCL's 10: the other ranks wait in a barrier while rank 0 evaluates a
# checkpoint (EVAL_AT_CHECKPOINTS) or uploads.
DDP_TIMEOUT_SECONDS = 1800


@dataclass(frozen=True)
class Topology:
    """Where this process sits, as torchrun tells its workers (RANK, LOCAL_RANK, WORLD_SIZE)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    is_worker: bool = False         # started by torchrun (as opposed to the process that starts it)
    launcher_checked: bool = False  # our launcher ran the checks first: only each GPU's own are left

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "Topology":
        if "LOCAL_RANK" not in environ:
            return cls()
        return cls(rank=int(environ.get("RANK", 0)), local_rank=int(environ["LOCAL_RANK"]),
                   world_size=int(environ.get("WORLD_SIZE", 1)), is_worker=True,
                   launcher_checked=environ.get(LAUNCHER_CHECKED) == "1")


def wants_launch(config: Config, topology: Topology) -> bool:
    return not topology.is_worker and config.nproc_per_node * config.nnodes > 1


class BatchSplitError(ValueError):
    pass


def split_batch(config: Config, world_size: int) -> tuple[int, int]:
    """(per-GPU micro-batch, accumulation steps) for this world size."""
    batch, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    if world_size == 1 or config.scale_batch_with_gpus:
        return batch, accumulation
    if batch % world_size == 0:
        return batch // world_size, accumulation
    if accumulation % world_size == 0:
        return batch, accumulation // world_size
    raise BatchSplitError(
        f"PER_DEVICE_TRAIN_BATCH_SIZE={batch} x GRADIENT_ACCUMULATION_STEPS={accumulation} sequences per step "
        f"cannot be split evenly over {world_size} GPUs; make one of them a multiple of {world_size}, or set "
        f"SCALE_BATCH_WITH_GPUS=true to train {batch} sequences per GPU per micro-step")


def pin_gpu(topology: Topology) -> None:
    """A worker keeps to its own GPU (its local rank), for the 4-bit base and every CUDA call after."""
    import torch
    if topology.is_worker and torch.cuda.is_available():
        torch.cuda.set_device(topology.local_rank)


def init_process_group() -> None:
    """Join the workers' process group (NCCL on GPUs, gloo on CPUs), once."""
    import datetime

    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(seconds=DDP_TIMEOUT_SECONDS))


def _initialized() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _initialized():
        import torch.distributed as dist
        dist.barrier()


def from_rank_0(value):
    """Rank 0's value (anything picklable) on every rank: one decision, taken once, for all."""
    if not _initialized():
        return value
    import torch.distributed as dist
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any rank: a signal to one worker stops them all at one step."""
    if not _initialized():
        return flag
    import torch
    import torch.distributed as dist
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def launch(config: Config) -> ExitCode:
    """Start `python -m job train` once per GPU under torchrun (PyTorch's own elastic launcher), once the
    preflight checks passed here (job/cli.py), and turn the workers' fate into the job's exit code: 2 if any got
    bad input, 73 if another process holds the run, 75 if stopped by a signal, else 0 or 1."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ[LAUNCHER_CHECKED] = "1"   # the workers inherit it: they skip what was checked here
    # torchrun gives workers 30 s after passing on a SIGTERM before it kills them; ours need the step in flight,
    # the local save and SHUTDOWN_BUDGET_SECONDS for the upload.
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(config.shutdown_budget_seconds) + 60))
    args = parse_args([
        f"--nnodes={config.nnodes}", f"--node-rank={config.node_rank}",
        f"--nproc-per-node={config.nproc_per_node}", f"--master-addr={config.master_addr}",
        f"--master-port={config.master_port}", "--max-restarts=0", "-m", "job", "train"])
    try:
        run(args)
        return ExitCode.DONE
    except SignalException:
        return ExitCode.STOPPED   # the workers got the signal too: each finished its step and committed
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        if ExitCode.BAD_INPUT in codes:
            return ExitCode.BAD_INPUT
        if ExitCode.LEASE_HELD in codes:
            return ExitCode.LEASE_HELD
        if codes <= {ExitCode.STOPPED, -signal.SIGTERM, -signal.SIGINT}:
            return ExitCode.STOPPED
        return ExitCode.FAILED
