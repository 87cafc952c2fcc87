"""Two GPUs: tokens/s of the real job at 1 and 2 GPUs on the 7B-shaped model, and a kill-and-resume across
world sizes. Run on a machine with 2 GPUs (bench/run_ddp.sh does the setup):

    python3 bench/ddp_scaling.py --out DIR

1. Builds a random-weight model of Llama-2-7B's exact shape (bench/speed.py's builder) and a 2-layer one of the
   same width.
2. Runs `python -m job train` (the container's code path) on the shipped sample data with NPROC_PER_NODE=1 and
   then 2, SCALE_BATCH_WITH_GPUS=true (the same micro-batch on every GPU: weak scaling, the usual measure of
   data parallelism), and reads tokens/s from the job's own JSON progress lines after a warm-up.
3. On the small model: NPROC_PER_NODE=2 run, SIGTERM after the first committed checkpoint (expect exit 75),
   then a restart with NPROC_PER_NODE=1 that must resume from the committed step and finish (exit 0); and the
   reverse, 1 -> 2.
Prints a table last; writes results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

BASE_SETTINGS = {
    "REQUIRE_GPU": "true", "DATASET": str(ROOT / "data" / "persona_sample.jsonl"), "NUM_SAMPLES": "0",
    "EVAL_FRACTION": "0", "LOG_FORMAT": "json", "LOGGING_STEPS": "2", "SAVE_STEPS": "1000",
    "SCALE_BATCH_WITH_GPUS": "true", "PER_DEVICE_TRAIN_BATCH_SIZE": "8", "MAX_SEQ_LENGTH": "1024",
}


def job(env_overrides: dict[str, str], out: Path, name: str, timeout: float, stop_after_commit: bool = False):
    env = {**os.environ, **BASE_SETTINGS, **env_overrides, "OUTPUT_DIR": str(out / name / "out"),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(out / f"{name}.stderr", "w")
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "job", "train"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=log, text=True)
    events = []
    signalled = False
    deadline = started + timeout
    for line in proc.stdout:
        if line.startswith("{"):
            event = json.loads(line)
            events.append(event)
            if stop_after_commit and not signalled and event["event"] == "checkpoint" and event.get("step"):
                proc.send_signal(signal.SIGTERM)
                signalled = True
        if time.time() > deadline:
            proc.kill()
    rc = proc.wait()
    (out / f"{name}.jsonl").write_text("\n".join(json.dumps(e) for e in events))
    return rc, events, time.time() - started


def speed_of(events: list[dict], warmup: int = 10) -> dict:
    progress = [e for e in events if e["event"] == "progress" and e["step"] > warmup]
    rates = [e["tokens_per_second"] for e in progress]
    return {"steps_measured": len(rates), "tokens_per_second": round(statistics.median(rates), 1) if rates else None,
            "first_losses": [e["loss"] for e in events if e["event"] == "progress"][:5]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import speed as bench_speed   # bench/speed.py: the same model builder as the single-GPU benchmark

    import torch
    results: dict = {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                     "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    models = Path("/tmp/ddp-models")
    if not args.skip_speed:
        big = models / "llama2-7b-shape"
        bench_speed.build_model(big, layers=32)
        os.sync()   # 13 GB of freshly written shards would otherwise be flushed during the timed steps
        for n in (1, 2):
            rc, events, seconds = job({"BASE_MODEL": str(big), "NPROC_PER_NODE": str(n),
                                       "MAX_STEPS": str(args.steps), "RUN_ID": f"speed-{n}gpu",
                                       "CHECKPOINT_URI": str(out / "store-speed"), "MASTER_PORT": str(29600 + n)},
                                      out, f"speed-{n}gpu", timeout=420)
            results[f"speed_{n}gpu"] = {"rc": rc, "wall_seconds": round(seconds, 1), **speed_of(events)}
            print(f"{n} GPU(s): rc={rc} {results[f'speed_{n}gpu']}", flush=True)
        one, two = results["speed_1gpu"]["tokens_per_second"], results["speed_2gpu"]["tokens_per_second"]
        results["scaling"] = round(two / one, 3) if one and two else None

    small = models / "llama2-7b-width-2-layers"
    bench_speed.build_model(small, layers=2)
    for before, after in ((2, 1), (1, 2)):
        name = f"resume-{before}to{after}"
        common = {"BASE_MODEL": str(small), "MAX_STEPS": "40", "SAVE_STEPS": "5", "RUN_ID": name,
                  "CHECKPOINT_URI": str(out / "store-resume"), "SCALE_BATCH_WITH_GPUS": "false",
                  "PER_DEVICE_TRAIN_BATCH_SIZE": "4"}
        rc1, ev1, _ = job({**common, "NPROC_PER_NODE": str(before), "MASTER_PORT": "29610"}, out,
                          f"{name}-first", timeout=240, stop_after_commit=True)
        rc2, ev2, _ = job({**common, "NPROC_PER_NODE": str(after), "MASTER_PORT": "29611"}, out,
                          f"{name}-restart", timeout=240)
        resumed = [e["message"] for e in ev2 if e["event"] == "resume"]
        first_step = min((e["step"] for e in ev2 if e["event"] == "progress"), default=None)
        done = any(e["event"] == "done" for e in ev2)
        results[name] = {"first_rc": rc1, "restart_rc": rc2, "resumed": resumed, "first_step_after_restart":
                         first_step, "finished": done, "ok": rc1 == 75 and rc2 == 0 and done and bool(resumed)}
        print(f"{name}: {results[name]}", flush=True)

    (out / "results.json").write_text(json.dumps(results, indent=2))
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    for f in list(out.glob("*.jsonl")) + list(out.glob("*.stderr")):
        f.rename(logs / f.name)
    subprocess.run(["tar", "czf", str(out / "logs.tgz"), "-C", str(logs), "."], check=False)
    print("\n| what | result |\n|---|---|")
    for n in (1, 2):
        r = results.get(f"speed_{n}gpu")
        if r:
            print(f"| {n} GPU tokens/s (7B shape, micro-batch 8/GPU) | {r['tokens_per_second']} (rc {r['rc']}) |")
    if results.get("scaling"):
        print(f"| scaling 2 vs 1 GPU | {results['scaling']}x |")
    for name in ("resume-2to1", "resume-1to2"):
        r = results[name]
        print(f"| kill-and-resume {name[7:]} | exit {r['first_rc']} then {r['restart_rc']}, resumed at step "
              f"{r['first_step_after_restart']}, ok={r['ok']} |")
    return 0 if all(results[n]["ok"] for n in ("resume-2to1", "resume-1to2")) else 1


if __name__ == "__main__":
    sys.exit(main())
