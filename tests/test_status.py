"""`python -m job status` tells where a run stands, read from its status.json in either store.

A finished run is trained for real (the tiny model, 4 steps) once per store: moto's S3 server over HTTP and a
local path. The in-progress and failure stories need no training: their status.json is written by hand.
"""
from __future__ import annotations

import json
import socket
import uuid

import pytest

from conftest import CPU_SETTINGS, SAMPLE_DATA, job_env, run_job
from job.store import open_store
from job.store.run_store import RunStore

RUN_ID = "status-story"
AWS_SECRET = "SECRETawsKEYstatus0123456789abcdef"
HF_SECRET = "hf_SECRETstatusTOKEN0123456789abcdef"


def rows(stdout: str) -> dict[str, str]:
    """The human form as {label: text}; labels fill the first 10 columns."""
    return {line[:10].strip(): line[11:] for line in stdout.splitlines()}


def assert_no_secrets(result) -> None:
    for secret in (AWS_SECRET, HF_SECRET):
        assert secret not in result.stdout + result.stderr


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_finished_run_shows_its_phase_loss_speed_checkpoints_and_evaluation(kind, tiny_model, tmp_path, request):
    if kind == "local":
        uri, store_env = str(tmp_path / "store"), {}

        def stored() -> dict:
            return json.loads((tmp_path / "store" / RUN_ID / "status.json").read_text())
    else:
        server = request.getfixturevalue("moto_server")
        bucket = server.make_bucket(f"status-{uuid.uuid4().hex[:12]}")
        uri, store_env = f"s3://{bucket}/runs", server.env()

        def stored() -> dict:
            body = server.client().get_object(Bucket=bucket, Key=f"runs/{RUN_ID}/status.json")["Body"]
            return json.loads(body.read())
    env = job_env(**{**CPU_SETTINGS, "BASE_MODEL": str(tiny_model), "DATASET": str(SAMPLE_DATA),
                     "RUN_ID": RUN_ID, "CHECKPOINT_URI": uri, "OUTPUT_DIR": str(tmp_path / "out"),
                     "HF_HOME": str(tmp_path / "hf"), "MAX_STEPS": "4", "SAVE_STEPS": "2", **store_env,
                     "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "HF_TOKEN": HF_SECRET})
    trained = run_job("train", env=env)
    assert trained.returncode == 0, trained.stderr
    status = stored()

    human = run_job("status", env=env)
    assert human.returncode == 0, human.stderr
    shown = rows(human.stdout)
    assert shown["run"] == f"{RUN_ID} (attempt 1)"
    assert shown["phase"] == "done, step 4 of 4 (100%)"
    assert shown["loss"] == f"{status['last_loss']:.4f} (eval {status['eval_loss']:.4f})"
    assert shown["speed"] == f"{round(status['tokens_per_second']):,} tokens/s"   # no ETA once done
    assert shown["checkpoint"] == "step 4 committed (committed: 2, 4)"
    for model in ("base", "tuned"):
        assert shown[f"eval {model}"].startswith(f"loss {status['evaluation'][f'{model}_loss']:.4f}, perplexity ")
    assert shown["updated"].startswith(status["updated_at"].replace("T", " ").replace("Z", " UTC ("))
    assert "hub" not in shown   # not published
    assert_no_secrets(human)

    raw = run_job("status", "--json", env=env)
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout) == {**status, "committed_checkpoints": [2, 4]}
    assert_no_secrets(raw)


def write_status(tmp_path, **status) -> dict[str, str]:
    """A run that is somewhere in training, as its status.json says; the env that `status` needs to find it."""
    RunStore(open_store(str(tmp_path / "store")), RUN_ID).write_status({"run_id": RUN_ID, **status})
    return job_env(RUN_ID=RUN_ID, CHECKPOINT_URI=str(tmp_path / "store"), REQUIRE_GPU="false")


def test_a_run_in_training_shows_its_progress_and_eta(tmp_path):
    env = write_status(tmp_path, phase="training", step=120, max_steps=300, last_loss=1.84234,
                       tokens_per_second=5339.4, eta_seconds=960, attempt=2, newest_checkpoint=None)
    result = run_job("status", env=env)
    assert result.returncode == 0, result.stderr
    shown = rows(result.stdout)
    assert shown["run"] == f"{RUN_ID} (attempt 2)"
    assert shown["phase"] == "training, step 120 of 300 (40%)"
    assert shown["loss"] == "1.8423"   # no eval loss yet
    assert shown["speed"] == "5,339 tokens/s, ETA 16 min"
    assert shown["checkpoint"] == "none committed"
    assert shown["updated"].endswith(" UTC (just now)") or shown["updated"].endswith(" s ago)")


@pytest.mark.parametrize("eta_seconds, shown", [(45, "ETA 45 s"), (960, "ETA 16 min"), (9000, "ETA 2 h 30 min")])
def test_the_eta_reads_in_seconds_minutes_or_hours(tmp_path, eta_seconds, shown):
    env = write_status(tmp_path, phase="training", step=1, max_steps=2, tokens_per_second=10.0,
                       eta_seconds=eta_seconds)
    assert rows(run_job("status", env=env).stdout)["speed"] == f"10 tokens/s, {shown}"


def test_a_stopped_run_says_so_and_gives_no_eta(tmp_path):
    env = write_status(tmp_path, phase="training", step=6, max_steps=12, eta_seconds=30, stopped_by="SIGTERM")
    shown = rows(run_job("status", env=env).stdout)
    assert shown["phase"] == "training, step 6 of 12 (50%), stopped by SIGTERM"
    assert shown["loss"] == "-" and shown["speed"] == "-"


def test_an_unknown_run_exits_1_naming_the_run_and_the_store(tmp_path):
    result = run_job("status", env=job_env(RUN_ID="never-started", CHECKPOINT_URI=str(tmp_path / "store")))
    assert result.returncode == 1
    assert "never-started" in result.stderr and str(tmp_path / "store") in result.stderr
    assert result.stdout == ""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("trouble", ["unreachable endpoint", "no such bucket"])
def test_a_store_that_cannot_be_read_exits_2_with_one_line(trouble, request):
    if trouble == "unreachable endpoint":
        endpoint = f"http://127.0.0.1:{_closed_port()}"
        store_env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint,
                     "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
        bucket, expected = "ckpt", endpoint
    else:
        store_env = request.getfixturevalue("moto_server").env()
        bucket = f"missing-{uuid.uuid4().hex[:12]}"
        expected = f"bucket '{bucket}' does not exist"
    env = job_env(RUN_ID=RUN_ID, CHECKPOINT_URI=f"s3://{bucket}/runs", HF_TOKEN=HF_SECRET,
                  **{**store_env, "AWS_SECRET_ACCESS_KEY": AWS_SECRET})
    for form in ([], ["--json"]):
        result = run_job("status", *form, env=env, timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")
        assert expected in result.stderr
        assert_no_secrets(result)
