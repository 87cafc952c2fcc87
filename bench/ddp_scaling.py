"""Two GPUs: tokens/s of the real job at 1 and 2 GPUs on the 7B-shaped model, and a kill-and-resume across
world sizes. Run on a machine with 2 GPUs (bench/run_ddp.sh does the setup):

    python3 bench/ddp_scaling.py --out DIR [--steps 60] [--no-independent]

1. Builds a random-weight model of Llama-2-7B's exact shape (bench/speed.py's builder) and a 2-layer one of the
   same width. Their word-level tokenizer knows the words of the job's prompt template (job/data.py), so text
   written in its t<id> words encodes without <unk>.
2. Writes a persona-chat-schema dataset (persona_b, dialogue of "Persona A:"/"Persona B:" turns, reference) in
   those words whose rows encode, through the job's own path (job/data.py encode_rows), to 200-500 tokens, normal
   around 330 like bench/speed.py's token stream. The shipped sample (data/persona_sample.jsonl) is made of
   English words this tokenizer does not know: ~100 tokens a row, mostly <unk>, which the job's token count also
   takes for padding (pad = unk), so neither its step nor its tokens/s resembles a persona-chat run.
3. Runs `python -m job train` (the container's code path) on that data with NPROC_PER_NODE=1 and then 2,
   SCALE_BATCH_WITH_GPUS=true and PER_DEVICE_TRAIN_BATCH_SIZE=4 (the job's default micro-batch on every GPU:
   weak scaling, the usual measure of data parallelism), and reads tokens/s (all ranks' tokens, the Trainer
   gathers them) from the job's own JSON progress lines: the median over the logging intervals after step 10.
   Then, unless --no-independent, two 1-GPU jobs at once, one per GPU (CUDA_VISIBLE_DEVICES), no DDP: what the
   host gives two processes without any communication between them, to tell host contention from DDP's cost.
4. On the small model, on the shipped sample: NPROC_PER_NODE=2 run, SIGTERM after the first committed checkpoint
   (expect exit 75), then a restart with NPROC_PER_NODE=1 that must resume from the committed step and finish
   (exit 0); and the reverse, 1 -> 2.
Prints a table last; writes results.json.
"""
from __future__ import annotations

import argparse
import concurrent.futures
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

SAMPLE = ROOT / "data" / "persona_sample.jsonl"
BASE_SETTINGS = {
    "REQUIRE_GPU": "true", "DATASET": str(SAMPLE), "NUM_SAMPLES": "0",
    "EVAL_FRACTION": "0", "LOG_FORMAT": "json", "LOGGING_STEPS": "2", "SAVE_STEPS": "1000",
    "SCALE_BATCH_WITH_GPUS": "true", "PER_DEVICE_TRAIN_BATCH_SIZE": "4", "MAX_SEQ_LENGTH": "1024",
}
WARMUP_STEPS = 10


# ---------------------------------------------------------------- persona-chat-length data in the bench's words

def template_words() -> tuple[str, ...]:
    """The whitespace-separated words of the job's prompt template (job/data.py), for the bench tokenizer."""
    from job.data import SYSTEM_PROMPT
    return ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", *SYSTEM_PROMPT.split())


