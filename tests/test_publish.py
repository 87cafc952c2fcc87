"""The user's last step: the adapter is on the Hub. The real huggingface_hub client talks HTTP to a Hub
the tests serve (tests/fakes/hub.py: binary files and files above 10 MiB go up through the LFS batch API, as
on the real Hub); the job runs as a subprocess."""
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from fakes.hub import REGULAR_FILE_LIMIT

from conftest import ROOT, run_job

REPO = "alice/persona-adapter"
BASE = "acme/tiny-llama"
WRITE, READ, BOB = "hf_alice_write", "hf_alice_read", "hf_bob_write"


@pytest.fixture
def hub(hub_server, tiny_model):
    """The Hub, holding the tiny base model as acme/tiny-llama."""
    server = hub_server()
    server.add_repo(BASE, {p.name: p.read_bytes() for p in tiny_model.iterdir() if p.is_file()})
    return server


@pytest.fixture
def publish_job(cpu_job, hub):
    def settings(**overrides):
        env = cpu_job(**{"MAX_STEPS": "6", "HUB_MODEL_ID": REPO, "HF_TOKEN": WRITE, **overrides})
        env.pop("HF_HUB_OFFLINE")
        # HF_HUB_DISABLE_XET=1: this Hub takes uploads through LFS only (see tests/fakes/hub.py).
        env.update(hub.subprocess_env(hf_home=env["HF_HOME"], token=env["HF_TOKEN"], base=env))
        return env
    return settings


def run_commits(hub, revision="main"):
    return [c for c in hub.commits(REPO, revision) if c["message"].startswith("persona-qlora run ")]


def uploaded_through_lfs(hub, path):
    """The commit named `path` as an lfsFile whose bytes went up through the batch API (batch, PUT, verify)."""
    commits = [r for r in hub.request_log if r.endpoint == "commit" and r.status == 200]
    ops = [json.loads(line) for line in commits[-1].body.splitlines() if line.strip()]
    return any(op["key"] == "lfsFile" and op["value"]["path"] == path for op in ops) and \
        all(hub.count(e) >= 1 for e in ("lfs_batch", "lfs_upload", "lfs_verify"))


