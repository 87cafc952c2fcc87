#!/usr/bin/env bash
# On the GPU machine: install the carried wheels, record the machine, then run the benchmark and the GPU e2e.
#   bash bench/run_gpu.sh OUT_DIR [speed.py configs] [configs to profile] [e2e|numerics|no-e2e]
# Carry .whl (the job's stack, bench/fetch_wheels.sh); .whl-extra for checkpointing configurations, e2e and PYSPY;
# .whl-unsloth (bench/fetch_unsloth_wheels.sh) for the unsloth* configurations.
# Environment: RACE=contenders of bench/e2e_race.py (the seed's whole run, end to end; RACE_TIMEOUT), CLI_SPEED=job configs to also run through `python -m job train` (bench/cli_speed.py; CLI_STEPS steps,
# default 40; CLI_PYSPY=1 samples both sides), PYSPY=configs to sample with py-spy, SKIP_SNAPSHOT=1 to skip bench/snapshot_check.py,
# OLD_TREE=a copy of an older checkout to run OLD_CONFIGS (default job) of too and compare first losses with,
# NF4_CHECK=1 runs bench/nf4_check.py first, KEPT_CHECK=1 bench/kept_check.py, WARM_CHECK=variants of bench/warm_check.py,
# SPEED_TIMEOUT / CONFIG_TIMEOUT / OLD_TIMEOUT / CLI_TIMEOUT / CLI_CONFIG_TIMEOUT / E2E_TIMEOUT seconds.
# Wheels: bench/fetch_wheels.sh puts them in .whl/ here; the device tool carries .whl (README.md, Notes).
set -uo pipefail
out=${1:?output folder}
configs=${2:-seed,job,job-gc,job-b24}
profile=${3:-}
e2e=${4:-e2e}
cd "$(dirname "$0")/.."
mkdir -p "$out"
# The device tool brings back at most 8 files from OUT: full logs go to a scratch folder, then one tarball.
scratch=/tmp/bench-run
rm -rf "$scratch" && mkdir -p "$scratch"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
date -u +"%Y-%m-%d %H:%M:%S UTC" | tee "$out/gpu.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee -a "$out/gpu.txt"
python3 -m pip list 2>/dev/null > "$out/pip-list-image.txt"
if [ -d .whl ]; then
    # .whl-extra (moto's S3 server, py-spy), where carried, goes into the same site.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl $(ls .whl-extra/*.whl 2>/dev/null) 2>&1 | grep -v "^WARNING: Target directory" | tail -3
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
if [ -d .whl-unsloth ]; then
    # Unsloth's own site (bench/unsloth_bench.py): its wheels, with the job's bitsandbytes and peft, over the image's
    # transformers 5.17.0; the Unsloth configurations run with it in place of /tmp/site.
    PYTHONPATH= python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site-unsloth .whl-unsloth/*.whl .whl/bitsandbytes-*.whl .whl/peft-*.whl 2>&1 \
        | grep -v "^WARNING: Target directory" | tail -3
    export UNSLOTH_SITE=/tmp/site-unsloth
fi
# Bytecode for every installed module, as the image has it (pip compiles at install): this machine's Python has
# none for its own torch and writes none, so without this every process compiles its imports from source (11 s
# of a CLI start on 2026-11-29, py-spy). The cache goes under PYTHONPYCACHEPREFIX, for every process below.
export PYTHONPYCACHEPREFIX=/tmp/pycache
unset PYTHONDONTWRITEBYTECODE
started=$(date +%s)
timeout 120 python3 -m compileall -q -j 0 "$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')" \
    $(ls -d /tmp/site /tmp/site-unsloth 2>/dev/null) > /dev/null 2>&1
echo "bytecode compiled in $(( $(date +%s) - started )) s" | tee -a "$out/gpu.txt"
python3 - <<'PY' | tee "$out/versions.txt"
import importlib.metadata as md, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
for p in ("transformers", "peft", "bitsandbytes", "accelerate", "datasets", "liger_kernel", "triton",
          "huggingface_hub", "tokenizers", "safetensors", "pyarrow", "numpy", "pandas", "moto", "boto3"):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "missing")
import bitsandbytes, liger_kernel, peft, transformers  # noqa: F401  (imports work)
PY
status=0
if [ -z "${SKIP_SNAPSHOT:-}" ]; then
    python3 bench/snapshot_check.py | tee "$out/snapshot_check.json" || status=1
fi
if [ -n "${NF4_CHECK:-}" ]; then
    # The compiled layers' NF4 dequantization against bitsandbytes' kernels (bench/nf4_check.py)
    timeout 240 python3 bench/nf4_check.py "$out" 2>&1 | tee "$scratch/nf4_check.log" | grep -v "^ *warn" || status=1
fi
if [ -n "${KEPT_CHECK:-}" ]; then
    # A compiled layer's 4-bit linears keeping their dequantized weights against bitsandbytes' path (bench/kept_check.py)
    timeout 150 python3 bench/kept_check.py "$out" 2>&1 | tee "$scratch/kept_check.log" | grep -v "^ *warn" || status=1
fi
if [ -n "${WARM_CHECK:-}" ]; then
    # The compile's helper alone under variants (bench/warm_check.py): WARM_CHECK=baseline,pool,pool-nopw,...
    timeout "${WARM_TIMEOUT:-200}" python3 bench/warm_check.py --out "$scratch/warm" --variants "$WARM_CHECK" \
        2>&1 | tee "$scratch/warm_check.log" || status=1
    cp "$scratch/warm/results.json" "$out/warm_results.json" 2>/dev/null
fi
if [ "$configs" != "none" ]; then
    timeout "${SPEED_TIMEOUT:-400}" python3 bench/speed.py --out "$scratch/speed" --configs "$configs" \
        --profile "$profile" --pyspy "${PYSPY:-}" --timeout "${CONFIG_TIMEOUT:-200}" || status=1
    cp "$scratch/speed/results.json" "$out/" 2>/dev/null   # now: a later step may run out of time
fi
if [ -n "${OLD_TREE:-}" ]; then
    # Another checkout's bench/speed.py (a plain copy of the repository, e.g. `git archive`) on the same model and
    # token stream, and the first losses of its OLD_CONFIGS beside this run's: a refactor must keep them.
    timeout "${OLD_TIMEOUT:-200}" python3 "$OLD_TREE/bench/speed.py" --out "$scratch/old" \
        --configs "${OLD_CONFIGS:-job}" --model-dir /tmp/llama2-7b-shape-7b --timeout "${CONFIG_TIMEOUT:-200}" \
        > "$scratch/old.log" 2>&1 || status=1
    cp "$scratch/old/results.json" "$out/old_results.json" 2>/dev/null
    python3 - "$scratch/old/results.json" "$scratch/speed/results.json" "$OLD_TREE/bench/speed.py" <<'PY' \
        | tee "$out/old_vs_new_losses.txt"
import importlib.util, json, sys
sys.path.insert(0, "bench")
from speed import stream_digest
try:
    old, new = ({r["config"]: r for r in json.load(open(p))["results"]} for p in sys.argv[1:3])
except (OSError, ValueError) as exc:
    sys.exit(f"old vs new: no results to compare ({exc})")
try:   # an old bench does not record its stream's digest: draw its stream with its own code
    spec = importlib.util.spec_from_file_location("old_speed", sys.argv[3])
    old_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old_speed)
    old_stream = stream_digest(old_speed.token_stream())
except Exception as exc:  # noqa: BLE001 - the losses stand without it
    old_stream = f"unknown ({type(exc).__name__}: {exc})"
for name, o in old.items():
    n = new.get(name, {})
    a, b = o.get("first_losses") or o.get("error"), n.get("first_losses") or n.get("error")
    streams = o.get("token_stream", old_stream), n.get("token_stream")
    print(f"{name}: old {a}\n{' ' * len(name)}  new {b}\n{' ' * len(name)}  "
          f"{'identical' if a == b else 'step 1 ' + ('equal' if a and b and a[0] == b[0] else 'DIFFERS')}; "
          f"token streams {'the same' if streams[0] == streams[1] else 'DIFFER: old %s, new %s' % streams}")
PY
fi
if [ -n "${CLI_SPEED:-}" ]; then
    timeout "${CLI_TIMEOUT:-540}" python3 bench/cli_speed.py --out "$scratch/cli" --configs "$CLI_SPEED" \
        --steps "${CLI_STEPS:-40}" --timeout "${CLI_CONFIG_TIMEOUT:-200}" ${CLI_PYSPY:+--pyspy} || status=1
    cp "$scratch/cli/results.json" "$out/cli_results.json" 2>/dev/null
fi
if [ -n "${RACE:-}" ]; then
    # The seed's run end to end (bench/e2e_race.py): RACE=seed,unsloth,job[,job-compile,job-compile-again]
    timeout "${RACE_TIMEOUT:-560}" python3 bench/e2e_race.py --out "$scratch/race" --contenders "$RACE" \
        --timeout "${RACE_CONTENDER_TIMEOUT:-300}" || status=1
    cp "$scratch/race/results.json" "$out/race_results.json" 2>/dev/null
fi
if [ "$e2e" = "e2e" ]; then
    timeout "${E2E_TIMEOUT:-240}" python3 bench/gpu_e2e.py --out "$scratch" || status=1
elif [ "$e2e" = "numerics" ]; then
    timeout "${E2E_TIMEOUT:-170}" python3 bench/gpu_e2e.py --out "$scratch" --numerics-only || status=1
fi
cp "$scratch/speed/results.json" "$scratch/GPU_E2E.md" "$out/" 2>/dev/null
cp "$scratch"/speed/pyspy-*.json "$out/" 2>/dev/null
tar czf "$out/logs.tgz" -C "$scratch" --exclude=work --exclude=store --exclude=out --exclude=trainer --exclude=caches \
    --exclude="*.jsonl" . 2>/dev/null
exit $status
