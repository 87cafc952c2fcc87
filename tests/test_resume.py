"""A preempted run continues where it stopped and ends with the adapter it would have produced anyway.

The stories run against a local path and two real S3 servers over HTTP (through boto3, as MinIO or AWS would be
reached): moto, and SeaweedFS, which checks every request's signature. Stories whose S3 traffic is the same as
another's (a refused restart, a damaged file) skip SeaweedFS to keep the suite short. The job always runs as a
subprocess, killed and restarted like a pod.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, UNINTERRUPTED_RUN_ID, run_job
from fakes.s3 import FlakyProxy

RUN_ID = UNINTERRUPTED_RUN_ID   # every resumed run must end as the `uninterrupted` fixture's run (conftest.py)


class Store:
    """The test's own view of a checkpoint store: list, read and damage objects."""

    def __init__(self, kind: str, uri: str, env: dict[str, str], root: Path | None = None, client=None,
                 bucket: str | None = None, prefix: str = "", secret: str | None = None):
        self.kind, self.uri, self.env, self.secret = kind, uri, env, secret
        self.root, self.client, self.bucket, self.prefix = root, client, bucket, prefix

    def keys(self) -> list[str]:
        if self.kind == "local":
            return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()) \
                if self.root.exists() else []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        return sorted(o["Key"][len(self.prefix):] for page in pages for o in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        if self.kind == "local":
            return (self.root / key).read_bytes()
        return self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()

    def write(self, key: str, data: bytes) -> None:
        if self.kind == "local":
            (self.root / key).write_bytes(data)
        else:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def committed_steps(self) -> list[int]:
        return sorted(int(k.split("/")[2][5:]) for k in self.keys()
                      if k.startswith(f"{RUN_ID}/checkpoints/") and k.endswith("/MANIFEST.json"))

    def checkpoint_keys(self, step: int) -> list[str]:
        return [k for k in self.keys() if k.startswith(f"{RUN_ID}/checkpoints/step-{step:08d}/")]


def s3_bucket_store(server) -> Store:
    bucket = server.make_bucket(f"ckpt-{uuid.uuid4().hex[:12]}")
    return Store("s3", f"s3://{bucket}/runs", server.env(), client=server.client(), bucket=bucket, prefix="runs/",
                 secret=server.secret_key)


@pytest.fixture(params=["local", "moto", "seaweedfs"])
def store(request, tmp_path):
    if request.param == "local":
        return Store("local", str(tmp_path / "store"), {}, root=tmp_path / "store")
    return s3_bucket_store(request.getfixturevalue(f"{request.param}_server"))


@pytest.fixture
def s3_store(s3_server):
    """A fresh bucket on each S3 server in turn."""
    return s3_bucket_store(s3_server)


def _job(cpu_job, store):
    def settings(**overrides: str) -> dict[str, str]:
        return cpu_job(**{"RUN_ID": RUN_ID, "CHECKPOINT_URI": store.uri, **store.env, **overrides})
    return settings


@pytest.fixture
def job(cpu_job, store):
    return _job(cpu_job, store)


@pytest.fixture
def s3_job(cpu_job, s3_store):
    return _job(cpu_job, s3_store)


class Running:
    """A job started in the background whose JSON lines we read as they come."""

    def __init__(self, env: dict[str, str], log: Path):
        self.stderr = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "job", "train"], env=env, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.events: list[dict] = []

    def until(self, predicate) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                event = json.loads(line)
                self.events.append(event)
                if predicate(event):
                    return event
        raise AssertionError(f"the job ended (rc={self.proc.wait()}) before the awaited event: {self.events[-3:]}")

    def finish(self) -> int:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.events.append(json.loads(line))
        self.stderr.close()
        return self.proc.wait(120)


def committed(step: int):
    return lambda e: e["event"] == "checkpoint" and e.get("step") == step


def progress_past(step: int):
    return lambda e: e["event"] == "progress" and e["step"] >= step


def final_adapter(tmp_path: Path) -> dict[str, torch.Tensor]:
    return load_file(tmp_path / "out" / "adapter_model.safetensors")


def assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_a_run_killed_mid_training_resumes_and_ends_bit_identical(job, store, tmp_path, uninterrupted):
    run = Running(job(), tmp_path / "first.log")
    run.until(committed(4))
    run.until(progress_past(6))                      # between checkpoints
    run.proc.send_signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    assert 4 in store.committed_steps()

    restart = run_job("train", env=job())
    assert restart.returncode == 0, restart.stderr
    resumed = restart.events("resume")
    assert resumed and resumed[-1]["message"].startswith("resuming from committed checkpoint step")
    assert restart.events("progress")[0]["step"] > 4, "the restart must not train from the start"
    assert_bit_identical(final_adapter(tmp_path), uninterrupted)
    status = json.loads(run_job("status", "--json", env=job()).stdout)
    assert status["phase"] == "done" and status["attempt"] == 2 and status["step"] == 12


def test_a_kill_during_an_upload_leaves_a_checkpoint_that_is_never_trusted(s3_job, s3_store, tmp_path,
                                                                            uninterrupted, s3_server):
    # An upload in flight is an S3 story: the local store writes the same manifest-last way.
    job, store = s3_job, s3_store
    with FlakyProxy(s3_server.endpoint) as proxy:
        stalled = proxy.hold("step-00000008/optimizer.pt")
        run = Running(job(AWS_ENDPOINT_URL_S3=proxy.endpoint), tmp_path / "first.log")
        run.until(committed(4))
        assert stalled.wait(120), "the step-8 upload never started"
        run.proc.send_signal(signal.SIGKILL)         # the pod dies while optimizer.pt is in flight
        run.finish()
        proxy.release()
    partial = store.checkpoint_keys(8)
    assert partial and not any(k.endswith("MANIFEST.json") for k in partial), partial
    assert store.committed_steps() == [4]

    restart = run_job("train", env=job())
    assert restart.returncode == 0, restart.stderr
    assert any("uncommitted checkpoint leftover" in e["message"] for e in restart.events("checkpoint"))
    assert restart.events("resume")[-1]["message"] == "resuming from committed checkpoint step 4"
    assert_bit_identical(final_adapter(tmp_path), uninterrupted)


@pytest.mark.parametrize("store", ["local", "moto"], indirect=True)
def test_sigterm_commits_the_step_in_flight_and_exits_75(job, store, tmp_path, uninterrupted):
    run = Running(job(), tmp_path / "first.log")
    run.until(committed(4))
    run.until(progress_past(6))
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 75
    stopped_at = [e for e in run.events if e["event"] == "stopped"][0]
    steps = store.committed_steps()
    assert steps[-1] > 6, f"the step in flight must be committed, got {steps}"
    assert f"newest committed step {steps[-1]}" in stopped_at["message"]
    status = json.loads(store.read(f"{RUN_ID}/status.json"))
    assert status["stopped_by"] == "SIGTERM" and status["newest_checkpoint"] == steps[-1]

    restart = run_job("train", env=job())
    assert restart.returncode == 0, restart.stderr
    assert restart.events("resume")[-1]["message"] == f"resuming from committed checkpoint step {steps[-1]}"
    assert_bit_identical(final_adapter(tmp_path), uninterrupted)


