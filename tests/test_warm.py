"""The compile's helper (job/speed/warm.py): a process that compiles one decoder layer of the base's shape while the
run checks and loads, so that the run's layers compile from its caches. On the GPU that is what moves the cold
compile off the run's path (bench/e2e_race.py measures it); here, on the CPU, that the helper trains one compiled
step of a one-layer model and touches nothing of the run's, waits for the checks, fails harmlessly, and that the
run's compiled layers run eagerly until it is done, then compiled, to the same losses."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch._dynamo

from conftest import signals_restored
from job.config import from_env
from job.speed import warm

TOKEN = "hf_warmupSecretToken0123456789abcdef"


@pytest.fixture
def settings(cpu_job, tmp_path, monkeypatch):
    # The helper fills the caches its parent's environment names: this test's own.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    return lambda **extra: from_env(cpu_job(**{"TORCH_COMPILE": "true", "HF_TOKEN": TOKEN, **extra}))


def finished(warmup: warm.Warmup, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while not warmup.done():
        assert time.time() < deadline, "the helper did not finish"
        time.sleep(0.1)
    return warmup.outcome()


def test_the_helper_trains_one_compiled_step_of_a_one_layer_model_and_touches_nothing_of_the_run(settings, tmp_path):
    config = settings()
    warmup = warm.Warmup(config, tmp_path / "work", device="cpu")
    warmup.go()
    outcome = finished(warmup)
    assert warmup.process.returncode == 0
    assert outcome["compiled"] is True and outcome["step_seconds"] > 0, outcome
    assert outcome["plan"]["torch_compile"] is True
    assert outcome["model_made_before_go"] is True   # while the checks ran: CPU and disk only
    assert not warmup.scratch.exists()                # its one-layer model is gone with it
    log = (tmp_path / "work" / warm.LOG).read_text()
    assert '"trainable_params"' in log and "4-bit base with LoRA ready" in log   # the run's own setup built it
    assert TOKEN not in log
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [warm.REPORT, warm.LOG]
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()


def test_the_helper_touches_nothing_before_the_checks_pass_and_a_failed_one_says_why(settings, tmp_path):
    # Stopped before `go` (the checks failed): it exits without building anything.
    waiting = warm.Warmup(settings(), tmp_path / "stopped", device="cpu")
    time.sleep(1)
    assert not waiting.done()
    waiting.stop()
    assert waiting.outcome()["compiled"] is False and not (tmp_path / "stopped" / warm.REPORT).exists()
    assert not waiting.scratch.exists()

    broken = warm.Warmup(settings(BASE_MODEL=str(tmp_path / "no-such-model")), tmp_path / "broken", device="cpu")
    broken.go()
    outcome = finished(broken)
    assert broken.process.returncode != 0
    assert outcome["compiled"] is False and "no-such-model" in outcome["why"], outcome


def test_a_plan_for_another_graph_is_not_the_helpers(tiny_model):
    """The run keeps the helper only if it compiles what the helper compiled: the plan it would take if it compiled,
    whatever the run's length."""
    from job.speed.plan import plan

    env = {"BASE_MODEL": str(tiny_model), "REQUIRE_GPU": "false", "TORCH_COMPILE": "true"}
    config = from_env(env)
    helpers = warm.compiled_plan(config, "cpu", None)
    assert helpers.torch_compile and warm.same_graphs(plan(config, "cpu", None, 12), helpers)
    assert not warm.same_graphs(plan(from_env({**env, "PADDING_FREE": "true"}), "cpu", None, 12), helpers)
    assert not warm.same_graphs(plan(from_env({**env, "TORCH_COMPILE": "false"}), "cpu", None, 12), helpers)


