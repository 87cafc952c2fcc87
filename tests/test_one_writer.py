"""One writer per run: the lease in {RUN_ID}/lease.json, on a local directory and on two real S3 servers (moto and
SeaweedFS, both of which enforce If-None-Match and If-Match), and two jobs on one RUN_ID as subprocesses."""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from job.store import open_store
from job.store.lease import Lease, LeaseHeld, LeaseLost
from job.store.run_store import RunStore
from test_storage import RUN, fresh_bucket, use_aws_env, write_checkpoint


@pytest.fixture(params=["local", "moto", "seaweedfs"])
def store(request, tmp_path, monkeypatch):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    server = request.getfixturevalue(f"{request.param}_server")
    use_aws_env(monkeypatch, server.env())
    return open_store(f"s3://{server.make_bucket(fresh_bucket())}/jobs")


def test_conditional_writes_are_enforced(store):
    key = f"{RUN}/lease.json"
    assert store.put_if(key, b"first", None)
    assert not store.put_if(key, b"second creator", None), "If-None-Match: * must refuse an existing object"
    data, tag = store.get_tagged(key)
    assert data == b"first"
    assert store.put_if(key, b"renewed", tag)
    assert not store.put_if(key, b"stale", tag), "If-Match with an old tag must be refused"
    assert store.get_tagged(key)[0] == b"renewed"
    assert store.list(f"{RUN}/") == [key], "a local store's lock file is not an object"


def test_of_many_racing_starts_exactly_one_takes_the_lease(store):
    won, held = [], []

    def start():
        try:
            won.append(Lease(store, RUN, ttl=30).acquire(wait=0.5, say=lambda m: None))
        except LeaseHeld as exc:
            held.append(str(exc))

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and won[0].generation == 1 and len(held) == 5
    assert all(socket.gethostname() in line and f"pid {os.getpid()}" in line and "\n" not in line for line in held)


def test_a_newcomer_with_a_shorter_ttl_does_not_take_a_renewed_lease_over(store):
    # Staleness is judged by the holder's own TTL (in lease.json), not the newcomer's: settings may differ.
    holder = Lease(store, RUN, ttl=30)
    holder.acquire()
    holder.keep_renewed(said=print)                          # renews every 10 s: unchanged for the newcomer's 2 s
    try:
        with pytest.raises(LeaseHeld):
            Lease(store, RUN, ttl=2).acquire(say=lambda m: None, poll=0.1)
    finally:
        holder.release()
    assert json.loads(store.get_bytes(f"{RUN}/lease.json"))["released"] is True


def test_a_lease_that_stops_being_renewed_is_taken_over_and_the_old_holder_commits_nothing(store, tmp_path):
    old = Lease(store, RUN, ttl=2)
    old.acquire()
    old_run = RunStore(store, RUN)
    old_run.hold(old)
    for step in (4, 6):                                     # committed while it holds the lease
        old_run.commit_checkpoint(step, write_checkpoint(tmp_path, step), "fp")
    store.put_bytes(f"{RUN}/checkpoints/step-00000007/optimizer.pt", b"an upload that died")

    said = []
    started = time.monotonic()
    new = Lease(store, RUN, ttl=2)
    ticket = new.acquire(say=said.append, poll=0.1)           # the old holder is frozen: it renews nothing
    assert 1.5 < time.monotonic() - started < 4
    assert ticket.generation == 2 and "took over the lease" in said[-1]

    with pytest.raises(LeaseLost, match="generation 1; now held by .* \\(generation 2\\)"):
        old_run.commit_checkpoint(8, write_checkpoint(tmp_path, 8), "fp")
    with pytest.raises(LeaseLost):
        old_run.prune(keep=1)                                # retention would delete step 4
    with pytest.raises(LeaseLost):
        old_run.clean_uncommitted()                          # the leftovers of step 7 belong to the new holder now
    assert RunStore(store, RUN).committed_steps() == [4, 6]
    assert store.list(f"{RUN}/checkpoints/step-00000007/")
    assert not store.list(f"{RUN}/checkpoints/step-00000008/"), "not one file of the stale commit was uploaded"
    new.renew()


def test_a_released_lease_is_taken_at_once_and_a_renewed_one_is_waited_for_then_refused(store):
    first = Lease(store, RUN, ttl=30)
    first.acquire()
    first.release()
    started = time.monotonic()
    second = Lease(store, RUN, ttl=2)
    assert second.acquire(say=pytest.fail).generation == 2 and time.monotonic() - started < 1

    second.keep_renewed(said=print)                          # alive: renews every third of the TTL
    said = []
    started = time.monotonic()
    with pytest.raises(LeaseHeld) as caught:
        Lease(store, RUN, ttl=2).acquire(say=said.append, poll=0.1)
    assert 2 <= time.monotonic() - started < 4
    assert "waiting up to 2 s" in said[0]
    line = str(caught.value)
    assert "\n" not in line and f"pid {os.getpid()} (generation 2)" in line and "another RUN_ID" in line
    second.release()
    assert json.loads(store.get_bytes(f"{RUN}/lease.json"))["released"] is True


