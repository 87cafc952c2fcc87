#!/usr/bin/env bash
# entrypoint.sh [COMMAND [ARGS...]]: run `python -m job COMMAND ARGS...`; COMMAND defaults to train.
#
# python replaces this shell (exec), so the SIGTERM that tini forwards from `docker stop` or the kubelet
# reaches the job itself, which finishes its step, saves, and exits 75. Nothing may run after the exec.
set -euo pipefail

if [[ $# -eq 0 ]]; then
    set -- train
fi

# `python -m job` from any working directory; relative paths in the settings stay relative to the caller's.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"

# Several GPUs (NPROC_PER_NODE, NNODES): `python -m job train` starts its workers under torchrun itself and
# maps their fate to the job's exit codes (75 after a signal, 2 for bad input), which bare torchrun would not.

exec python -m job "$@"
