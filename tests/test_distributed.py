"""More than one GPU: the same job under torchrun, here as two CPU workers talking over gloo.

One rank commits each checkpoint after all ranks reach it; a signal to any rank stops all of them at one
step with one committed checkpoint; and a run resumes at another world size on the data position it left.
The launcher runs the preflight checks once, before any worker starts; the workers do not repeat them.
"""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_job
from test_resume import Running, committed

from job.checks import CHECKS


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture
def ddp_job(cpu_job):
    def settings(**overrides: str) -> dict[str, str]:
        return cpu_job(**{"RUN_ID": "ddp-story", "MASTER_PORT": free_port(), "LOGGING_STEPS": "1",
                          "LORA_DROPOUT": "0", "MAX_STEPS": "10",
                          # A worker that aborts in C++ prints its threads' Python stacks, for the failure message.
                          "PYTHONFAULTHANDLER": "1", **overrides})
    return settings


@pytest.fixture
def hub(hub_server, tiny_model):
    """The fake Hub, holding the tiny model as acme/tiny-llama."""
    server = hub_server()
    server.add_repo("acme/tiny-llama", {p.name: p.read_bytes() for p in tiny_model.iterdir() if p.is_file()})
    return server


def from_hub(env: dict[str, str], hub) -> dict[str, str]:
    """`env` with BASE_MODEL on the fake Hub, reachable (not offline)."""
    env = {**env, "BASE_MODEL": "acme/tiny-llama", "HF_ENDPOINT": hub.endpoint}
    env.pop("HF_HUB_OFFLINE")
    return env


def manifests(store):
    return {p.parent.name: json.loads(p.read_text()) for p in store.glob("ddp-story/checkpoints/*/MANIFEST.json")}


def workers(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """The torchrun workers under our launcher, by rank."""
    found = {}
    deadline = time.time() + 60
    while len(found) < 2 and time.time() < deadline:
        for child in launcher.children(recursive=True):
            try:
                env = child.environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if "LOCAL_RANK" in env and "job" in child.cmdline():
                found[int(env["RANK"])] = child
        time.sleep(0.1)
    return found


def test_two_workers_train_and_every_checkpoint_is_committed_once_with_all_ranks_state(ddp_job, hub, tmp_path):
    # Whole layers recomputed: their gradients come out of the recomputation's own autograd call, and DDP's hooks
    # must still see each parameter's gradient once a step.
    settings = dict(NPROC_PER_NODE="2", MAX_STEPS="8", SAVE_STEPS="4", GRADIENT_CHECKPOINTING="true")
    result = run_job("train", env=from_hub(ddp_job(**settings), hub))
    assert result.returncode == 0, result.stderr[-3000:]
    # The launcher ran the checks and showed each row once; the workers did not ask the Hub again.
    assert [e["check"] for e in result.events("preflight") if "check" in e] == [name for name, _, _ in CHECKS]
    assert hub.count("auth_check") == 1, hub.counts
    found = manifests(tmp_path / "store")
    assert sorted(found) == ["step-00000004", "step-00000008"]
    for manifest in found.values():
        assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "adapter_model.safetensors"} <= \
            set(manifest["files"])
    assert [e["step"] for e in result.events("checkpoint") if e.get("step")] == [4, 8]
    status = json.loads(run_job("status", "--json", env=ddp_job()).stdout)
    assert status["phase"] == "done" and status["attempt"] == 1
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    # A node that starts again after the run has finished training does not wait for peers that left.
    for node in ("0", "1"):
        again = run_job("train", env=from_hub(ddp_job(**settings, NNODES="2", NODE_RANK=node), hub), timeout=90)
        assert again.returncode == 0, again.stderr[-2000:]


def test_a_sigterm_to_one_rank_stops_every_rank_with_one_committed_checkpoint(ddp_job, tmp_path):
    run = Running(ddp_job(NPROC_PER_NODE="2", MAX_STEPS="200", SAVE_STEPS="4"), tmp_path / "launcher.log")
    run.until(committed(4))
    ranks = workers(psutil.Process(run.proc.pid))
    assert set(ranks) == {0, 1}
    ranks[1].send_signal(signal.SIGTERM)
    assert run.finish() == 75
    stopped = [e for e in run.events if e["event"] == "stopped"]
    assert stopped and "a signal to another rank" in stopped[0]["message"]
    stop_step = int(re.search(r"at step (\d+)", stopped[0]["message"])[1])
    steps = sorted(int(name[5:]) for name in manifests(tmp_path / "store"))
    assert steps[-1] == stop_step, f"the step in flight must be the newest committed one: {steps}, {stop_step}"
    status = json.loads(run_job("status", "--json", env=ddp_job()).stdout)
    assert status["newest_checkpoint"] == steps[-1]


