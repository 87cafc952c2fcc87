"""The seed's own run, end to end (issue 17, target 3): the seed recipe, Unsloth and `python -m job train` each
from process start to the adapter on disk, on the same 1000 persona-length rows, one after the other on one GPU.

    python bench/e2e_race.py --out DIR [--contenders seed,unsloth,job,job-compile,job-compile-again]
    python bench/e2e_race.py --out DIR --cpu-smoke     # this script on a CPU: narrow 2-layer model, job and seed

1. bench/cli_speed.py's model (Llama-2-7B's shape, random weights, a tokenizer that knows the prompt template's
   words) and its 1000 persona-chat-schema rows of 200-500 tokens.
2. The job's train split of those rows (its preflight and encoding, job/run.py: 950 train rows, 50 held out),
   written as encoded rows for the other contenders.
3. The contenders, each a fresh process timed from its start:
   - `seed`, `unsloth` (and `unsloth-d0`): bench/speed.py's seed-e2e / unsloth-e2e configurations: the same 950
     encoded rows once, in the seed's length-grouped order, batch 4 (237 steps: the last 2 rows left out; the job
     runs 238), then `save_pretrained` of the adapter. No evaluation, no checkpoints: what the seed's notebook did.
   - `job` (and `job-compile`, `job-compile-again`: TORCH_COMPILE=true, the second a later run in the same store
     that finds the first one's compile caches): `python -m job train` with the job's defaults (checkpoints every
     50 steps committed to a local store, eval loss every 50 steps, the final persona evaluation of base and tuned model) except EVAL_GENERATIONS=0
     (the greedy answers: evaluation, reported apart anyway), until `final adapter committed`. Its evaluation
     time (the `seconds` of its `eval` and `evaluation` events) is reported apart and taken off.
   Steady-state tokens/s: the seed's and Unsloth's from bench/speed.py's meter (steps after the warm-up), the job's
   as the median of its `progress` intervals after the first 20 steps.
Writes results.json and prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

WARMUP_STEPS = 20


# The job's contenders: its defaults, and TORCH_COMPILE=true twice: a first run, then a second run (another RUN_ID)
# in the same store, which finds the first one's portable compile cache and this machine's inductor cache, as a
# later run or a restarted one does.
JOB_CONTENDERS = {"job": {}, "job-compile": {"TORCH_COMPILE": "true"}, "job-compile-again": {"TORCH_COMPILE": "true"},
                  # the 16 GB mode: what the defaults pick on a 16 GB GPU (whole layers recomputed; auto compiles)
                  "job-gc": {"GRADIENT_CHECKPOINTING": "true"},
                  "job-gc-dq": {"GRADIENT_CHECKPOINTING": "true", "DOUBLE_QUANT": "true"},
                  # Unsloth's memory: inputs of the recomputed layers in host memory, the NF4 scales in 8 bits
                  "job-gc-offload-dq": {"GRADIENT_CHECKPOINTING": "offload", "DOUBLE_QUANT": "true"},
                  # A first run again on a machine that has run the job: its defaults with caches of their own
                  # (HF_HOME, inductor's and Triton's) and a store of its own (no portable compile cache), so
                  # nothing compiled before is found; -spy: the same under py-spy, every sample of every thread in
                  # time order (speedscope), into OUT/job-cold-spy.speedscope.json
                  "job-cold": {}, "job-cold-spy": {}}


def job_settings(name: str, model_dir: Path, data: Path, work: Path, device: str) -> dict[str, str]:
    """The job's defaults on this model and data; only where it writes, the log format and the greedy answers."""
    env = {"BASE_MODEL": str(model_dir), "DATASET": str(data), "RUN_ID": f"race-{name}", "LOG_FORMAT": "json",
           "CHECKPOINT_URI": str(work / "store"), "OUTPUT_DIR": str(work / name / "out"), "EVAL_GENERATIONS": "0",
           "REQUIRE_GPU": "true" if device == "cuda" else "false", **JOB_CONTENDERS[name]}
    if name.startswith("job-cold"):
        own = work / f"{name}-caches"
        shutil.rmtree(own, ignore_errors=True)
        # inductor's named too: this process's own imports (encoded_train_rows) set TORCHINDUCTOR_CACHE_DIR to
        # torch's /tmp default in the environment the job inherits
        env.update(CHECKPOINT_URI=str(own / "store"), HF_HOME=str(own / "hf"), TRITON_CACHE_DIR=str(own / "triton"),
                   TORCHINDUCTOR_CACHE_DIR=str(own / "inductor"))
    if device == "cpu":
        env.update(OPTIM="adamw_torch", MAX_STEPS="6", SAVE_STEPS="3", EVAL_STEPS="3", LOGGING_STEPS="1")
    return env


def encoded_train_rows(env: dict[str, str], path: Path) -> int:
    """The job's own train rows for these settings (its preflight, split and encoding), written to `path`."""
    from job.config import from_env
    from job.log import Reporter
    from job.model import load_tokenizer
    from job.run import Run

    work = Path(env["CHECKPOINT_URI"]).parent / "encode"
    run = Run(from_env({**env, "RUN_ID": "race-encode", "CHECKPOINT_URI": str(work / "store"),
                        "OUTPUT_DIR": str(work / "out")}), Reporter("json"))
    try:
        run.check()
        run.tokenizer = load_tokenizer(run.config)
        train, _ = run.examples()
    finally:
        run.let_go()
    path.write_text(json.dumps([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in train]))
    return len(train)


