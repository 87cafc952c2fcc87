"""The bench times what the CLI runs (issue 17): each configuration through `python -m job train` and through the
job's training path in-process (what bench/speed.py times), on the same rows, in the same order, with the same
settings; tokens/s of both read the same way, and the end-to-end time of the CLI run.

    python bench/cli_speed.py --out DIR [--model 7b|small] [--configs job,job-compile,job-gc] [--steps 60]
    python bench/cli_speed.py --out DIR --cpu-smoke          # the same on a CPU: narrow 2-layer model

1. The model: bench/speed.py's random Llama-2-7B-shaped model (built once on the GPU, saved as safetensors: the
   job loads it through its own `from_pretrained` path in NF4). The CLI reads text, so this uses a copy of that
   folder whose weights are links to the same shards and whose tokenizer also knows the words of the job's prompt
   template (bench/ddp_scaling.py's data: persona-chat-schema rows written in t<id> words that encode, through
   job/data.py, to 200-500 tokens, normal around 330, like bench/speed.py's stream).
2. For each configuration (bench/speed.py's CONFIGS, its job settings), two processes one after the other:
   - `cli`: `python -m job train` with the configuration's settings, MAX_STEPS, no checkpoint or evaluation during
     training (SAVE_STEPS and EVAL_STEPS past the end); tokens/s from its own `progress` events (one per
     LOGGING_STEPS steps), and the seconds from process start to the `final adapter committed` event;
   - `bench`: the same config (the same environment), the same encoded rows and sampler, through the job's Run
     (job/run.py: its checks and setup) in-process, with no callbacks of the job's but a meter that syncs the GPU
     at each logging step and records the Trainer's own token count: tokens/s per the same logging intervals.
   Reported: the median over the intervals after the warm-up of each, and cli / bench (the target: within 10%).
Writes results.json and prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

WARMUP_STEPS = 10
LOGGING_STEPS = 5
ROWS = 1000          # the seed's NUM_SAMPLES


def cli_settings(name: str, data: Path, model_dir: Path, work: Path, steps: int, device: str) -> dict[str, str]:
    """The job's environment for one configuration: bench/speed.py's settings for it, the data and model here."""
    from speed import CONFIGS
    recipe, batch, _, settings = CONFIGS[name]
    if recipe != "job":
        raise SystemExit(f"{name}: only the job's configurations run through the CLI")
    env = {k: v for k, v in settings.items() if k.isupper()}
    env.update({
        "BASE_MODEL": str(model_dir), "DATASET": str(data), "NUM_SAMPLES": str(ROWS), "MAX_STEPS": str(steps),
        "LOGGING_STEPS": str(LOGGING_STEPS), "SAVE_STEPS": "100000", "EVAL_STEPS": "100000",
        "EVAL_GENERATIONS": "0", "LOG_FORMAT": "json", "REQUIRE_GPU": "true" if device == "cuda" else "false",
        "RUN_ID": f"cli-{name}", "CHECKPOINT_URI": str(work / "store"), "OUTPUT_DIR": str(work / "out"),
        "MAX_SEQ_LENGTH": "1024",
    })
    if device == "cpu":
        env.setdefault("OPTIM", "adamw_torch")
    return env


# ---------------------------------------------------------------- the in-process side (what the bench times)

def bench_one(env: dict[str, str], out: Path) -> dict:
    """The job's training path in this process, as bench/speed.py runs it (the job's Run, job/run.py, up to its
    Trainer: the checks, the encoded rows, the speed plan, the model, the arguments and the speed plan's callbacks),
    on the rows and sampler of the CLI, with only the meter for the job's callbacks and no checkpoints."""
    import dataclasses

    import torch
    from transformers import TrainerCallback

    from job.config import from_env
    from job.log import Reporter
    from job.run import Run

    config = from_env(env)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    class Meter(TrainerCallback):
        """Wall time and the Trainer's token count at each logging step's end, the GPU synced there only (the
        CLI's progress line syncs there too: the loss it logs)."""
        def __init__(self):
            self.marks: list[tuple[int, float, int]] = []

        def on_train_begin(self, args, state, control, **kw):
            self._mark(state)

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % config.logging_steps == 0:
                self._mark(state)

        def _mark(self, state):
            if device == "cuda":
                torch.cuda.synchronize()
            self.marks.append((state.global_step, time.perf_counter(), state.num_input_tokens_seen))

    meter = Meter()

    class InProcess(Run):
        """The CLI's run without evaluation or checkpoints: the meter is its only callback of the job's own."""

        def examples(self):
            return super().examples()[0], []

        def arguments(self):
            return dataclasses.replace(super().arguments(), save_strategy="no")

        def callbacks(self):
            return [meter]

        def compile_cache(self):
            return None   # as the CLI run before it found none (a cache it stored would change this side's plan)

    run = InProcess(config, Reporter("json"))
    run.check()
    run.setup()
    plan, trainer = run.plan, run.trainer
    trainer.train()
    intervals = [{"step": s1, "tokens_per_second": (k1 - k0) / (t1 - t0)}
                 for (s0, t0, k0), (s1, t1, k1) in zip(meter.marks, meter.marks[1:])]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h][:5]
    return {"plan": plan.describe(), "intervals": intervals, "first_losses": losses}