def persona_length_rows(n: int, seed: int = 0) -> list[dict]:
    """Persona-chat-schema rows whose text is t<id> words, sized so that each row encodes (job/data.py: BOS +
    "[INST] <<SYS>> system prompt <persona_b>persona</persona_b> <</SYS>> user [/INST] reply" + EOS per exchange)
    to a target drawn like bench/speed.py's lengths: normal around 330 tokens, sd 70, clamped to 200-500."""
    import random
    rng = random.Random(seed)
    first_word = 3 + len(set(template_words()))   # ids below are <unk> <s> </s> and the template's words

    def words(k: int) -> str:
        return " ".join(f"t{rng.randrange(first_word, 32000)}" for _ in range(k))

    rows = []
    for r in range(n):
        target = min(500, max(200, round(rng.gauss(330, 70))))
        persona = [words(rng.randint(5, 9)) for _ in range(rng.randint(3, 5))]
        exchanges = rng.randint(3, 7)
        # BOS, EOS, [INST], [/INST] per exchange; the first also <<SYS>>, the system prompt's words, the two
        # persona tags and <</SYS>>
        overhead = 4 * exchanges + 2 + (len(template_words()) - 4) + 2 + sum(len(p.split()) for p in persona)
        spare = target - overhead - 3 * 2 * exchanges   # words beyond 3 per turn (user and reply of each exchange)
        cuts = sorted(rng.randint(0, spare) for _ in range(2 * exchanges - 1))
        sizes = [3 + b - a for a, b in zip([0] + cuts, cuts + [spare])]
        turns = [words(k) for k in sizes]
        dialogue = [f"Persona {'AB'[i % 2]}: {t}" for i, t in enumerate(turns[:-1])]
        rows.append({"conv_id": f"bench{r:05d}", "persona_b": persona, "dialogue": dialogue,
                     "reference": turns[-1], "target_tokens": target})
    return rows


def write_persona_length_data(path: Path, tokenizer_dir: Path, n: int) -> dict:
    """Write the rows as .jsonl and encode them through the job's own path; returns the length statistics."""
    import statistics as st

    from job.config import from_env
    from job.data import encode_rows, load_rows, parse_rows
    from job.model import load_tokenizer

    rows = persona_length_rows(n)
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "target_tokens"}) + "\n" for r in rows))
    tokenizer = load_tokenizer(from_env({"BASE_MODEL": str(tokenizer_dir)}))
    encoded, skipped = encode_rows(parse_rows(load_rows(str(path)), str(path)), tokenizer, 1024)
    lengths = [len(e["input_ids"]) for e in encoded]
    unknown = sum(i == tokenizer.unk_token_id for e in encoded for i in e["input_ids"])
    labelled = sum(sum(1 for x in e["labels"] if x != -100) for e in encoded)
    return {"rows": n, "skipped": skipped, "min": min(lengths), "median": st.median(lengths), "mean":
            round(st.mean(lengths), 1), "max": max(lengths), "unk_tokens": unknown,
            "labelled_fraction": round(labelled / sum(lengths), 3),
            "match_target": sum(len_ == r["target_tokens"] for len_, r in zip(lengths, rows))}


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


def speed_of(events: list[dict], warmup: int = WARMUP_STEPS) -> dict:
    progress = [e for e in events if e["event"] == "progress" and e["step"] > warmup]
    rates = [e["tokens_per_second"] for e in progress]
    return {"intervals_measured": len(rates), "steps": [progress[0]["step"], progress[-1]["step"]] if progress
            else None, "tokens_per_second": round(statistics.median(rates), 1) if rates else None,
            "tokens_per_second_range": [min(rates), max(rates)] if rates else None,
            "first_losses": [e["loss"] for e in events if e["event"] == "progress"][:5]}


