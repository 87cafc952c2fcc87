# syntax=docker/dockerfile:1
#
# The persona QLoRA job on one NVIDIA GPU.
#
# Versions are the ones the GPU checks ran with (H100/H200 bench machines: Ubuntu 24.04, Python 3.12.3,
# torch 2.11.0+cu130, driver 580): CUDA 13.0, torch 2.11.0+cu130 from the PyTorch cu130 index, triton and
# torch's CUDA wheels from constraints-image.txt, and constraints.txt for everything else. constraints.txt pins
# torch 2.13.0 because CI runs the CPU build; the container pins its own CUDA build instead, so that one line is
# replaced below.
#
# bitsandbytes 0.50.2 from PyPI already carries CUDA 13 kernels: its wheel ships
# bitsandbytes/libbitsandbytes_cuda130.so (and _cuda132.so), picked by torch.version.cuda == "13.0".
# That library needs libcudart.so.13, libcublas.so.13 and libcublasLt.so.13 and has the RUNPATH
# /usr/local/cuda-13.0/targets/x86_64-linux/lib, where a -runtime image would keep them. torch's own wheels
# bring the same libraries (nvidia-cuda-runtime, nvidia-cublas) and load them at `import torch`, which comes
# first. So the base is CUDA's -base image (the NVIDIA container variables, no CUDA libraries to speak of), not
# -runtime, which would add ~1.9 GB of second copies: on an H200 with every system CUDA library hidden, the 4-bit
# matmul and the whole `train` (inductor's Triton kernels; Liger's) ran from torch's pip copies alone
# (bench/toolchain_check.sh steps c, c2, c3; docs/IMAGE.md). Not -cudnn: torch's wheel brings its own cuDNN.
#
# Build arguments, for builds without the registries (CI: .ci/image-test.sh); the defaults are the production
# build: BASE_IMAGE, TORCH_VERSION (PyPI spells the same cu130 build 2.11.0), and pip's own variables for
# where wheels come from (PIP_EXTRA_INDEX_URL; or PIP_NO_INDEX=1 and PIP_FIND_LINKS=DIR).
#
# Build:  docker build -t persona-qlora:dev .
# Run:    docker run --rm --gpus all --shm-size 8g --env-file .env persona-qlora:dev
#         (or `docker compose up train`, see docs/DEPLOY.md; with --read-only add --tmpfs /tmp)

ARG BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu 24.04's python3.12 is 3.12.3, the bench machines' Python. tini is PID 1 (see ENTRYPOINT).
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates python3.12 tini \
    && rm -rf /var/lib/apt/lists/*
# DL3008 (pin apt versions) is ignored on purpose, here and below: the Ubuntu archive keeps only the newest
# build of each package in a pocket, so an exact pin stops building at the next security update. What is
# installed from apt is fixed by the base image tag; the Python stack, which decides the results, is pinned
# exactly by pip below.


# ---- builder: a virtual environment with every Python package; pip and its caches stay behind ----
FROM base AS builder
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/venv
ARG TORCH_VERSION=2.11.0+cu130
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
COPY requirements.txt requirements-gpu.txt constraints.txt constraints-image.txt /tmp/deps/
# The image's constraints: constraints.txt without its CPU torch line, the CUDA build of torch, and triton and
# torch's CUDA wheels (constraints-image.txt).
RUN { sed '/^torch==/d' /tmp/deps/constraints.txt; cat /tmp/deps/constraints-image.txt; \
      echo "torch==${TORCH_VERSION}"; } > /tmp/deps/constraints-all.txt
# One resolver run over both indexes, so torch's CUDA build and everything else are solved together. Every
# version is pinned, so a package found on both indexes is the same release either way. pip then removes
# itself: the job installs nothing at run time, and the final stage copies this venv as it is.
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
        -r /tmp/deps/requirements.txt -r /tmp/deps/requirements-gpu.txt -c /tmp/deps/constraints-all.txt \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/pip uninstall --yes --quiet pip \
    && test ! -e /opt/venv/bin/pip


# ---- the image: the base, the environment and the job, run as a non-root user ----
FROM base
# A C and C++ compiler and Python's headers, used at run time: Triton compiles each kernel's launcher with the
# C compiler against Python.h (Liger's kernels, torch.compile's inductor on a GPU), and inductor's CPU code is
# C++. Without them the first training step on a GPU fails ("Failed to find C compiler"). libpython3.12-dev is
# Python.h without python3.12-dev's extras; docs/IMAGE.md shows this set is enough (the GPU-parity check,
# `python -m job toolchain`, and bench/toolchain_check.sh on a GPU).
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        gcc g++ libc6-dev libpython3.12-dev \
    && rm -rf /var/lib/apt/lists/*
# A fixed numeric UID, so Kubernetes can verify runAsNonRoot from the image alone (10001: clear of the
# image's own ubuntu user, 1000).
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
    && mkdir -p /cache/huggingface /scratch \
    && chown -R 10001:10001 /cache /scratch
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY job/ /app/job/
# The job's own bytecode, like the venv's (pip compiled it at install): PYTHONDONTWRITEBYTECODE and a read-only
# root filesystem would otherwise have every start compile it from source again.
RUN /opt/venv/bin/python -m compileall -q /app/job
COPY data/persona_sample.jsonl /app/data/persona_sample.jsonl
COPY --chmod=0755 entrypoint.sh /app/entrypoint.sh
# HF_HOME holds downloaded models (a 7B base is about 13 GB): keep it on a volume so a restart reuses it. The
# compile caches (Triton's kernels, inductor's) live on it too, so a restarted run does not compile again; the
# root filesystem may be read-only (Kubernetes, `docker run --read-only --tmpfs /tmp`), so nothing is written
# under /home/app: matplotlib's config and font cache go to /tmp, which must be writable anyway.
# OUTPUT_DIR is scratch; checkpoints default to it only when CHECKPOINT_URI is not set to a store outside
# the container (compose and k8s set s3://...). Bytecode was compiled at install time; writing more would
# fail on a read-only root filesystem (k8s).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/huggingface/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/huggingface/torch-compile \
    MPLCONFIGDIR=/tmp/matplotlib \
    OUTPUT_DIR=/scratch/output \
    CHECKPOINT_URI=/scratch/checkpoints
VOLUME ["/cache/huggingface"]
USER 10001:10001
# No HEALTHCHECK: this is a batch job. Docker does nothing with an unhealthy container outside swarm, and
# Kubernetes ignores the instruction; the job's progress is in status.json (`python -m job status`) and
# its outcome is its exit code (0 done, 2 bad input, 75 stopped after a checkpoint, 1 other failure).
STOPSIGNAL SIGTERM
# tini is PID 1: it reaps zombies and forwards SIGTERM/SIGINT to its child, which entrypoint.sh replaces
# with python via exec. No -g (signal the whole process group): the job's handler must be the only one
# to act on the first signal. With -g, helper processes (a future torchrun's workers, which torchrun
# signals itself) would get the signal twice, and the job treats a second signal as "exit at once".
ENTRYPOINT ["/usr/bin/tini", "--", "/app/entrypoint.sh"]
CMD ["train"]