def test_a_second_signal_exits_at_once_and_the_last_commit_stays_intact(s3_job, s3_store, tmp_path, s3_server):
    # The first SIGTERM saves the step in flight; its upload is held (a slow store), and the job would wait for
    # it up to SHUTDOWN_BUDGET_SECONDS (60 s here). The second SIGTERM, sent once the first is acknowledged, must
    # end the job at once, before that checkpoint is committed, leaving the last committed one intact.
    job, store = s3_job, s3_store
    with FlakyProxy(s3_server.endpoint) as proxy:
        run = Running(job(MAX_STEPS="200", SAVE_STEPS="4", SHUTDOWN_BUDGET_SECONDS="60",
                          AWS_ENDPOINT_URL_S3=proxy.endpoint), tmp_path / "first.log")
        run.until(committed(4))
        held = proxy.hold(f"/{RUN_ID}/checkpoints/")      # every checkpoint upload from here on hangs
        committed_before = store.committed_steps()
        run.proc.send_signal(signal.SIGTERM)
        run.until(lambda e: e["event"] == "stop")          # acknowledged: finishing the step, then saving
        assert held.wait(120), "the stop checkpoint's upload never started"
        run.proc.send_signal(signal.SIGTERM)
        second = time.monotonic()
        code = run.finish()
        exited_after = time.monotonic() - second
        proxy.release()
    assert code == 75
    assert exited_after < 15, f"the second signal took {exited_after:.0f} s to end the job"
    stops = [e["message"] for e in run.events if e["event"] == "stop"]
    assert stops[-1] == "second SIGTERM: exiting now; the last committed checkpoint stands", stops
    assert not [e for e in run.events if e["event"] == "stopped"], "it went on to the orderly stop"
    assert store.committed_steps() == committed_before and committed_before[-1] >= 4
    from job.store import open_store
    from job.store.run_store import RunStore
    saved = {k: os.environ.get(k) for k in store.env}
    os.environ.update(store.env)
    try:
        run_store = RunStore(open_store(store.uri), RUN_ID)
        run_store.download_checkpoint(committed_before[-1], tmp_path / "verify")   # raises if anything is off
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.parametrize("store", ["local", "moto"], indirect=True)
def test_a_flipped_byte_sends_the_resume_to_the_older_checkpoint(job, store, tmp_path, uninterrupted):
    run = Running(job(), tmp_path / "first.log")
    run.until(committed(8))
    run.proc.send_signal(signal.SIGKILL)
    run.finish()
    key = f"{RUN_ID}/checkpoints/step-00000008/adapter_model.safetensors"
    data = bytearray(store.read(key))
    data[len(data) // 2] ^= 0x01
    store.write(key, bytes(data))

    restart = run_job("train", env=job())
    assert restart.returncode == 0, restart.stderr
    messages = [e["message"] for e in restart.events("resume")]
    assert any(m.startswith("checkpoint step 8 is unusable") and "sha256" in m for m in messages), messages
    assert messages[-1] == "resuming from committed checkpoint step 4"
    assert_bit_identical(final_adapter(tmp_path), uninterrupted)


@pytest.mark.parametrize("store", ["local", "moto"], indirect=True)
def test_a_restart_with_a_different_lora_r_is_refused(job, store, tmp_path):
    run = Running(job(), tmp_path / "first.log")
    run.until(committed(4))
    run.proc.send_signal(signal.SIGKILL)
    run.finish()
    before = {k: store.read(k) for k in store.keys()}

    restart = run_job("train", env=job(LORA_R="16"))
    assert restart.returncode == 2
    line = restart.stderr.strip().splitlines()
    assert len(line) == 1 and "RUN_ID='resume-story' was started with other settings: LORA_R (stored 8, now 16)" \
        in line[0], line
    assert {k: store.read(k) for k in store.keys()} == before, "a refused restart must not touch the store"


@pytest.mark.parametrize("store", ["local", "seaweedfs"], indirect=True)   # suite time: one S3 server is enough
def test_retention_keeps_the_newest_and_the_one_resumed_from(job, store, tmp_path):
    run = Running(job(SAVE_STEPS="2"), tmp_path / "first.log")
    run.until(committed(4))
    run.proc.send_signal(signal.SIGKILL)
    run.finish()
    resume_from = store.committed_steps()[-1]

    restart = run_job("train", env=job(SAVE_STEPS="2", SAVE_TOTAL_LIMIT="2"))
    assert restart.returncode == 0, restart.stderr
    assert store.committed_steps() == sorted({resume_from, 10, 12})
    leftovers = {k.split("/")[2] for k in store.keys() if "/checkpoints/" in k}
    assert leftovers == {f"step-{s:08d}" for s in store.committed_steps()}, "pruned checkpoints leave nothing"


def test_the_store_never_holds_credentials(s3_job, s3_store, tmp_path):
    job, store = s3_job, s3_store
    result = run_job("train", env=job(MAX_STEPS="4"))
    assert result.returncode == 0, result.stderr
    assert store.secret not in result.stdout + result.stderr
    for key in store.keys():
        assert store.secret.encode() not in store.read(key), key


def test_transient_s3_errors_during_training_are_retried(s3_job, s3_store, tmp_path, s3_server, uninterrupted):
    # Faults injected before training would be spent on the preflight probe: these come after the first commit,
    # on the uploads of the checkpoints that follow, and the run must still end as if nothing had happened.
    job, store = s3_job, s3_store
    with FlakyProxy(s3_server.endpoint) as proxy:
        run = Running(job(AWS_ENDPOINT_URL_S3=proxy.endpoint), tmp_path / "run.log")
        run.until(committed(4))
        step_8 = f"/{RUN_ID}/checkpoints/step-00000008/"
        proxy.fail_next(2, "503", step_8)
        proxy.fail_next(1, "reset", step_8)
        proxy.fail_next(2, "500", step_8)
        assert run.finish() == 0, (tmp_path / "run.log").read_text()[-3000:]
        faulted = [r for r in proxy.records if r.outcome != "forwarded"]
    assert [r.outcome for r in faulted] == ["503", "503", "reset", "500", "500"]
    assert all(step_8 in r.path for r in faulted)
    assert store.committed_steps()[-1] == 12
    assert_bit_identical(final_adapter(tmp_path), uninterrupted)


def test_a_missing_bucket_stops_before_loading(cpu_job, moto_server, tmp_path):
    env = cpu_job(**{**moto_server.env(), "CHECKPOINT_URI": "s3://no-such-bucket/runs"})
    result = run_job("train", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-bucket" in lines[0] and "NoSuchBucket" in lines[0], lines
    assert not result.events("model"), "preflight stops the job before the model is loaded"


def test_a_checkpoint_holds_the_adapter_exactly_as_peft_writes_it(cpu_job, tmp_path):
    # Checkpoint tensors are snapshotted and written off the training thread; the files must still be the ones
    # peft's own save_pretrained writes (the final adapter is written by it, at the same step).
    result = run_job("train", env=cpu_job(MAX_STEPS="4", SAVE_STEPS="4"))
    assert result.returncode == 0, result.stderr
    checkpoint = next((tmp_path / "store").glob("*/checkpoints/step-00000004"))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (checkpoint / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name


# ---------------------------------------------------------------- a full disk, a store that refuses

FULL_DISK = ROOT / "tests" / "fakes" / "full_disk"


def on_a_full_disk(env: dict[str, str], pattern: str) -> dict[str, str]:
    """The job with its disk filling up halfway through the first file it writes whose path matches `pattern`
    (tests/fakes/full_disk: ENOSPC at the file layer, in the job's own process)."""
    return {**env, "PYTHONPATH": f"{FULL_DISK}{os.pathsep}{env['PYTHONPATH']}", "FULL_DISK": pattern}


def assert_every_committed_checkpoint_loads(store: Store, where: Path) -> None:
    """Each committed checkpoint downloads, matches its manifest, and its files load as the Trainer loads them."""
    from job.store import open_store
    from job.store.run_store import RunStore
    run_store = RunStore(open_store(store.uri), RUN_ID)
    for step in run_store.committed_steps():
        folder = run_store.download_checkpoint(step, where / f"verify-{step}")
        load_file(folder / "adapter_model.safetensors")
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            torch.load(folder / name, weights_only=False)
        assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step


def skipped(step: int):
    return lambda e: e["event"] == "checkpoint_skipped" and e["step"] == step


@pytest.mark.parametrize("store", ["local"], indirect=True)
def test_a_disk_that_fills_up_mid_checkpoint_never_commits_it_and_the_run_goes_on(job, store, tmp_path,
                                                                                  uninterrupted):
    # The disk fills up halfway through step 8's trainer_state.json (transformers writes it on the training thread).
    run = Running(on_a_full_disk(job(), r"checkpoint-8/trainer_state\.json$"), tmp_path / "first.log")
    event = run.until(skipped(8))
    assert "No space left on device" in event["message"] and "the next save tries again" in event["message"]
    run.proc.send_signal(signal.SIGKILL)
    run.finish()
    assert store.committed_steps() == [4]
    assert_every_committed_checkpoint_loads(store, tmp_path)

    # The restart resumes, and this time the disk fills up halfway through step 8's optimizer state (written off
    # the training thread): that checkpoint is skipped again, and the run goes on to the end.
    restart = run_job("train", env=on_a_full_disk(job(), r"checkpoint-8/\.optimizer\.pt\."))
    assert restart.returncode == 0, restart.stderr
    assert restart.events("resume")[-1]["message"] == "resuming from committed checkpoint step 4"
    assert [e["step"] for e in restart.events("checkpoint_skipped")] == [8]
    assert store.committed_steps() == [4, 12]
    assert_every_committed_checkpoint_loads(store, tmp_path)
    assert_bit_identical(final_adapter(tmp_path), uninterrupted)
    assert not list((tmp_path / "out" / "work" / "trainer").rglob("checkpoint-*")), "local copies outlived commits"


@pytest.fixture
def hub(hub_server):
    return hub_server()


def test_an_upload_outage_of_two_saves_heals_and_the_run_publishes(s3_job, s3_store, s3_server, hub, tmp_path):
    # The store refuses every upload of steps 8 and 12 (AccessDenied, as a policy change would), then takes 16.
    job, store = s3_job, s3_store
    with FlakyProxy(s3_server.endpoint) as proxy:
        for step in (8, 12):
            proxy.fail_next(1, "403", f"/{RUN_ID}/checkpoints/step-{step:08d}/")
        env = job(MAX_STEPS="16", AWS_ENDPOINT_URL_S3=proxy.endpoint, HUB_MODEL_ID="alice/persona-adapter",
                  HF_TOKEN="hf_alice_write")
        env.pop("HF_HUB_OFFLINE")
        result = run_job("train", env=hub.subprocess_env(hf_home=env["HF_HOME"], token=env["HF_TOKEN"], base=env))
        assert [r.outcome for r in proxy.records if r.outcome != "forwarded"] == ["403", "403"]
    assert result.returncode == 0, result.stderr
    failed = result.events("upload_failed")
    assert [e["step"] for e in failed] == [8, 12] and all("AccessDenied" in e["message"] for e in failed), failed
    assert store.committed_steps() == [4, 16]
    assert not store.checkpoint_keys(8) and not store.checkpoint_keys(12), "failed uploads leave nothing behind"
    assert f"{RUN_ID}/final/MANIFEST.json" in store.keys()
    assert len([c for c in hub.commits("alice/persona-adapter") if c["message"].startswith("persona-qlora run ")]) == 1
    assert json.loads(store.read(f"{RUN_ID}/status.json"))["phase"] == "done"


@pytest.mark.parametrize("s3_server", ["moto"], indirect=True)
def test_an_outage_past_the_stall_limit_stops_the_job_with_one_line(s3_job, s3_store, s3_server, tmp_path):
    # Every checkpoint upload is refused (AccessDenied after the probe passed): nothing durable is ever made, and the
    # job stops once UPLOAD_STALL_SECONDS have passed since the first save, instead of training on for hours.
    job, store = s3_job, s3_store
    with FlakyProxy(s3_server.endpoint) as proxy:
        proxy.fail_next(100_000, "403", f"/{RUN_ID}/checkpoints/")
        result = run_job("train", env=job(MAX_STEPS="400", UPLOAD_STALL_SECONDS="3",
                                          AWS_ENDPOINT_URL_S3=proxy.endpoint))
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert errors[0].startswith("error: no checkpoint committed since step 4 was saved, UPLOAD_STALL_SECONDS=3 ago")
    assert "AccessDenied" in errors[0] and store.secret not in result.stderr
    assert result.events("progress")[-1]["step"] < 400 and store.committed_steps() == []
    assert f"{RUN_ID}/final/MANIFEST.json" not in store.keys()
    status = json.loads(store.read(f"{RUN_ID}/status.json"))
    assert status["phase"] == "failed" and status["error"] == errors[0][len("error: "):]


def test_a_stop_signal_while_a_finished_run_exits_leaves_its_exit_code_0(cpu_job):
    # `docker stop` or a pod's deletion can come while a finished run's process tears down: torch's interpreter
    # takes 1-2 s to exit after the `done` event, and in its last steps Python restores the default handlers, so a
    # SIGTERM then killed the process (exit 143, a failure to Kubernetes) though everything was committed. The job's
    # second start on a done run ("nothing to do") tears down the same way, so it is the process signalled here,
    # once per delay after its `done` line.
    env = cpu_job(MAX_STEPS="2", SAVE_STEPS="2", EVAL_FRACTION="0")
    assert run_job("train", env=env).returncode == 0
    alive_when_signalled = []
    for delay in (0.4, 1.0):
        proc = subprocess.Popen([sys.executable, "-m", "job", "train"], env=env, cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        for line in proc.stdout:
            if '"event": "done"' in line:
                break
        time.sleep(delay)
        alive = proc.poll() is None
        alive_when_signalled.append(alive)
        proc.send_signal(signal.SIGTERM)
        proc.stdout.read()
        code = proc.wait(timeout=60)
        assert code == 0, f"SIGTERM {delay} s after `done` ({'still running' if alive else 'exited'}): exit {code}"
    assert any(alive_when_signalled), "every process had exited before its signal: nothing was tested"
