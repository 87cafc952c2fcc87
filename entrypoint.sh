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

# ---- HOOK (multi-GPU, another issue): NPROC_PER_NODE > 1 will start torchrun here. ------------------
# Not `exec torchrun --nproc_per_node "$NPROC_PER_NODE" -m job "$@"` yet, because torchrun does not keep
# the job's exit-code contract: on SIGTERM it exits with its own code, not the workers' 75, so a
# preempted pod would count as a failure, and it signals its workers itself, so tini must keep
# signalling only its direct child. NPROC_PER_NODE is not a setting of the job yet, and until it is, a
# value above 1 is refused rather than silently training on one GPU.
nproc="${NPROC_PER_NODE:-1}"
if ! [[ "$nproc" =~ ^[0-9]+$ ]] || (( nproc < 1 )); then
    echo "error: NPROC_PER_NODE=${nproc@Q}: must be a whole number >= 1" >&2
    exit 2
fi
if (( nproc > 1 )); then
    echo "error: NPROC_PER_NODE=${nproc}: multi-GPU training (torchrun) is not supported yet; unset it" >&2
    exit 2
fi
# ---- end of HOOK ---------------------------------------------------------------------------------------

exec python -m job "$@"
