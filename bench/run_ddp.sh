#!/usr/bin/env bash
# On a 2-GPU machine: install the carried wheels (bench/fetch_wheels.sh), then bench/ddp_scaling.py.
#   bash bench/run_ddp.sh OUT_DIR [extra ddp_scaling.py args]
# NCCL_NVLS_ENABLE=0 and friends, set on the lent machines, are inherited by torchrun and every worker.
set -uo pipefail
out=${1:?output folder}; shift
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
date -u +"%Y-%m-%d %H:%M:%S UTC" | tee "$out/gpu.txt"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv | tee -a "$out/gpu.txt"
nvidia-smi topo -m 2>/dev/null | tee -a "$out/gpu.txt"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl 2>&1 | grep -v "^WARNING: Target directory" | tail -3
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 - <<'PY' | tee -a "$out/gpu.txt"
import importlib.metadata as md, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "nccl", ".".join(map(str, torch.cuda.nccl.version())))
print(" ".join(f"{p} {md.version(p)}" for p in ("transformers", "peft", "bitsandbytes", "accelerate", "liger_kernel",
                                                 "triton", "datasets", "tokenizers")))
PY
# Inside the device tool's 600 s per call, with time left to copy what it did back.
timeout "${DDP_TIMEOUT:-540}" python3 bench/ddp_scaling.py --out /tmp/ddp-out "$@"; status=$?
cp /tmp/ddp-out/results.json "$out/" 2>/dev/null
if [ -f /tmp/ddp-out/logs.tgz ]; then
    cp /tmp/ddp-out/logs.tgz "$out/"
else   # cut off: the job logs written so far
    (cd /tmp/ddp-out && tar czf "$out/logs.tgz" $(ls *.jsonl *.stderr 2>/dev/null))
fi
exit $status
