"""Persona QLoRA fine-tuning job: `python -m job` (see job/cli.py)."""
import logging
import os
from pathlib import Path

# bitsandbytes warns at import on CPUs with AVX512-BF16 that an optional kernel package is missing;
# the job never uses that kernel (see model._one_cpu_kernel), so the warning is only noise in the log.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def child_environment(**extra: str) -> dict[str, str]:
    """This process's environment for a `python -m job...` child (the compile's helper, the early Triton probe):
    the folder holding this package first on PYTHONPATH, as `python -m job` found it, and `extra` set."""
    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])), **extra}