def test_trained_adapter_lands_on_the_hub_in_one_commit_and_loads_in_stock_peft(publish_job, hub, tmp_path):
    result = run_job("train", env=publish_job(BASE_MODEL=BASE))     # the base model comes from the Hub too
    assert result.returncode == 0, result.stderr
    files = hub.files(REPO)
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md"} <= set(files)
    assert files["adapter_model.safetensors"] == (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    commits = run_commits(hub)
    run_id = json.loads(run_job("config", env=publish_job(BASE_MODEL=BASE)).stdout)["RUN_ID"]
    assert len(commits) == 1 and run_id in commits[0]["message"]
    status = json.loads(run_job("status", "--json", env=publish_job(BASE_MODEL=BASE)).stdout)
    assert status["phase"] == "done" and status["hub_commit_url"].endswith(commits[0]["oid"])
    shown = run_job("status", env=publish_job(BASE_MODEL=BASE)).stdout   # links the commit, never the token
    assert f"hub        {status['hub_commit_url']}" in shown.splitlines() and WRITE not in shown

    assert uploaded_through_lfs(hub, "adapter_model.safetensors")
    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == BASE and meta["library_name"] == "peft" and meta["license"] and "qlora" in meta["tags"]
    assert "| step | train loss | eval loss |" in card and "<persona_b>" in card and "[INST]" in card
    assert "hardware: cpu" in card and "wall time" in card


USER_PRELUDE = """
import torch
torch.set_grad_enabled(False)
def batch(tokenizer):
    return tokenizer(["<persona_b>I keep bees.</persona_b> [INST] Hello [/INST]"], return_tensors="pt")
"""


def assert_same_logits(env, script, exact):
    check = ("print(torch.equal(hub, local))" if exact else
             "torch.testing.assert_close(hub, local, rtol=1e-4, atol=1e-4); print(True)")
    proc = subprocess.run([sys.executable, "-c", USER_PRELUDE + script + check], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "True", proc.stderr[-3000:]


def test_a_restart_after_success_pushes_nothing(publish_job, hub):
    assert run_job("train", env=publish_job()).returncode == 0
    before = hub.count("commit")
    again = run_job("train", env=publish_job())
    assert again.returncode == 0 and hub.count("commit") == before and len(run_commits(hub)) == 1
    assert again.events("done")[0]["message"] == "this run is already done; nothing to do"
    on_demand = run_job("publish", env=publish_job())
    assert on_demand.returncode == 0, on_demand.stderr
    assert hub.count("commit") == before and len(run_commits(hub)) == 1
    assert on_demand.events("hub")[-1]["message"] == "this run is already on the Hub; not pushing again"


def test_a_different_adapter_under_the_same_run_id_is_pushed_again(publish_job, hub, tmp_path):
    # Publish recognises its earlier push by RUN_ID and the adapter's sha256, not by the commit title: a run
    # trained anew under the same RUN_ID (its store wiped, another learning rate) is a different adapter.
    first = run_job("train", env=publish_job(RUN_ID="same-name"))
    assert first.returncode == 0, first.stderr
    shutil.rmtree(tmp_path / "store")
    shutil.rmtree(tmp_path / "out")
    again = run_job("train", env=publish_job(RUN_ID="same-name", LEARNING_RATE="5e-3"))
    assert again.returncode == 0, again.stderr
    commits = run_commits(hub)
    assert len(commits) == 2 and commits[0]["message"] == commits[1]["message"]   # same title, same RUN_ID
    assert hub.files(REPO)["adapter_model.safetensors"] == (tmp_path / "out" / "adapter_model.safetensors").read_bytes()


def test_an_adapter_above_the_10_mib_inline_limit_goes_up_through_lfs(publish_job, hub, tmp_path):
    result = run_job("train", env=publish_job(LORA_R="1280", MAX_STEPS="2", EVAL_STEPS="2"))
    assert result.returncode == 0, result.stderr
    adapter = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    assert len(adapter) > REGULAR_FILE_LIMIT
    assert hub.files(REPO)["adapter_model.safetensors"] == adapter
    assert uploaded_through_lfs(hub, "adapter_model.safetensors")
    put = [r for r in hub.request_log if r.endpoint == "lfs_upload" and r.status == 200]
    assert any(r.body == adapter for r in put) and all(r.header("Authorization") is None for r in put)


def test_a_commit_whose_answer_is_lost_is_found_and_not_pushed_again(publish_job, hub):
    hub.lose_commit_responses(1)              # the commit lands; the connection closes without an answer
    result = run_job("train", env=publish_job())
    assert result.returncode == 0, result.stderr
    commits = run_commits(hub)
    assert len(commits) == 1
    assert hub.count("commit") == 1 and hub.count("preupload") == 1, "the job must not push a second time"
    status = json.loads(run_job("status", "--json", env=publish_job()).stdout)
    assert status["hub_commit_url"].endswith(commits[0]["oid"])


@pytest.mark.parametrize("token,expect", [
    (READ, "HF_TOKEN is a read-only token"),
    (BOB, "HF_TOKEN (user 'bob') cannot write to HUB_MODEL_ID='alice/persona-adapter'"),
    ("hf_not_a_token", "HF_TOKEN is not a valid Hugging Face token"),
    ("", "HUB_MODEL_ID='alice/persona-adapter' is set but HF_TOKEN is empty"),
])
def test_a_token_that_cannot_push_stops_before_training(publish_job, hub, tmp_path, token, expect):
    result = run_job("train", env=publish_job(HF_TOKEN=token))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], lines
    assert not result.events("progress") and not result.events("model")
    if token:
        assert token not in result.stdout + result.stderr


def test_a_repo_name_the_hub_forbids_stops_before_training(publish_job):
    result = run_job("train", env=publish_job(HUB_MODEL_ID="alice/bad--name"))
    assert result.returncode == 2 and "is not an allowed Hub repo name" in result.stderr


def test_a_hub_500_is_retried(publish_job, hub):
    # huggingface_hub's create_commit sends a commit once (its pipelined upload_folder, taken with hf_xet, would
    # retry it 5 times by itself): these failures reach the job, and only the job's own retry gets past them.
    hub.fail_next_commits(2, status=500)
    result = run_job("train", env=publish_job())
    assert result.returncode == 0, result.stderr
    assert hub.count("commit") == 3 and len(run_commits(hub)) == 1
    retries = [e["message"] for e in result.events("hub") if "retry" in e["message"]]
    assert [m.split(";")[0] for m in retries] == ["push failed (HTTP 500)"] * 2, retries


def test_a_crash_during_the_push_publishes_on_restart_without_training(publish_job, hub):
    hub.fail_next("preupload", 1, status=None, delay=30)  # the push hangs; the pod dies meanwhile
    proc = subprocess.Popen([sys.executable, "-m", "job", "train"], env=publish_job(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if '"event": "final"' in line:
            break
    while hub.count("preupload") == 0 and proc.poll() is None:
        time.sleep(0.01)   # not a busy loop: it would take a core from the job it waits for
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not run_commits(hub)
    restart = run_job("train", env=publish_job())
    assert restart.returncode == 0, restart.stderr
    assert [e["message"] for e in restart.events("final")] == ["final adapter already committed; skipping training"]
    assert not restart.events("progress") and not restart.events("model")
    assert len(run_commits(hub)) == 1


# `echo hf_... | kubectl create secret generic --from-file` keeps the newline. Sent as is, the HTTP client would
# refuse the header, and its error would quote the token.
@pytest.mark.parametrize("token", [WRITE, WRITE + "\n"], ids=["as given", "made with echo"])
def test_the_token_reaches_only_the_authorization_header(publish_job, hub, tmp_path, token):
    result = run_job("train", env=publish_job(HF_TOKEN=token))
    assert result.returncode == 0, result.stderr
    assert len(run_commits(hub)) == 1
    pushes = [r for r in hub.request_log if r.endpoint == "commit"]
    assert pushes and all(r.header("Authorization") == f"Bearer {WRITE}" for r in pushes)
    assert hub.leaks(WRITE) == []
    assert WRITE not in result.stdout + result.stderr
    for path in list((tmp_path / "out").rglob("*")) + list((tmp_path / "store").rglob("*")):
        if path.is_file():
            assert WRITE.encode() not in path.read_bytes(), path
    for content in hub.files(REPO).values():
        assert WRITE.encode() not in content


def test_merged_16bit_weights_go_to_their_own_branch(publish_job, hub, tmp_path):
    result = run_job("train", env=publish_job(PUSH_MERGED="true"))
    assert result.returncode == 0, result.stderr
    merged = hub.files(REPO, "merged")
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(merged)
    assert "library_name: transformers" in merged["README.md"].decode()
    assert "adapter_model.safetensors" not in merged

    assert_same_logits(publish_job(), f"""
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from job.model import grow_vocabulary
tokenizer = AutoTokenizer.from_pretrained("{tmp_path / 'out'}")
base = AutoModelForCausalLM.from_pretrained("{publish_job()['BASE_MODEL']}", dtype=torch.float32)
grow_vocabulary(base, len(tokenizer))
local = PeftModel.from_pretrained(base, "{tmp_path / 'out'}").eval()(**batch(tokenizer)).logits
pulled = AutoModelForCausalLM.from_pretrained("{REPO}", revision="merged", dtype=torch.float32).eval()
hub = pulled(**batch(tokenizer)).logits
""", exact=False)


def test_model_card_names_the_hub_dataset(tmp_path):
    from job.card import model_card
    from job.config import from_env

    (tmp_path / "training_summary.json").write_text(json.dumps({
        "run_id": "r1", "config": {"LORA_R": 64}, "device": "NVIDIA H100", "steps": 20, "train_rows": 950,
        "eval_rows": 50, "train_loss": [{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.5}],
        "eval_loss": [{"step": 20, "loss": 1.7}], "final_eval_loss": 1.7, "wall_time_seconds": 300.0,
        "train_tokens": 1000, "tokens_per_second": 3.3}))
    card = model_card(from_env({"HUB_MODEL_ID": "alice/x"}), tmp_path)
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["datasets"] == ["Cynaptics/persona-chat"]
    assert meta["base_model"] == "NousResearch/Llama-2-7b-chat-hf"
    assert "| 20 | 1.5000 | 1.7000 |" in card


def test_the_card_names_a_base_model_only_by_its_hub_id(tmp_path, tiny_model):
    # The Hub refuses a card whose base_model is a path (tests/fakes/hub.py refuses it the same way): a local base
    # is named by BASE_MODEL_ID when set, else by the Hub id its config.json remembers, or left out.
    from fakes.hub import metadata_errors

    from job.card import model_card
    from job.config import from_env

    (tmp_path / "training_summary.json").write_text(json.dumps({
        "run_id": "r1", "config": {}, "device": "cpu", "steps": 1, "train_rows": 1, "eval_rows": 0,
        "train_loss": [], "eval_loss": [], "final_eval_loss": None, "wall_time_seconds": 1.0, "train_tokens": 1,
        "tokens_per_second": 1.0}))
    local = tmp_path / "downloaded"
    shutil.copytree(tiny_model, local)
    config = json.loads((local / "config.json").read_text())
    for name_or_path, expected in ((str(tiny_model), None), ("NousResearch/Llama-2-7b-chat-hf",
                                                             "NousResearch/Llama-2-7b-chat-hf")):
        (local / "config.json").write_text(json.dumps({**config, "_name_or_path": name_or_path}))
        card = model_card(from_env({"HUB_MODEL_ID": "alice/x", "BASE_MODEL": str(local)}), tmp_path)
        assert yaml.safe_load(card.split("---")[1]).get("base_model") == expected and metadata_errors(card) == []
        named = model_card(from_env({"HUB_MODEL_ID": "alice/x", "BASE_MODEL": str(local),
                                     "BASE_MODEL_ID": "acme/llama-2-7b-persona-base"}), tmp_path)
        assert yaml.safe_load(named.split("---")[1])["base_model"] == "acme/llama-2-7b-persona-base"
        assert metadata_errors(named) == []

