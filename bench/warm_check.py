"""The compile's helper alone (job/speed/warm.py), timed under variants, each with empty compile caches: how long
from `go` (the run's checks passed) to its exit, and where its compile's time goes (Dynamo's timers).

    python bench/warm_check.py --out DIR [--variants baseline,pool,pool-nopw,baseline] [--go-after 6]

The base is Llama-2-7B's shape (its config.json and a word-level tokenizer: the helper builds its own one-layer
model), the settings the job's defaults. Each variant starts the helper as the run does (job.speed.warm's protocol:
the pickled settings on stdin, then "go"), sends "go" `--go-after` seconds after the start (what the run's imports
and checks take on an H100, docs/PERFORMANCE.md), and waits for it to exit. A variant is a few lines run in the
helper before its main():
- baseline: the helper as it is;
- pool: inductor's compile workers started during the wait for "go" (they are otherwise started at the first
  compile);
- nopw: inductor without autotuning pointwise kernels (one launch configuration each, none benchmarked);
- pool-nopw: both.
Writes results.json and prints one JSON line per variant.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

POOL = ("from torch._inductor.async_compile import maybe_warm_pool\n"
        "_preload = warm.preload\n"
        "def preload():\n"
        "    _preload()\n"
        "    maybe_warm_pool()\n"
        "warm.preload = preload\n")
NO_POINTWISE_AUTOTUNE = "import torch._inductor.config\ntorch._inductor.config.triton.autotune_pointwise = False\n"
VARIANTS = {"baseline": "", "pool": POOL, "nopw": NO_POINTWISE_AUTOTUNE, "pool-nopw": POOL + NO_POINTWISE_AUTOTUNE}


def base_folder(directory: Path) -> Path:
    """Llama-2-7B's config.json (stored as float16, as the Hub's is) and the bench's tokenizer; no weights."""
    from transformers import LlamaConfig

    import speed
    from ddp_scaling import template_words

    if not (directory / "config.json").exists():
        speed.build_tokenizer(directory, template_words())
        config = LlamaConfig(**speed.LLAMA2_7B, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        config.dtype = "float16"
        config.save_pretrained(directory)
    return directory


def run_variant(name: str, config, out: Path, go_after: float, device: str) -> dict:
    caches = out / "caches" / name
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"), "TRITON_CACHE_DIR": str(caches / "triton")}
    (caches / "scratch").mkdir(parents=True, exist_ok=True)
    report = out / f"report-{name}.json"
    report.unlink(missing_ok=True)
    code = f"from job.speed import warm\n{VARIANTS[name.split('#')[0]]}raise SystemExit(warm.main())\n"
    started = time.time()
    with open(out / f"log-{name}.txt", "wb") as log:
        process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=log,
                                   stderr=subprocess.STDOUT, env=env)
        process.stdin.write(pickle.dumps({"config": config, "device": device, "report": str(report),
                                          "scratch": str(caches / "scratch")}))
        process.stdin.flush()
        time.sleep(max(0.0, go_after - (time.time() - started)))
        went = time.time()
        process.stdin.write(b"go\n")
        process.stdin.close()
        code = process.wait(timeout=300)
    ended = time.time()
    try:
        result = json.loads(report.read_text())
    except (OSError, ValueError):
        result = {"error": f"exit {code}, no report; see log-{name}.txt"}
    return {"variant": name, "go_to_exit_seconds": round(ended - went, 2),
            "start_to_exit_seconds": round(ended - started, 2), **result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default="baseline,pool,pool-nopw,baseline")
    parser.add_argument("--go-after", type=float, default=6.0)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (aot_eager, no inductor)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from job.config import from_env

    base = base_folder(Path("/tmp/llama2-7b-config-only"))
    data = args.out / "rows.jsonl"   # the settings need a dataset; the helper reads none
    data.write_text("")
    config = from_env({"BASE_MODEL": str(base), "DATASET": str(data), "OUTPUT_DIR": str(args.out / "job-out"),
                       "CHECKPOINT_URI": str(args.out / "store"), "REQUIRE_GPU": str(args.device == "cuda").lower()})
    results = []
    for i, name in enumerate(args.variants.split(",")):
        results.append(run_variant(f"{name}#{i}", config, args.out, args.go_after, args.device))
        print(json.dumps(results[-1]), flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
