"""Shared fixtures: a tiny Llama built here (never downloaded), the shipped sample data, and a runner
that starts `python -m job` as a subprocess with environment variables, exactly as the container does."""
from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# The services' test doubles, for every test module: hub_server, and moto_server, seaweedfs_server and s3_server
# (both S3 servers in turn).
from fakes.hub import hub_server  # noqa: F401  (fixture)
from fakes.s3 import moto_server, s3_server, seaweedfs_server  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA = ROOT / "data" / "persona_sample.jsonl"

# The tests' own torch work (test_recompute.py, test_speed.py, ...) on one thread, as the jobs run (job_env): two
# xdist workers and their jobs share the CPU, and on a busy CPU OpenMP's threads wait on each other. The selective
# recomputation test took 26 s on torch's default two threads with both cores busy, 12 s on one.
torch.set_num_threads(1)

# Fast settings for a tiny model on a CPU; tests add what they exercise.
CPU_SETTINGS = {
    "REQUIRE_GPU": "false",
    "OPTIM": "adamw_torch",
    "NUM_SAMPLES": "64",
    "PER_DEVICE_TRAIN_BATCH_SIZE": "4",
    "LEARNING_RATE": "1e-2",
    "LORA_R": "8",
    "LORA_TARGET_MODULES": "all-linear",
    "MAX_SEQ_LENGTH": "384",
    "MAX_STEPS": "12",
    "SAVE_STEPS": "4",
    "LOGGING_STEPS": "2",
    "EVAL_STEPS": "6",
    "EVAL_FRACTION": "0.1",
    "EVAL_GENERATIONS": "4",
    "EVAL_MAX_NEW_TOKENS": "8",
    "LOG_FORMAT": "json",
    # A run SIGKILLed by a test leaves its lease behind; the restart waits this long for it to expire (60 s by default).
    "LEASE_TTL_SECONDS": "4",
}


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """A folder that `build` fills once per test session and every xdist worker then reads: the first worker to
    ask builds it while the others wait on a lock (each would otherwise build its own, a job run for some)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:   # no xdist: this process is the whole session
        where = tmp_path_factory.mktemp(name)
        build(where)
        return where
    root = tmp_path_factory.getbasetemp().parent   # this session's folder, above each worker's own
    where, built = root / name, root / f"{name}.built"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built.exists():   # a worker whose build failed left no mark: the next one tries again
            shutil.rmtree(where, ignore_errors=True)
            where.mkdir()
            build(where)
            built.touch()
    return where


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Built once per session; tests read it and never write into it."""
    from job.tiny import build_tiny_model
    return built_once(tmp_path_factory, "tiny-llama", build_tiny_model)


@dataclass
class JobResult:
    returncode: int
    stdout: str
    stderr: str

    def events(self, name: str | None = None) -> list[dict]:
        out = []
        for line in self.stdout.splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if name is None or event.get("event") == name:
                    out.append(event)
        return out


@contextlib.contextmanager
def signals_restored():
    """Run.main installs the job's SIGTERM and SIGINT handlers: a test that runs it in this process puts pytest's
    back after it."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def job_env(**settings: str) -> dict[str, str]:
    """A clean environment: only what the job needs, so the host's variables can't leak in."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR", "SYSTEMROOT")}
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "PYTHONUNBUFFERED": "1",
                # A tiny model gains nothing from threads; one per job lets two tests share the CPU.
                "OMP_NUM_THREADS": "1"})
    env.update(settings)
    return env


def run_job(*args: str, env: dict[str, str], timeout: float = 600) -> JobResult:
    proc = subprocess.run([sys.executable, "-m", "job", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    return JobResult(proc.returncode, proc.stdout, proc.stderr)


UNINTERRUPTED_RUN_ID = "resume-story"


@pytest.fixture(scope="session")
def uninterrupted(tiny_model, tmp_path_factory) -> dict:
    """The adapter of a run that was never interrupted (RUN_ID resume-story, CPU_SETTINGS): what every resumed run
    must end with. One run for the whole session, not one per module and worker."""
    from safetensors.torch import load_file

    def train(where: Path) -> None:
        env = job_env(**{**CPU_SETTINGS, "BASE_MODEL": str(tiny_model), "DATASET": str(SAMPLE_DATA),
                         "RUN_ID": UNINTERRUPTED_RUN_ID, "CHECKPOINT_URI": str(where / "store"),
                         "OUTPUT_DIR": str(where / "out")})
        result = run_job("train", env=env)
        assert result.returncode == 0, result.stderr

    where = built_once(tmp_path_factory, "uninterrupted", train)
    return load_file(where / "out" / "adapter_model.safetensors")


@pytest.fixture
def cpu_job(tiny_model, tmp_path):
    """Settings for a CPU run of the tiny model on the sample data, with a local store in tmp_path."""
    def settings(**overrides: str) -> dict[str, str]:
        return job_env(**{**CPU_SETTINGS, "BASE_MODEL": str(tiny_model), "DATASET": str(SAMPLE_DATA),
                          "CHECKPOINT_URI": str(tmp_path / "store"), "OUTPUT_DIR": str(tmp_path / "out"),
                          "HF_HOME": str(tmp_path / "hf"), **overrides})
    return settings


class OpCounter(TorchDispatchMode):
    """How many times each op runs under it (`counts`, by the op's name): which operators a computation reaches, and
    how often (a recomputed op runs again in the backward pass, a saved one does not)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))
