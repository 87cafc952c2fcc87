"""Persona QLoRA fine-tuning job: `python -m job` (see job/cli.py)."""
import logging

# bitsandbytes warns at import on CPUs with AVX512-BF16 that an optional kernel package is missing;
# the job never uses that kernel (see model._one_cpu_kernel), so the warning is only noise in the log.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