# ---------------------------------------------------------------- two jobs on one RUN_ID, as pods would be

from conftest import run_job  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_resume import RUN_ID, Running, assert_bit_identical, committed, s3_bucket_store  # noqa: E402

TTL = "3"


def every_committed_checkpoint_verifies(store, tmp_path) -> list[int]:
    saved = {k: os.environ.get(k) for k in store.env}
    os.environ.update(store.env)
    try:
        run_store = RunStore(open_store(store.uri), RUN_ID)
        steps = run_store.committed_steps()
        for step in steps:
            run_store.download_checkpoint(step, tmp_path / "verify" / str(step))   # raises if anything is off
        return steps
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture
def shared_run(cpu_job, s3_server):
    """Settings for several jobs of one RUN_ID in one fresh bucket, each with its own OUTPUT_DIR (its own pod)."""
    store = s3_bucket_store(s3_server)

    def settings(out, **overrides: str) -> dict[str, str]:
        return cpu_job(**{"RUN_ID": RUN_ID, "CHECKPOINT_URI": store.uri, **store.env, "LEASE_TTL_SECONDS": TTL,
                          "OUTPUT_DIR": str(out), **overrides})
    settings.store = store
    return settings


def _uploader_child(pid: int) -> int:
    """The job's checkpoint-upload child (a spawned process), not multiprocessing's resource tracker."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise AssertionError(f"job {pid} has no upload child")


def test_two_jobs_started_together_one_trains_and_the_other_exits_73(shared_run, tmp_path, uninterrupted):
    jobs = [Running(shared_run(tmp_path / name), tmp_path / f"{name}.log") for name in ("a", "b")]
    # The winner must still be alive when the loser, slower to start on a loaded machine, asks for the lease: its
    # upload child is frozen once training starts, so its second save waits for that upload, holding the lease
    # (renewed from the main process) until the loser has given up.
    first = jobs[0].until(lambda e: e["event"] == "lease")
    winner = jobs[0] if first["message"] == "holding the run's lease" else jobs[1]
    winner.until(lambda e: e["event"] == "progress")
    frozen = _uploader_child(winner.proc.pid)
    os.kill(frozen, signal.SIGSTOP)
    try:
        loser = jobs[1] if winner is jobs[0] else jobs[0]
        loser_code = loser.finish()
    finally:
        os.kill(frozen, signal.SIGCONT)
    codes = [job.finish() if job is winner else loser_code for job in jobs]
    trained = [i for i, job in enumerate(jobs) if any(e["event"] == "progress" for e in job.events)]
    assert sorted(codes) == [0, 73] and trained == [codes.index(0)], codes
    winner, loser = codes.index(0), codes.index(73)
    errors = (tmp_path / f"{'ab'[loser]}.log").read_text().strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: RUN_ID='{RUN_ID}' is being written by another live "
                                                     f"process, {socket.gethostname()} pid {jobs[winner].proc.pid}")
    assert [e for e in jobs[loser].events if e["event"] == "lease"][0]["message"].endswith(
        f"waiting up to {float(TTL):g} s for it to be released or to expire")
    assert every_committed_checkpoint_verifies(shared_run.store, tmp_path)[-1] == 12
    assert_bit_identical(load_file(tmp_path / "ab"[winner] / "adapter_model.safetensors"), uninterrupted)
    lease = json.loads(shared_run.store.read(f"{RUN_ID}/lease.json"))
    assert lease["released"] is True and lease["generation"] == 1 and lease["holder"]["pid"] == jobs[winner].proc.pid


@pytest.mark.parametrize("s3_server", ["moto"], indirect=True)
def test_a_killed_holder_is_taken_over_after_the_ttl_and_the_run_resumes_exactly(shared_run, tmp_path,
                                                                                  uninterrupted):
    first = Running(shared_run(tmp_path / "a"), tmp_path / "a.log")
    first.until(committed(4))
    first.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    assert first.finish() == -signal.SIGKILL
    second = run_job("train", env=shared_run(tmp_path / "b"))
    assert second.returncode == 0, second.stderr
    leases = [e["message"] for e in second.events("lease")]
    assert any(m.startswith(f"took over the lease of {socket.gethostname()} pid {first.proc.pid} (generation 1)")
               for m in leases), leases
    assert second.events("resume")[-1]["message"].startswith("resuming from committed checkpoint step")
    assert time.monotonic() - killed >= float(TTL) - 1
    assert_bit_identical(load_file(tmp_path / "b" / "adapter_model.safetensors"), uninterrupted)


@pytest.mark.parametrize("s3_server", ["moto"], indirect=True)
def test_a_frozen_holder_that_wakes_after_a_takeover_commits_nothing_and_exits_73(shared_run, tmp_path,
                                                                                  uninterrupted):
    stale = Running(shared_run(tmp_path / "a"), tmp_path / "a.log")
    stale.until(committed(4))
    stale.proc.send_signal(signal.SIGSTOP)          # a frozen pod, or one cut off from the store
    try:
        fresh = Running(shared_run(tmp_path / "b"), tmp_path / "b.log")
        fresh.until(lambda e: e["event"] == "lease" and e["message"] == "holding the run's lease")
    finally:
        stale.proc.send_signal(signal.SIGCONT)      # it wakes while the other one trains
    woke = len(stale.events)
    assert stale.finish() == 73
    assert fresh.finish() == 0
    lines = (tmp_path / "a.log").read_text().strip().splitlines()
    assert len(lines) == 1 and "this process lost the run's lease (generation 1; now held by" in lines[0], lines
    assert not [e for e in stale.events[woke:] if e["event"] == "checkpoint"], "the stale writer committed"
    assert every_committed_checkpoint_verifies(shared_run.store, tmp_path)[-1] == 12
    assert_bit_identical(load_file(tmp_path / "b" / "adapter_model.safetensors"), uninterrupted)


# ---------------------------------------------------------------- multipart uploads left by a kill

UPLOAD_ONE_BIG_FILE = """
import sys
from pathlib import Path
from job.store.s3 import S3Store
store = S3Store(sys.argv[1], multipart_threshold=5 << 20)   # S3's smallest part
store.put_file(sys.argv[2], Path(sys.argv[3]))
"""


@pytest.mark.parametrize("s3_server", ["moto"], indirect=True)
def test_a_multipart_upload_killed_midway_is_aborted_by_the_next_start(shared_run, s3_server, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    from fakes.s3 import FlakyProxy

    store = shared_run.store
    big = tmp_path / "optimizer.pt"
    big.write_bytes(os.urandom(12 << 20))                    # three parts of 5 MiB
    key = f"{RUN_ID}/checkpoints/step-00000004/optimizer.pt"
    with FlakyProxy(s3_server.endpoint) as proxy:
        second_part = proxy.hold("partNumber=2")
        env = {**shared_run(tmp_path / "a"), "AWS_ENDPOINT_URL_S3": proxy.endpoint}
        upload = subprocess.Popen([sys.executable, "-c", UPLOAD_ONE_BIG_FILE, store.uri, key, str(big)], env=env,
                                  cwd=ROOT)
        assert second_part.wait(60), "the upload never reached its second part"
        upload.kill()                                        # the pod dies mid-upload
        upload.wait()
        proxy.release()
    pending = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix).get("Uploads", [])
    assert [u["Key"] for u in pending] == [store.prefix + key]

    result = run_job("train", env=shared_run(tmp_path / "b", MAX_STEPS="2", SAVE_STEPS="2"))
    assert result.returncode == 0, result.stderr
    assert "aborted 1 unfinished multipart upload(s) of an earlier attempt" in \
        [e["message"] for e in result.events("checkpoint")]
    assert store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix).get("Uploads", []) == []


# ---------------------------------------------------------------- integrity


def test_a_checkpoint_written_under_other_settings_is_refused_not_resumed(cpu_job, tmp_path):
    env = cpu_job(RUN_ID=RUN_ID, MAX_STEPS="12", SAVE_STEPS="2")
    first = Running(env, tmp_path / "first.log")
    first.until(committed(2))
    first.proc.send_signal(signal.SIGKILL)
    first.finish()
    manifests = sorted((tmp_path / "store" / RUN_ID / "checkpoints").glob("*/MANIFEST.json"))
    newest = manifests[-1]
    manifest = json.loads(newest.read_text())
    ours = manifest["fingerprint"]
    newest.write_text(json.dumps({**manifest, "fingerprint": "0123456789ab"}))   # another run's checkpoint

    restart = run_job("train", env=env)
    assert restart.returncode == 2, restart.stderr
    lines = restart.stderr.strip().splitlines()
    step = int(newest.parent.name[5:])
    assert len(lines) == 1 and f"checkpoint step {step} in {tmp_path / 'store'} was written with settings " \
        f"fingerprint 0123456789ab, not this run's {ours}; it belongs to another run" in lines[0], lines
    assert not restart.events("progress"), "nothing was trained on top of it"