def test_a_sigterm_during_the_launchers_checks_exits_75_before_any_worker_starts(ddp_job, hub, tmp_path):
    # The Hub holds back its answer to the launcher's access check of BASE_MODEL: the checks are still running
    # when the pod is told to stop.
    hub.fail_next("auth_check", status=None, delay=30)
    proc = subprocess.Popen([sys.executable, "-m", "job", "train"], env=from_hub(ddp_job(NPROC_PER_NODE="2"), hub),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not hub.count("auth_check"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    assert not psutil.Process(proc.pid).children(recursive=True), "no worker may start before the checks pass"
    proc.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()   # a no-op once it has exited; else it must not go on to start workers
    assert proc.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events] == ["stopped"], events
    assert "SIGTERM during the preflight checks" in events[0]["message"]
    assert not list((tmp_path / "store").rglob("run.json")), "rank 0 of a worker would have written run.json"


def logged_losses(result_or_events) -> dict[int, float]:
    events = result_or_events if isinstance(result_or_events, list) else result_or_events.events()
    return {e["step"]: e["loss"] for e in events if e["event"] == "progress"}


def test_a_run_resumes_on_another_gpu_count_at_the_same_data_position(ddp_job, tmp_path):
    # Both ways, 2 -> 1 and 1 -> 2 GPUs, against one uninterrupted run (one test: the reference run is shared).
    reference = run_job("train", env=ddp_job(NPROC_PER_NODE="1", RUN_ID="ddp-reference",
                                             CHECKPOINT_URI=str(tmp_path / "reference"),
                                             OUTPUT_DIR=str(tmp_path / "reference-out")))
    assert reference.returncode == 0, reference.stderr[-3000:]
    want = logged_losses(reference)
    spread = [abs(want[s] - want[s + 1]) for s in range(5, max(want))]
    assert sum(spread) / len(spread) > 2e-2, "the losses must tell batches apart for this check to mean anything"

    for before, after in (("2", "1"), ("1", "2")):
        where = {"CHECKPOINT_URI": str(tmp_path / f"store-{before}-{after}"),
                 "OUTPUT_DIR": str(tmp_path / f"out-{before}-{after}"), "SAVE_STEPS": "4"}
        run = Running(ddp_job(NPROC_PER_NODE=before, **where), tmp_path / f"first-{before}-{after}.log")
        run.until(committed(4))
        run.proc.send_signal(signal.SIGTERM)
        assert run.finish() == 75, (before, after)
        resumed_from = max(int(n[5:]) for n in manifests(tmp_path / f"store-{before}-{after}"))

        restart = run_job("train", env=ddp_job(NPROC_PER_NODE=after, **where))
        assert restart.returncode == 0, (before, after, restart.stdout[-4000:], restart.stderr[-6000:])
        got = logged_losses(restart)
        assert min(got) == resumed_from + 1, "the restart continues at the next step, not from the start"
        # Each step after the resume trains on the batch the uninterrupted run trained on at that step: the
        # losses agree to float noise, while different batches differ by far more (the spread above).
        for step, loss in got.items():
            assert abs(loss - want[step]) < 2e-3, (before, after, step, loss, want[step])
        final = load_file(tmp_path / f"out-{before}-{after}" / "adapter_model.safetensors")
        assert final.keys() and all(torch.isfinite(t).all() for t in final.values())


def test_every_node_resumes_from_the_step_rank_0_chose_or_the_run_fails(ddp_job, moto_server, tmp_path):
    # Two nodes of one process each, one bucket. At the restart node 1 reads the newest checkpoint through a proxy
    # that corrupts it: node 1 must fail the run, not resume from an older step than node 0 (which diverges).
    from fakes.s3 import FlakyProxy
    from test_resume import RUN_ID, s3_bucket_store

    store = s3_bucket_store(moto_server)

    def node(rank: int, port: str, **extra: str) -> dict[str, str]:
        return ddp_job(**{"RUN_ID": RUN_ID, "CHECKPOINT_URI": store.uri, **store.env, "NNODES": "2",
                          "NODE_RANK": str(rank), "MASTER_PORT": port, "OUTPUT_DIR": str(tmp_path / f"node{rank}"),
                          "MAX_STEPS": "16", "SAVE_STEPS": "4", "LEASE_TTL_SECONDS": "3", **extra})

    port = free_port()
    first = [Running(node(rank, port), tmp_path / f"first-{rank}.log") for rank in (0, 1)]
    first[0].until(committed(8))
    first[0].proc.send_signal(signal.SIGTERM)
    assert [run.finish() for run in first] == [75, 75]
    newest = store.committed_steps()[-1]
    assert newest >= 8

    port = free_port()
    with FlakyProxy(moto_server.endpoint) as proxy:
        proxy.fail_next(100, "corrupt", f"/checkpoints/step-{newest:08d}/adapter_model.safetensors")
        broken = [Running(node(0, port), tmp_path / "broken-0.log"),
                  Running(node(1, port, AWS_ENDPOINT_URL_S3=proxy.endpoint), tmp_path / "broken-1.log")]
        codes = [run.finish() for run in broken]
    assert codes[1] not in (0, 75) and codes[0] != 0, codes
    said = (tmp_path / "broken-1.log").read_text()
    assert f"cannot download checkpoint step {newest}, which rank 0 resumes from" in said, said[-3000:]
    assert "failing rather than resuming from another step" in said
    assert not [e for run in broken for e in run.events if e["event"] == "progress"], "nobody trained"

    port = free_port()
    healed = [Running(node(rank, port), tmp_path / f"healed-{rank}.log") for rank in (0, 1)]
    assert [run.finish() for run in healed] == [0, 0]
    assert healed[0].events[[e["event"] for e in healed[0].events].index("resume")]["message"] == \
        f"resuming from committed checkpoint step {newest}"
    assert [p.name for p in (tmp_path / "node1" / "work" / "resume").iterdir()] == [f"step-{newest:08d}"]
    assert min(logged_losses(healed[0].events)) == newest + 1
