#!/usr/bin/env bash
# Wheels for the GPU bench machine, which has no network: the job's pinned stack (constraints.txt) minus what
# the machine's image already has at the same role (torch 2.11.0+cu130, triton, numpy, pandas, pyarrow).
# Run here, in the repo root; the run tool carries .whl/ (git-ignored) with `carry: [".whl"]`, and .whl-extra/
# (moto's S3 server, py-spy) with `carry: [".whl", ".whl-extra"]` for the runs that need them.
#
# Two wheels are slimmed to fit the 64 MiB a call may carry, with nothing the bench runs removed:
#   bitsandbytes: only libbitsandbytes_cuda130.so (torch.version.cuda == "13.0" picks it) and the CPU library;
#                 the other CUDA builds (118..132) are dropped (43 MB -> ~3 MB).
#   botocore:     only the service models of s3 and sts (moto's S3 server and boto3's S3 client need no other).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
extra=.whl-extra
mkdir -p "$dest" "$extra"
pin() { grep -i "^$1==" constraints.txt | head -1; }
download() {   # folder, specs...
    local to=$1; shift
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$to" "$@"
}
# .whl: what the job and the bench's configurations import (boto3 included: job/store/s3.py).
pkgs=(transformers peft bitsandbytes accelerate datasets dill multiprocess huggingface_hub tokenizers safetensors
      boto3 botocore s3transfer jmespath httpx2 httpcore2 truststore hf-xet click fsspec xxhash)
specs=()
for p in "${pkgs[@]}"; do specs+=("$(pin "$p")"); done
specs+=("liger-kernel==${LIGER_VERSION:-0.8.5}")
download "$dest" "${specs[@]}"
# .whl-extra (~15 MiB): moto's S3 server, for the configurations that checkpoint (job-ckpt*), bench/gpu_e2e.py
# and bench/ddp_scaling.py's resume check; and py-spy (bench/speed.py --pyspy). Apart from .whl, so that a call
# carrying the job's stack and Unsloth's (.whl-unsloth, bench/fetch_unsloth_wheels.sh) stays under 64 MiB.
extras=(moto responses xmltodict Flask flask-cors blinker itsdangerous Werkzeug cryptography cffi pycparser
        py-partiql-parser)
specs=()
for p in "${extras[@]}"; do specs+=("$(pin "$p")"); done
specs+=("py-spy==${PYSPY_VERSION:-0.4.3}")
download "$extra" "${specs[@]}"
python3 bench/slim_wheels.py "$dest"
du -ch "$dest"/*.whl | tail -1
du -ch "$extra"/*.whl | tail -1
