"""A newcomer's story: the job trains the tiny model on the CPU through the real 4-bit path, its loss
falls, and the adapter it leaves loads in stock peft with the same logits."""
import json
import shutil

import torch

from conftest import SAMPLE_DATA, run_job

ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "training_summary.json"}


def test_cpu_run_learns_and_leaves_a_complete_adapter(cpu_job, tmp_path):
    result = run_job("train", env=cpu_job(MAX_STEPS="16", LEARNING_RATE="1e-2"))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert ADAPTER_FILES <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "training_summary.json").read_text())
    losses = [entry["loss"] for entry in summary["train_loss"]]
    assert summary["steps"] == 16 and len(losses) == 8
    assert losses[-1] < losses[0] - 0.3, losses
    assert summary["final_eval_loss"] is not None and summary["eval_loss"]
    assert summary["tokens_per_second"] > 0 and summary["wall_time_seconds"] > 0
    assert summary["config"]["LORA_R"] == 8 and summary["device"] == "cpu"

    # Progress in a pod's log: one JSON line per logging step.
    progress = result.events("progress")
    assert [p["step"] for p in progress] == list(range(2, 17, 2))
    for line in progress:
        assert {"step", "max_steps", "loss", "learning_rate", "tokens_per_second", "eta_seconds"} <= set(line)
    assert progress[-1]["eta_seconds"] == 0


def test_stock_peft_reload_gives_the_logits_of_the_trained_model(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from job.config import from_env
    from job.log import Reporter
    from job.model import load_base_model
    from job.run import Run
    from conftest import CPU_SETTINGS

    config = from_env({**CPU_SETTINGS, "BASE_MODEL": str(tiny_model), "DATASET": str(SAMPLE_DATA),
                       "CHECKPOINT_URI": str(tmp_path / "store"), "OUTPUT_DIR": str(tmp_path / "out"),
                       "LORA_TARGET_MODULES": "q_proj,v_proj", "MAX_STEPS": "6"})
    run = Run(config, Reporter("json"))
    run.check()
    run.setup()
    run.train()
    run.evaluate()
    run.finalize()
    trained_model, trained_tokenizer = run.trainer.model, run.tokenizer
    batch = trained_tokenizer(["<persona_b>I keep bees.</persona_b> [INST] Hello there [/INST] Hi"],
                              return_tensors="pt")
    trained_model.eval()
    with torch.no_grad():
        expected = trained_model(**batch).logits

    # What a user does with the adapter: stock transformers + peft, tokenizer from the adapter folder.
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.convert_tokens_to_ids("<persona_b>") == trained_tokenizer.convert_tokens_to_ids("<persona_b>")
    base = load_base_model(config, tokenizer, "cpu")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "out").eval()
    with torch.no_grad():
        got = reloaded(**batch).logits
    assert torch.equal(got, expected)
    # ... and the adapter really changed the model, so the comparison means something.
    with reloaded.disable_adapter(), torch.no_grad():
        assert not torch.allclose(reloaded(**batch).logits, expected)


