"""The soak: one run SIGKILLed eight times, at moments drawn from a seeded generator within chosen phases (mid-step,
mid-upload, mid-start, mid-final commit, mid-publish), against moto over HTTP and the Hub double. Each restart is
what a Job controller would start at once. The run ends with the adapter of a run never interrupted, bit for bit,
and exactly one Hub commit."""
from __future__ import annotations

import random
import signal
import time

from fakes.s3 import FlakyProxy
from safetensors.torch import load_file
from test_one_writer import every_committed_checkpoint_verifies
from test_publish import hub, publish_job, run_commits  # noqa: F401  (fixtures)
from test_resume import RUN_ID, Running, assert_bit_identical, s3_bucket_store

from conftest import run_job


def test_a_run_killed_eight_times_at_random_moments_ends_as_if_never_interrupted(publish_job, hub, moto_server,
                                                                                tmp_path, uninterrupted):
    store = s3_bucket_store(moto_server)
    rng = random.Random(13)

    def env(endpoint: str) -> dict[str, str]:
        return publish_job(**{"RUN_ID": RUN_ID, "CHECKPOINT_URI": store.uri, **store.env, "MAX_STEPS": "12",
                              "LEASE_TTL_SECONDS": "2", "AWS_ENDPOINT_URL_S3": endpoint})

    def next_checkpoint() -> str:
        committed = store.committed_steps()
        return f"/checkpoints/step-{(committed[-1] if committed else 0) + 4:08d}/optimizer.pt"

    def kill(moment: str) -> None:
        with FlakyProxy(moto_server.endpoint) as proxy:
            held = {"mid-upload": lambda: proxy.hold(next_checkpoint()),
                    "mid-final": lambda: proxy.hold("/final/adapter_model.safetensors")}.get(moment, lambda: None)()
            if moment == "mid-publish":   # the commit lands; its answer is held back, and the job dies waiting
                hub.fail_next("commit", status=None, delay=30, after_apply=True)
            commits = hub.count("commit")
            run = Running(env(proxy.endpoint), tmp_path / f"{len(moments)}-{moment}.log")
            if held is not None:
                assert held.wait(180), f"{moment}: the upload never started"
            elif moment == "mid-publish":
                while hub.count("commit") == commits:
                    assert run.proc.poll() is None, f"{moment}: the job ended first"
                    time.sleep(0.05)
            elif moment == "mid-step":   # a random logged step past the checkpoint it resumes from
                newest = (store.committed_steps() or [0])[-1]
                target = rng.choice([s for s in range(2, 11, 2) if s > newest])
                run.until(lambda e: e["event"] == "progress" and e["step"] >= target)
            else:
                run.until(lambda e: e["event"] == "lease")
            time.sleep(rng.uniform(0, 0.4))
            run.proc.send_signal(signal.SIGKILL)
            assert run.finish() == -signal.SIGKILL, f"{moment}: the job was no longer running"
            proxy.release()
        moments.append(moment)

    moments: list[str] = []
    for moment in ["mid-step", "mid-upload", "mid-start", "mid-step", "mid-upload", "mid-step", "mid-final",
                   "mid-publish"]:
        kill(moment)
    assert len(moments) == 8

    last = run_job("train", env=env(moto_server.endpoint))
    assert last.returncode == 0, last.stderr
    assert_bit_identical(load_file(tmp_path / "out" / "adapter_model.safetensors"), uninterrupted)
    assert len(run_commits(hub)) == 1, "one Hub commit, whatever was killed"
    assert every_committed_checkpoint_verifies(store, tmp_path)
    assert store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix).get("Uploads", []) == []