def run_job(env: dict[str, str], log: Path, timeout: float, spy: Path | None = None) -> dict:
    """`python -m job train` (bench/cli_speed.py's runner, its lines stamped as they arrive): seconds from process
    start to each event, its evaluation seconds, and its progress intervals. `spy`: py-spy samples every thread,
    idle ones included, into this speedscope file (bench/spy_timeline.py reads it)."""
    from cli_speed import milestones, run_train

    prefix = []
    if spy is not None and shutil.which("py-spy"):
        prefix = [shutil.which("py-spy"), "record", "--nonblocking", "--threads", "--idle", "-r", "100",
                  "-f", "speedscope", "-o", str(spy), "--"]
    code, events = run_train(env, log, timeout, prefix)
    if code != 0:
        raise RuntimeError(f"python -m job train exited {code}: {[e for _, e in events][-1:]}")
    first = milestones(events)
    evaluation = sum(e.get("seconds") or 0 for _, e in events if e["event"] in ("eval", "evaluation"))
    final = first.get("final:final adapter committed")
    progress = [e for _, e in events if e["event"] == "progress"]
    steady = [e["tokens_per_second"] for e in progress if e["step"] > WARMUP_STEPS]
    speed = next((e for _, e in events if e["event"] == "speed" and "padding_free" in e), {})
    return {"end_to_end_seconds": final, "evaluation_seconds": round(evaluation, 2),
            "without_evaluation_seconds": round(final - evaluation, 2) if final else None,
            "tokens_per_second": statistics.median(steady) if steady else None,
            "steps": next((e["steps"] for _, e in events if e["event"] == "final"), None),
            "milestones_seconds": first, "plan": {k: v for k, v in speed.items() if k not in ("time", "event")},
            "speed_events": [{k: v for k, v in e.items() if k not in ("time", "event")} for _, e in events
                             if e["event"] == "speed" and "padding_free" not in e],
            "first_losses": [e["loss"] for e in progress][:5]}


def run_bench(names: list[str], model_dir: Path, rows: Path, out: Path, timeout: float, cpu: bool) -> list[dict]:
    """The seed's and Unsloth's runs: bench/speed.py's end-to-end configurations, each in its own process."""
    speed_out = out / "speed"
    cmd = [sys.executable, str(ROOT / "bench" / "speed.py"), "--out", str(speed_out), "--model-dir", str(model_dir),
           "--configs", ",".join(f"{n}-e2e" for n in names), "--timeout", str(timeout)]
    subprocess.run(cmd + (["--cpu-smoke"] if cpu else []), env={**os.environ, "E2E_ROWS": str(rows)},
                   stdout=(out / "speed.log").open("w"), stderr=subprocess.STDOUT, timeout=timeout * len(names) + 300)
    found = json.loads((speed_out / "results.json").read_text())["results"]
    results = []
    for r in found:
        if "error" in r:
            results.append({"contender": r["config"].removesuffix("-e2e"), "error": r["error"]})
            continue
        results.append({"contender": r["config"].removesuffix("-e2e"), "end_to_end_seconds": r["end_to_end_seconds"],
                        "evaluation_seconds": 0.0, "without_evaluation_seconds": r["end_to_end_seconds"],
                        "tokens_per_second": r["tokens_per_second"], "steps": r["steps"],
                        "first_step_seconds": r["first_step_seconds"], "load_seconds": r["load_seconds"],
                        "peak_gib": r["peak_gib"], "first_losses": r["first_losses"], "recipe": r.get("recipe")})
    return results


def table(results: list[dict]) -> str:
    seed = next((r for r in results if r["contender"] == "seed" and "error" not in r), None)
    lines = ["| contender | steps | process start -> adapter saved (s) | of it evaluation (s) | without evaluation "
             "(s) | vs seed | steady tokens/s | vs seed |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['contender']} | failed: {r['error'][:120]} | | | | | | |")
            continue
        e2e, tps = r["without_evaluation_seconds"], r["tokens_per_second"]
        vs = f"{seed['without_evaluation_seconds'] / e2e:.2f}x" if seed and e2e else "-"
        vs_tps = f"{tps / seed['tokens_per_second']:.2f}x" if seed and tps else "-"
        lines.append(f"| {r['contender']} | {r['steps']} | {r['end_to_end_seconds']:.1f} | "
                     f"{r['evaluation_seconds']:.1f} | {e2e:.1f} | {vs} | {tps or 0:,.0f} | {vs_tps} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--contenders", default="seed,unsloth,job")
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for one contender's process")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from cli_speed import prepare
    model_dir, data = prepare(args.out, "small" if args.cpu_smoke else "7b", args.cpu_smoke)
    device = "cpu" if args.cpu_smoke else "cuda"
    env = job_settings("job", model_dir, data, args.out / "job", device)
    rows = args.out / "work" / "race_rows.json"      # under work/, which run_gpu.sh's tarball leaves out
    rows.parent.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"train_rows": encoded_train_rows(env, rows)}), flush=True)
    if args.cpu_smoke:   # the seed's run on the CPU: as many rows as the job's few steps take
        rows.write_text(json.dumps(json.loads(rows.read_text())[:4 * int(env["MAX_STEPS"])]))
    names = args.contenders.split(",")
    results = []
    for name in names:
        if name in JOB_CONTENDERS:
            try:
                settings = job_settings(name, model_dir, data, args.out / "job", device)
                spy = args.out / f"{name}.speedscope.json" if name.endswith("-spy") else None
                results.append({"contender": name, **run_job(settings, args.out / f"{name}.log", args.timeout,
                                                             spy)})
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                results.append({"contender": name, "error": str(exc)})
        else:
            results += run_bench([name], model_dir, rows, args.out, args.timeout, args.cpu_smoke)
        print(json.dumps(results[-1]), flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results), flush=True)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