# ---------------------------------------------------------------- the CLI side

def run_train(env: dict[str, str], log: Path, timeout: float, prefix: list[str] = ()) -> tuple[int, list]:
    """`python -m job train` (after `prefix`, e.g. py-spy's) with these settings: its exit code and its JSON events,
    each with the seconds from process start to the line's arrival; stdout, stamped, to `log`, stderr beside it.
    Killed after `timeout` seconds (exit code -9)."""
    import threading

    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.time()
    with open(log.with_suffix(".stderr"), "w") as err:
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "job", "train"], env=full_env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        stamped = [(time.time() - started, line.rstrip("\n")) for line in proc.stdout]
        code = proc.wait()
        watchdog.cancel()
    log.write_text("".join(f"{t:8.2f} {line}\n" for t, line in stamped))
    return code, [(t, json.loads(line)) for t, line in stamped if line.startswith("{")]


def milestones(events: list) -> dict[str, float]:
    """Seconds from process start to each kind of event's first line (final, evaluation and speed events by
    their message too)."""
    first: dict[str, float] = {}
    for t, e in events:
        first.setdefault(e["event"] + (":" + e["message"] if e["event"] in ("final", "evaluation", "speed") else ""),
                         round(t, 2))
    return first


def run_cli(env: dict[str, str], log: Path, timeout: float, raw: Path | None = None) -> dict:
    """`python -m job train`: its progress intervals and the seconds from start to the committed final adapter."""
    from speed import pyspy_prefix

    started = time.time()
    code, stamped = run_train(env, log, timeout, pyspy_prefix(raw))
    if code != 0:
        said = log.with_suffix(".stderr").read_text().strip().splitlines()[-1:]
        raise RuntimeError(f"python -m job train exited {code}: {said}")
    events = [e for _, e in stamped]
    return {"intervals": [{"step": e["step"], "tokens_per_second": e["tokens_per_second"]}
                          for e in events if e["event"] == "progress"],
            "first_losses": [e["loss"] for e in events if e["event"] == "progress"][:5],
            "speed": next((e for e in events if e["event"] == "speed" and "padding_free" in e), None),
            "wall_seconds": time.time() - started, "milestones_seconds": milestones(stamped)}


def summary(intervals: list[dict]) -> dict:
    rates = [i["tokens_per_second"] for i in intervals if i["step"] > WARMUP_STEPS]
    return {"tokens_per_second": statistics.median(rates) if rates else None, "intervals": len(rates),
            "range": [min(rates), max(rates)] if rates else None}


