"""Slim the carried wheels in a folder to fit the 64 MiB a device call may carry, removing nothing the bench runs:

    python3 bench/slim_wheels.py DIR

- bitsandbytes: only libbitsandbytes_cuda130.so (torch.version.cuda == "13.0" picks it) and the CPU library.
- botocore: only the service models of s3 and sts (moto's S3 server and boto3's S3 client need no other).
- unsloth: without its studio/ folder (a web UI; `import unsloth` never reaches it).
Each wheel's RECORD keeps only the files left, so pip installs it without complaint.
"""
from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

RULES = {
    "bitsandbytes-*.whl": lambda n: not re.search(r"libbitsandbytes_cuda(?!130)\d+\.so$", n),
    "botocore-*.whl": lambda n: not n.startswith("botocore/data/") or n.count("/") == 2
    or n.split("/")[2] in ("s3", "sts"),
    "unsloth-*.whl": lambda n: not n.startswith("studio/"),
}


def slim(whl: Path, keep) -> bool:
    src = zipfile.ZipFile(whl)
    names = [n for n in src.namelist() if keep(n)]
    if len(names) == len(src.namelist()):
        return False
    tmp = whl.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for n in names:
            data = src.read(n)
            if n.endswith(".dist-info/RECORD"):
                data = "\n".join(line for line in data.decode().splitlines()
                                 if keep(line.split(",")[0])).encode() + b"\n"
            out.writestr(n, data)
    tmp.replace(whl)
    print(f"slimmed {whl.name}: {len(src.namelist())} -> {len(names)} files, {whl.stat().st_size / 2**20:.1f} MiB")
    return True


def main(folder: str) -> None:
    for pattern, keep in RULES.items():
        for whl in sorted(Path(folder).glob(pattern)):
            slim(whl, keep)


if __name__ == "__main__":
    main(sys.argv[1])