def test_without_a_gpu_the_default_stops_with_exit_2(cpu_job):
    result = run_job("train", env=cpu_job(REQUIRE_GPU="true"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: REQUIRE_GPU=true but no CUDA GPU is visible; run on a GPU node (docker: --gpus all; "
        "k8s: nvidia.com/gpu) or set REQUIRE_GPU=false to train on the CPU"]


def test_an_error_nothing_anticipated_is_one_line_naming_its_phase_and_exit_1(cpu_job, tiny_model, tmp_path):
    # A base whose tokenizer_config.json has a token index that is not a number (here it happens to be the token):
    # preflight does not read that file, transformers fails on it as the run sets up. No mock: the real error.
    token = "hf_UnexpectedFailureToken0123456789"
    base = tmp_path / "odd-base"
    shutil.copytree(tiny_model, base)
    tokenizer_config = json.loads((base / "tokenizer_config.json").read_text())
    tokenizer_config["added_tokens_decoder"] = {token: {"content": "<odd>", "special": True}}
    (base / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    result = run_job("train", env=cpu_job(BASE_MODEL=str(base), HF_TOKEN=token))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: setup failed: ValueError: invalid literal for int() with base 10: '***' "
        "(LOG_LEVEL=debug logs the traceback)"]
    assert token not in result.stdout

    debug = run_job("train", env=cpu_job(BASE_MODEL=str(base), HF_TOKEN=token, LOG_LEVEL="debug"))
    assert debug.returncode == 1
    lines = debug.stderr.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):" and "tokenization_utils_base.py" in debug.stderr
    assert lines[-1] == "error: setup failed: ValueError: invalid literal for int() with base 10: '***'"
    assert token not in debug.stdout + debug.stderr


def test_a_finished_run_started_again_does_nothing(cpu_job):
    first = run_job("train", env=cpu_job(MAX_STEPS="4"))
    assert first.returncode == 0, first.stderr
    again = run_job("train", env=cpu_job(MAX_STEPS="4"))
    assert again.returncode == 0
    assert [e["message"] for e in again.events("done")] == ["this run is already done; nothing to do"]
    assert not again.events("progress")


def test_a_terminal_gets_a_progress_bar():
    import io

    from job.log import Reporter

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    reporter = Reporter("auto", stream=stream)
    assert reporter.mode == "bar"
    reporter.start_progress(total=10)
    reporter.progress(5, 10, loss=1.25)
    reporter.close_progress()
    assert "5/10" in stream.getvalue() and "loss=1.25" in stream.getvalue()


def test_secrets_never_reach_logs_or_files(cpu_job, tmp_path):
    token, key = "hf_SECRETtokenValue0123456789", "AWSsecretKEYvalue0123456789abcdef"
    result = run_job("train", env=cpu_job(HF_TOKEN=token, AWS_SECRET_ACCESS_KEY=key, MAX_STEPS="4"))
    assert result.returncode == 0, result.stderr
    for text in (result.stdout, result.stderr):
        assert token not in text and key not in text
    for root in (tmp_path / "out", tmp_path / "store"):
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert token.encode() not in data and key.encode() not in data, path


def test_log_lines_from_two_threads_never_share_a_line():
    # The uploader thread reports commits while the training thread reports progress. A pod's stdout is a pipe
    # that takes a long line in several writes; this sink does the same and lets the other thread in between.
    import threading
    import time

    from job.log import Reporter

    class PipeLikeSink:
        def __init__(self):
            self.pieces: list[str] = []

        def write(self, text: str) -> None:
            for i in range(0, len(text), 16):
                self.pieces.append(text[i:i + 16])
                time.sleep(0)                    # another thread may write here, as it may between two syscalls

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return False

    sink = PipeLikeSink()
    reporter = Reporter("json", stream=sink)

    def report(thread: int) -> None:
        for i in range(200):
            reporter.event("checkpoint", f"thread {thread} " + "x" * 40, step=i)

    threads = [threading.Thread(target=report, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = "".join(sink.pieces).splitlines()
    assert len(lines) == 800 and all(json.loads(line)["event"] == "checkpoint" for line in lines)
    assert sorted((json.loads(line)["message"][:8], json.loads(line)["step"]) for line in lines) == \
        sorted((f"thread {t}", i) for t in range(4) for i in range(200))


def test_a_signal_while_a_line_is_being_written_does_not_hang():
    # The handler reports on the main thread, which may be inside the reporter's write when the signal lands.
    import io
    import signal

    from job.log import Reporter
    from job.run import StopSignal

    reporter = Reporter("json", stream=io.StringIO())
    stop = StopSignal(reporter)
    with reporter._lock:
        stop._handle(signal.SIGTERM, None)
    assert stop.received == "SIGTERM" and '"event": "stop"' in reporter.stream.getvalue()


def _run_in_process(run):
    import signal

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        run.main()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_the_adapter_is_written_while_the_last_checkpoint_uploads(cpu_job, tmp_path, monkeypatch):
    """Run.train writes the finished adapter and tokenizer into OUTPUT_DIR once the checkpoint writer is done and
    before it waits for the upload process: that wait, not the finalize phase, pays for writing them, and they do
    not compete with the writer's files. final/ holds those very bytes, written once."""
    import os

    from job.config import from_env
    from job.log import Reporter
    from job.run import Run
    from job.trainer import CheckpointCommitter

    out, seen = tmp_path / "out", []
    real = CheckpointCommitter.finish

    def finish(self, meanwhile=None):
        def watched():
            seen.append({"writer idle": self.writer.idle(0), "before": {p.name for p in out.iterdir()}})
            meanwhile()
            seen[-1]["after"] = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        return real(self, watched if meanwhile else None)

    monkeypatch.setattr(CheckpointCommitter, "finish", finish)
    run = Run(from_env(cpu_job(MAX_STEPS="4")), Reporter("json", stream=open(os.devnull, "w")))
    _run_in_process(run)
    assert len(seen) == 1 and seen[0]["writer idle"]
    assert "adapter_model.safetensors" not in seen[0]["before"]
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(seen[0]["after"])
    assert "training_summary.json" not in seen[0]["after"]   # the evaluation's part comes after it
    final = tmp_path / "store" / run.config.resolved_run_id / "final"
    assert (final / "adapter_model.safetensors").read_bytes() == seen[0]["after"]["adapter_model.safetensors"]
    assert (final / "training_summary.json").exists()
    # the same bytes as the last checkpoint's adapter: the local store links them rather than copy them again
    assert (final / "adapter_model.safetensors").stat().st_nlink == 2


def test_an_adapter_that_could_not_be_written_early_is_written_by_finalize(cpu_job, tmp_path, monkeypatch):
    import os

    from peft import PeftModel

    from job.config import from_env
    from job.log import Reporter
    from job.run import Run

    real, calls = PeftModel.save_pretrained, []

    def save_pretrained(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PeftModel, "save_pretrained", save_pretrained)
    run = Run(from_env(cpu_job(MAX_STEPS="4")), Reporter("json", stream=open(os.devnull, "w")))
    _run_in_process(run)
    assert len(calls) == 2 and not run.adapter_written
    final = tmp_path / "store" / run.config.resolved_run_id / "final"
    assert (final / "adapter_model.safetensors").read_bytes() == (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
