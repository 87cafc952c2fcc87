#!/usr/bin/env bash
# On a 2-GPU machine: the first logged losses of 1-GPU and 2-GPU runs of the tiny model, with the GPU levers on
# and off one at a time, to find which one makes the 2-GPU loss differ (docs/PERFORMANCE.md, "Two GPUs").
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl 2>&1 | grep -v "^WARNING: Target directory" | tail -3
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m job tiny-model /tmp/tiny >/dev/null 2>&1
run() {  # name, nproc, extra settings...
    local name=$1 n=$2; shift 2
    env REQUIRE_GPU=true BASE_MODEL=/tmp/tiny DATASET=data/persona_sample.jsonl NUM_SAMPLES=64 EVAL_FRACTION=0 \
        LORA_DROPOUT=0 MAX_STEPS=3 LOGGING_STEPS=1 SAVE_STEPS=100 LOG_FORMAT=json RUN_ID="$name" \
        CHECKPOINT_URI=/tmp/lc/store OUTPUT_DIR=/tmp/lc/$name NPROC_PER_NODE=$n MASTER_PORT=$((29700 + RANDOM % 200)) \
        "$@" timeout 90 python3 -m job train 2>/tmp/lc-$name.err \
        | python3 -c "import json,sys; print('$name', [round(json.loads(l)['loss'],5) for l in sys.stdin if '\"progress\"' in l])"
    tail -2 /tmp/lc-$name.err | cut -c1-300
}
mkdir -p /tmp/lc
run one-gpu 1
run two-gpu 2
run two-gpu-padded 2 PADDING_FREE=false
run two-gpu-no-liger 2 USE_LIGER_KERNEL=false
run two-gpu-plain 2 PADDING_FREE=false USE_LIGER_KERNEL=false TF32=false
