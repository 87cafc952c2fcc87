#!/usr/bin/env bash
# Wheels for bench/speed.py's Unsloth configurations (issue 17), installed on the GPU machine into their own
# target directory (/tmp/site-unsloth), apart from the job's stack in /tmp/site: unsloth 2026.10.9 needs
# transformers <= 5.17, which is the GPU image's own (5.17.0); the job carries 5.24.0.
# Run here, in the repo root; the run tool carries .whl-unsloth/ (git-ignored) with `carry: [".whl-unsloth"]`.
#
# What the GPU image already has is not fetched (KINDS.md's list): torch 2.11.0+cu130, triton, transformers 5.17.0,
# accelerate, tokenizers, safetensors, huggingface_hub 1.x, numpy, pandas, pyarrow, xxhash, fsspec, aiohttp,
# httpx, requests, psutil, protobuf, sentencepiece, torchvision, einops, wheel, pillow, regex, rich, typer,
# pyyaml, jinja2, tqdm, packaging, filelock, certifi. Fetched: unsloth's and unsloth_zoo's Requires-Dist that
# the image lacks and that `import unsloth` reaches, at the versions the issue names. bitsandbytes (slimmed) and
# peft come from .whl (bench/fetch_wheels.sh, the job's pins: the seed and job configurations run them too), which
# bench/run_gpu.sh installs into Unsloth's site beside these; so a call carries .whl and .whl-unsloth (~51 MiB).
# Not fetched although unsloth lists them: xformers (optional: unsloth uses SDPA/flash attention without it),
# diffusers (imported only by its diffusion models), pydantic (its studio/CLI only).
#
# Slimmed, with nothing `import unsloth` or the bench runs removed: unsloth's studio/ folder (a web UI, ~23 MB of the
# wheel) is dropped (bench/slim_wheels.py).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl-unsloth}
mkdir -p "$dest"
specs=(unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.3.0 dill==0.4.0 multiprocess==0.70.18
       tyro==1.0.17 docstring-parser==0.18.0 shtab==1.13.0 typeguard==4.6.1 cut_cross_entropy==25.1.1
       torchao==0.18.0 hf_transfer==0.1.9 msgspec==0.23.0 structlog==26.1.0 json5==0.17.3 nest-asyncio==1.6.0)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$dest" "${specs[@]}"
python3 bench/slim_wheels.py "$dest"
du -ch "$dest"/*.whl | tail -1