def independent_pair(speed: dict[str, str], out: Path) -> dict:
    """Two 1-GPU jobs at once, one per GPU, no process group between them: each one's tokens/s and their sum."""
    runs = {}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for gpu in (0, 1):
            name = f"speed-alone-gpu{gpu}"
            runs[gpu] = pool.submit(job, {**speed, "NPROC_PER_NODE": "1", "RUN_ID": name, "CUDA_VISIBLE_DEVICES":
                                          str(gpu), "CHECKPOINT_URI": str(out / f"store-{name}"),
                                          "MASTER_PORT": str(29620 + gpu)}, out, name, 300)
    each = {}
    for gpu, future in runs.items():
        rc, events, seconds = future.result()
        each[f"gpu{gpu}"] = {"rc": rc, "wall_seconds": round(seconds, 1), **speed_of(events)}
    rates = [r["tokens_per_second"] for r in each.values()]
    return {**each, "sum_tokens_per_second": round(sum(rates), 1) if all(rates) else None}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--no-independent", action="store_true", help="skip the two 1-GPU jobs at once")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import speed as bench_speed   # bench/speed.py: the same model builder as the single-GPU benchmark

    import torch
    results: dict = {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__}
    models = Path("/tmp/ddp-models")
    words = template_words()

    def save() -> None:   # after each phase, so that a run cut off by its time limit still leaves its figures
        (out / "results.json").write_text(json.dumps(results, indent=2))
    if not args.skip_speed:
        big = models / "llama2-7b-shape"
        started = time.time()
        bench_speed.build_model(big, layers=32, words=words)
        os.sync()   # 13 GB of freshly written shards would otherwise be flushed during the timed steps
        results["model_build_seconds"] = round(time.time() - started, 1)
        data = models / "persona_length.jsonl"
        results["data"] = {"file": data.name, **write_persona_length_data(data, big, args.rows)}
        print(f"data: {results['data']}", flush=True)
        speed = {"BASE_MODEL": str(big), "DATASET": str(data), "MAX_STEPS": str(args.steps)}
        for n in (1, 2):
            rc, events, seconds = job({**speed, "NPROC_PER_NODE": str(n), "RUN_ID": f"speed-{n}gpu",
                                       "CHECKPOINT_URI": str(out / "store-speed"), "MASTER_PORT": str(29600 + n)},
                                      out, f"speed-{n}gpu", timeout=300)
            results[f"speed_{n}gpu"] = {"rc": rc, "wall_seconds": round(seconds, 1), **speed_of(events)}
            print(f"{n} GPU(s): rc={rc} {results[f'speed_{n}gpu']}", flush=True)
        one, two = results["speed_1gpu"]["tokens_per_second"], results["speed_2gpu"]["tokens_per_second"]
        results["scaling"] = round(two / one, 3) if one and two else None
        save()
        if not args.no_independent:
            results["independent_2x1gpu"] = independent_pair(speed, out)
            print(f"two 1-GPU jobs at once: {results['independent_2x1gpu']}", flush=True)
            save()

    small = models / "llama2-7b-width-2-layers"
    bench_speed.build_model(small, layers=2, words=words)
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
        save()

    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    for f in list(out.glob("*.jsonl")) + list(out.glob("*.stderr")):
        f.rename(logs / f.name)
    subprocess.run(["tar", "czf", str(out / "logs.tgz"), "-C", str(logs), "."], check=False)
    print("\n| what | result |\n|---|---|")
    if results.get("data"):
        d = results["data"]
        print(f"| data: {d['rows']} rows, tokens per row (job's encode path) | min {d['min']}, median {d['median']}, "
              f"mean {d['mean']}, max {d['max']}; <unk> {d['unk_tokens']}; skipped {d['skipped']} |")
    for n in (1, 2):
        r = results.get(f"speed_{n}gpu")
        if r:
            print(f"| {n} GPU tokens/s (7B shape, micro-batch 4/GPU, steps {r['steps']}) | {r['tokens_per_second']} "
                  f"(range {r['tokens_per_second_range']}, rc {r['rc']}, losses {r['first_losses']}) |")
    if results.get("scaling"):
        print(f"| scaling 2 vs 1 GPU | {results['scaling']}x |")
    pair = results.get("independent_2x1gpu")
    if pair:
        print(f"| two 1-GPU jobs at once, no DDP | {pair['gpu0']['tokens_per_second']} + "
              f"{pair['gpu1']['tokens_per_second']} = {pair['sum_tokens_per_second']} (rc {pair['gpu0']['rc']}, "
              f"{pair['gpu1']['rc']}) |")
    for name in ("resume-2to1", "resume-1to2"):
        r = results[name]
        print(f"| kill-and-resume {name[7:]} | exit {r['first_rc']} then {r['restart_rc']}, resumed at step "
              f"{r['first_step_after_restart']}, ok={r['ok']} |")
    return 0 if all(results[n]["ok"] for n in ("resume-2to1", "resume-1to2")) else 1


if __name__ == "__main__":
    sys.exit(main())