def prepare(out: Path, model: str, cpu_smoke: bool) -> tuple[Path, Path]:
    """bench/speed.py's model folder, a copy of it whose tokenizer knows the template's words, and the data."""
    import speed
    from ddp_scaling import template_words, write_persona_length_data

    if cpu_smoke:
        speed.DEVICE = "cpu"
        speed.LLAMA2_7B.update(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)
    base = Path("/tmp") / f"llama2-7b-shape-{model}{'-cpu' if cpu_smoke else ''}"
    speed.build_model(base, 32 if model == "7b" else 2)
    words = base.with_name(base.name + "-words")
    if not (words / "config.json").exists():
        words.mkdir(parents=True, exist_ok=True)
        for f in base.iterdir():
            if f.suffix in (".safetensors", ".json") and not f.name.startswith("tokenizer"):
                (words / f.name).unlink(missing_ok=True)
                (words / f.name).symlink_to(f)
        speed.build_tokenizer(words, template_words())
    data = out / "persona-length.jsonl"
    stats = write_persona_length_data(data, words, int(ROWS / 0.95) + 1)
    print(json.dumps({"data": stats}), flush=True)
    return words, data


def table(results: list[dict]) -> str:
    lines = ["| config | CLI tokens/s | bench tokens/s | CLI / bench | CLI first losses | bench first losses | "
             "CLI start -> final adapter (s) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | failed: {r['error'][:100]} | | | | | |")
            continue
        c, b = r["cli"]["summary"]["tokens_per_second"], r["bench"]["summary"]["tokens_per_second"]
        ratio = f"{c / b:.2f}" + (" (over 10% apart)" if abs(c / b - 1) > 0.10 else "") if c and b else "-"
        final = r["cli"]["milestones_seconds"].get("final:final adapter committed")
        lines.append(f"| {r['config']} | {c or 0:,.0f} | {b or 0:,.0f} | {ratio} | "
                     f"{' '.join(f'{x:.4f}' for x in r['cli']['first_losses'])} | "
                     f"{' '.join(f'{x:.4f}' for x in r['bench']['first_losses'])} | {final} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", choices=["7b", "small"], default="7b")
    parser.add_argument("--configs", default="job,job-compile,job-gc")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--timeout", type=float, default=420, help="seconds for one process")
    parser.add_argument("--pyspy", action="store_true", help="sample both sides with py-spy (where host time goes)")
    parser.add_argument("--bench-one", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.bench_one:   # a child: the environment file of one configuration
        env = json.loads(args.bench_one.read_text())
        result = bench_one(env, args.bench_one.parent)
        (args.bench_one.parent / "bench-result.json").write_text(json.dumps(result))
        return 0

    model_dir, data = prepare(args.out, "small" if args.cpu_smoke else args.model, args.cpu_smoke)
    device = "cpu" if args.cpu_smoke else "cuda"
    results = []
    for name in args.configs.split(","):
        work = args.out / name
        work.mkdir(parents=True, exist_ok=True)
        env = cli_settings(name, data, model_dir, work, args.steps, device)
        if args.cpu_smoke:
            env["OMP_NUM_THREADS"] = "1"
        result = {"config": name, "settings": env}
        try:
            cli = run_cli(env, work / "cli.log", args.timeout, work / "pyspy-cli.txt" if args.pyspy else None)
            result["cli"] = {**cli, "summary": summary(cli["intervals"])}
            (work / "env.json").write_text(json.dumps({**env, "RUN_ID": f"bench-{name}"}))
            from speed import pyspy_prefix
            proc = subprocess.run(pyspy_prefix(work / "pyspy-bench.txt" if args.pyspy else None) + [sys.executable, __file__, "--out", str(args.out), "--bench-one",
                                   str(work / "env.json")], capture_output=True, text=True, timeout=args.timeout,
                                  env={**os.environ, **({"OMP_NUM_THREADS": "1"} if args.cpu_smoke else {})})
            (work / "bench.log").write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                raise RuntimeError(f"bench side exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
            bench = json.loads((work / "bench-result.json").read_text())
            result["bench"] = {**bench, "summary": summary(bench["intervals"])}
            if args.pyspy:
                from speed import summarize_pyspy
                for side in ("cli", "bench"):
                    raw = work / f"pyspy-{side}.txt"
                    if raw.exists():
                        result[side]["pyspy"] = summarize_pyspy(raw, top=25)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            result["error"] = str(exc)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "settings"}, default=str), flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(table(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