def test_compiled_layers_run_eagerly_until_the_helper_is_done_then_compiled_to_the_same_losses(tiny_model):
    """EagerUntilWarm: the steps before the helper is done compile nothing; the first step after compiles, and
    every step's loss is the eager one."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from job.model import add_lora, load_base_model, load_tokenizer
    from job.speed.attention import data_collator
    from job.speed.kernels import compile_layers
    from job.speed.plan import plan

    config = from_env({"BASE_MODEL": str(tiny_model), "REQUIRE_GPU": "false", "LORA_TARGET_MODULES": "all-linear",
                       "LORA_DROPOUT": "0", "PADDING_FREE": "false", "TORCH_COMPILE": "true"})
    speed = plan(config, "cpu")
    tokenizer = load_tokenizer(config)
    torch.manual_seed(0)
    model = add_lora(config, load_base_model(config, tokenizer, "cpu", speed), tokenizer)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        feats = [{"input_ids": (ids := torch.randint(3, 1000, (n,), generator=gen).tolist()),
                  "labels": [-100] * (n // 2) + ids[n // 2:]} for n in (21, 34)]
        batches.append(data_collator(speed, tokenizer)(feats))
    eager_losses = [model(**b).loss.item() for b in batches]

    torch._dynamo.reset()
    counters.clear()
    compile_layers(model)
    ready, compiled_at = [False], []
    hold = warm.EagerUntilWarm(lambda: ready[0], compiled_at.append)
    losses, graphs = [], []
    try:
        for step, batch in enumerate(batches, start=1):
            ready[0] = step >= 3
            hold.check(step)
            losses.append(model(**batch).loss.item())
            graphs.append(counters["stats"]["unique_graphs"])
    finally:
        hold.release()
        torch._dynamo.reset()
    assert graphs[:2] == [0, 0] and graphs[2] > 0, graphs
    assert compiled_at == [3] and hold.compiling
    assert losses == pytest.approx(eager_losses, rel=1e-5)


def test_the_helper_is_started_only_where_the_run_may_compile(settings):
    from job.distributed import Topology

    single = Topology()
    assert not warm.may_compile(settings(TORCH_COMPILE="false"), single)
    assert not warm.may_compile(settings(TORCH_COMPILE="auto", MAX_STEPS="40"), single)   # too short to repay
    assert warm.may_compile(settings(), single) is torch.cuda.is_available()
    assert not warm.may_compile(settings(), Topology(world_size=2, rank=0, local_rank=0))


def test_the_helper_starts_with_the_process_only_where_a_cheap_look_finds_a_gpu_and_the_run_may_compile(
        settings, tmp_path, monkeypatch):
    from job.distributed import Topology

    single, two = Topology(), Topology(world_size=2, rank=0, local_rank=0)
    monkeypatch.setattr(warm, "gpu_device_files", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    import importlib.util

    assert warm.may_start_early(settings(), single) is (importlib.util.find_spec("triton") is not None)
    assert not warm.may_start_early(settings(TORCH_COMPILE="false"), single)
    assert not warm.may_start_early(settings(), two)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not warm.may_start_early(settings(), single)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(warm, "gpu_device_files", lambda: False)
    assert not warm.may_start_early(settings(), single) and warm.start_early(settings(), single) is None


def test_a_helper_started_with_the_process_is_stopped_where_the_run_may_not_compile(settings, tmp_path):
    """warm.start_early looks only at device files; once torch is imported, `may_compile` decides (here, on a machine
    without CUDA, that the run does not compile): the run stops the helper with its checks, before it went."""
    from job.log import Reporter
    from job.run import Run

    config = settings()
    early = warm.Warmup(config, tmp_path / "out" / "work", device="cpu")
    run = Run(config, Reporter("json", stream=open(os.devnull, "w")), warmup=early)
    assert run.warmup is early and not early.done()
    run.check()
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the run keeps its helper")
    assert run.warmup is None and early.done() and not (tmp_path / "out" / "work" / warm.REPORT).exists()
    run.let_go()


def test_a_run_starts_the_helper_with_its_checks_and_compiles_from_its_caches_once_it_is_done(
        settings, tmp_path, monkeypatch):
    """The whole run (Run.main, in this process) on the CPU, with the helper as a GPU run has it: started with the
    checks and told to go once they pass. The run's 6 steps take a second here and the helper's compile longer, so
    the run waits for it at `go` (eagerly until then, the unit test above): its layers then compile from the first
    step, and the run says what the helper did."""
    from torch._dynamo.utils import counters
    import io
    import json

    from job.log import Reporter
    from job.run import Run

    real = warm.Warmup
    monkeypatch.setattr(warm, "may_compile", lambda config, topology: True)   # on a GPU it says so itself

    class Waited(real):
        def go(self):
            super().go()
            finished(self)

    monkeypatch.setattr(warm, "Warmup", lambda config, folder: Waited(config, folder, device="cpu"))
    out = io.StringIO()
    torch._dynamo.reset()
    counters.clear()
    run = Run(settings(MAX_STEPS="6", SAVE_STEPS="3", EVAL_STEPS="3", PADDING_FREE="false"),
              Reporter("json", secrets=[TOKEN], stream=out))
    try:
        with signals_restored():
            run.main()
    finally:
        torch._dynamo.reset()
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    speed = [e["message"] for e in events if e["event"] == "speed"]
    assert any("compile once the compile's helper is done" in m for m in speed), speed
    done = [e for e in events if e["event"] == "speed" and e["message"].startswith("compile's helper done")]
    assert len(done) == 1 and done[0]["step"] == 1 and done[0]["step_seconds"] > 0, done
    assert run.warmup.process.returncode == 0
    assert counters["stats"]["unique_graphs"] > 0   # the run's layers compiled
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["steps"] == 6 and all(x["loss"] == x["loss"] for x in summary["train_loss"])
    assert TOKEN not in out.getvalue()

    # The same run started again finds itself done: its helper, told to go by the checks, is stopped at once.
    monkeypatch.setattr(warm, "Warmup", lambda config, folder: real(config, folder, device="cpu"))
    again_out = io.StringIO()
    again = Run(settings(MAX_STEPS="6", SAVE_STEPS="3", EVAL_STEPS="3", PADDING_FREE="false"),
                Reporter("json", secrets=[TOKEN], stream=again_out))
    with signals_restored():
        again.main()
    events = [json.loads(line) for line in again_out.getvalue().splitlines()]
    assert [e["message"] for e in events if e["event"] == "speed"] == \
        ["compile's helper stopped: this run has no training left"]
    assert any(e["event"] == "done" for e in events) and again.warmup is None


def test_a_run_whose_checks_fail_stops_its_helper_before_it_touches_the_device(settings, tmp_path, monkeypatch):
    from job.config import BadInput
    from job.log import Reporter
    from job.run import Run

    real = warm.Warmup
    started = []
    monkeypatch.setattr(warm, "may_compile", lambda config, topology: True)
    monkeypatch.setattr(warm, "Warmup", lambda config, folder: started.append(real(config, folder, device="cpu"))
                        or started[-1])
    run = Run(settings(DATASET=str(tmp_path / "no-such-data.jsonl")), Reporter("json", stream=open(os.devnull, "w")))
    with signals_restored(), pytest.raises(BadInput, match="no-such-data"):
        run.main()
    assert started and started[0].done()
    assert not (tmp_path / "out" / "work" / warm.REPORT).exists()


def test_python_m_job_puts_inductors_caches_beside_the_hub_cache_before_torch_can_pick_tmp(tmp_path):
    """Importing torch._inductor's config sets TORCHINDUCTOR_CACHE_DIR to its /tmp default; `python -m job` sets it
    under HF_HOME (a volume) first, so a restarted run finds the compiled code. A user's own setting stands."""
    import subprocess
    import sys

    from conftest import CPU_SETTINGS

    # `python -m job train`, its run replaced by a look at where inductor's caches go once it is imported
    code = ("import os, sys, job.run\n"
            "def main(self):\n    import torch._inductor.config\n"
            "    print(os.environ['TORCHINDUCTOR_CACHE_DIR'])\n    sys.exit(0)\n"
            "job.run.Run.main = main\nfrom job.cli import cli\ncli(['train'], prog_name='python -m job')\n")
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(CPU_SETTINGS, PYTHONPATH=str(root), HF_HOME=str(tmp_path / "hf"), OUTPUT_DIR=str(tmp_path / "out"),
               CHECKPOINT_URI=str(tmp_path / "store"))
    said = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert said.stdout.strip().splitlines()[-1] == str(tmp_path / "hf" / "torch-compile"), said.stderr[-2000:]
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "mine")
    said = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert said.stdout.strip().splitlines()[-1] == str(tmp_path / "mine"), said.stderr[-2000:]
