# syntax=docker/dockerfile:1
#
# The persona QLoRA job on one NVIDIA GPU.
#
# Versions are the ones the GPU checks ran with (H100/H200 bench machines: Ubuntu 24.04, Python 3.12.3,
# torch 2.11.0+cu130, driver 580): CUDA 13.0 runtime, torch 2.11.0+cu130 from the PyTorch cu130 index,
# and constraints.txt for everything else. constraints.txt pins torch 2.13.0 because CI runs the CPU
# build; the container pins its own CUDA build instead, so that one line is replaced below.
#
# bitsandbytes 0.50.2 from PyPI already carries CUDA 13 kernels: its wheel ships
# bitsandbytes/libbitsandbytes_cuda130.so (and _cuda132.so), picked by torch.version.cuda == "13.0".
# That library needs libcudart.so.13, libcublas.so.13 and libcublasLt.so.13 and has the RUNPATH
# /usr/local/cuda-13.0/targets/x86_64-linux/lib, which is where the -runtime image keeps them. Hence
# -runtime, not -base (no cuBLAS) and not -cudnn-runtime (torch's wheel brings its own cuDNN as a pip
# package, so a second copy would only add about a gigabyte).
#
# Build:  docker build -t persona-qlora:dev .
# Run:    docker run --rm --gpus all --shm-size 8g --env-file .env persona-qlora:dev
#         (or `docker compose up train`, see docs/DEPLOY.md)

FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS base
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
COPY requirements.txt requirements-gpu.txt constraints.txt /tmp/deps/
# The image's constraints: constraints.txt without its CPU torch line, plus the CUDA build of torch and the
# exact versions of torch's own CUDA dependencies as installed on the bench machines (torch pins most of
# them itself; cuda-bindings, cuda-pathfinder and setuptools it only bounds).
RUN sed '/^torch==/d' /tmp/deps/constraints.txt > /tmp/deps/constraints-image.txt \
    && printf '%s\n' \
        'torch==2.11.0+cu130' \
        'triton==3.6.0' \
        'cuda-toolkit==13.0.2' \
        'cuda-bindings==13.3.1' \
        'cuda-pathfinder==1.8.1' \
        'nvidia-cublas==13.1.0.3' \
        'nvidia-cuda-cupti==13.0.85' \
        'nvidia-cuda-nvrtc==13.0.88' \
        'nvidia-cuda-runtime==13.0.96' \
        'nvidia-cudnn-cu13==9.19.0.56' \
        'nvidia-cufft==12.0.0.61' \
        'nvidia-cufile==1.15.1.6' \
        'nvidia-curand==10.4.0.35' \
        'nvidia-cusolver==12.0.4.66' \
        'nvidia-cusparse==12.6.3.3' \
        'nvidia-cusparselt-cu13==0.8.0' \
        'nvidia-nccl-cu13==2.28.9' \
        'nvidia-nvjitlink==13.0.88' \
        'nvidia-nvshmem-cu13==3.4.5' \
        'nvidia-nvtx==13.0.85' \
        'setuptools==81.0.0' \
        >> /tmp/deps/constraints-image.txt
# One resolver run over both indexes, so torch's CUDA build and everything else are solved together. Every
# version is pinned, so a package found on both indexes is the same release either way.
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
        --extra-index-url https://download.pytorch.org/whl/cu130 \
        -r /tmp/deps/requirements.txt -r /tmp/deps/requirements-gpu.txt -c /tmp/deps/constraints-image.txt \
    && /opt/venv/bin/pip check


# ---- the image: the base, the environment and the job, run as a non-root user ----
FROM base
# A fixed numeric UID, so Kubernetes can verify runAsNonRoot from the image alone (10001: clear of the
# image's own ubuntu user, 1000).
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
    && mkdir -p /cache/huggingface /scratch \
    && chown -R 10001:10001 /cache /scratch
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY job/ /app/job/
COPY data/persona_sample.jsonl /app/data/persona_sample.jsonl
COPY --chmod=0755 entrypoint.sh /app/entrypoint.sh
# HF_HOME holds downloaded models (a 7B base is about 13 GB): keep it on a volume so a restart reuses it.
# OUTPUT_DIR is scratch; checkpoints default to it only when CHECKPOINT_URI is not set to a store outside
# the container (compose and k8s set s3://...). Bytecode was compiled at install time; writing more would
# fail on a read-only root filesystem (k8s).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache/huggingface \
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
