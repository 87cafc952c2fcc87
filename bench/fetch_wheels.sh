#!/usr/bin/env bash
# Wheels for the GPU bench machine, which has no network: the job's pinned stack (constraints.txt) minus what
# the machine's image already has at the same role (torch 2.11.0+cu130, triton, numpy, pandas, pyarrow).
# Run here, in the repo root; the run tool carries .whl/ (git-ignored) with `carry: [".whl"]`.
#
# Two wheels are slimmed to fit the 64 MiB a call may carry, with nothing the bench runs removed:
#   bitsandbytes: only libbitsandbytes_cuda130.so (torch.version.cuda == "13.0" picks it) and the CPU library;
#                 the other CUDA builds (118..132) are dropped (43 MB -> ~3 MB).
#   botocore:     only the service models of s3 and sts (moto's S3 server and boto3's S3 client need no other).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest"
pin() { grep -i "^$1==" constraints.txt | head -1; }
pkgs=(transformers peft bitsandbytes accelerate datasets dill multiprocess huggingface_hub tokenizers safetensors
      boto3 botocore s3transfer jmespath moto responses xmltodict Flask flask-cors blinker itsdangerous Werkzeug
      cryptography cffi pycparser py-partiql-parser httpx2 httpcore2 truststore hf-xet click fsspec xxhash)
specs=()
for p in "${pkgs[@]}"; do specs+=("$(pin "$p")"); done
specs+=("liger-kernel==${LIGER_VERSION:-0.8.5}")
# A sampling profiler for the bench only (bench/speed.py --pyspy): where the host time of a step goes.
specs+=("py-spy==${PYSPY_VERSION:-0.4.3}")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$dest" "${specs[@]}"
python3 - "$dest" <<'PY'
import re, sys, zipfile, pathlib
dest = pathlib.Path(sys.argv[1])
def slim(pattern, keep):
    for whl in dest.glob(pattern):
        src = zipfile.ZipFile(whl)
        names = [n for n in src.namelist() if keep(n)]
        if len(names) == len(src.namelist()):
            continue
        tmp = whl.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for n in names:
                data = src.read(n)
                if n.endswith(".dist-info/RECORD"):
                    data = "\n".join(l for l in data.decode().splitlines() if keep(l.split(",")[0])).encode() + b"\n"
                out.writestr(n, data)
        tmp.replace(whl)
        print(f"slimmed {whl.name}: {len(src.namelist())} -> {len(names)} files, {whl.stat().st_size/2**20:.1f} MiB")
slim("bitsandbytes-*.whl", lambda n: not re.search(r"libbitsandbytes_cuda(?!130)\d+\.so$", n))
slim("botocore-*.whl", lambda n: not n.startswith("botocore/data/") or n.count("/") == 2
     or n.split("/")[2] in ("s3", "sts"))
PY
du -ch "$dest"/*.whl | tail -1
