#!/usr/bin/env bash
# Issue 17's open measurements in one device call, on a fresh machine (the race must be a first run: nothing
# compiled on the node yet), each result copied to OUT while it runs, so a call cut off at its limit still brings
# back what finished:
#   1. race: the seed's whole run end to end beside the job's defaults and Unsloth's (bench/e2e_race.py,
#      RACE=seed,job,unsloth, or the contenders RACE names);
#   2. mfu: batch 24 with the weights kept, and the largest batch this card holds (32 on an H100's 80 GB, 48 on an
#      H200's 141 GB), for target 5 (bench/speed.py).
#   bash bench/issue17_run.sh OUT [race,mfu]
# Carry .whl and .whl-unsloth (bench/fetch_wheels.sh, bench/fetch_unsloth_wheels.sh). The device tool brings back
# at most 8 files from OUT: race.json, race-run.log, race-job.log, race.tgz (all of the race's logs), mfu.json,
# mfu-run.log.
set -uo pipefail
out=${1:?output folder}
steps=${2:-race,mfu}
cd "$(dirname "$0")/.."
mkdir -p "$out"
status=0

# Copies $2 to $3 every 3 s until killed; prints its pid.
follow() {
    (while sleep 3; do cp "$1" "$out/$2" 2>/dev/null; done) > /dev/null 2>&1 &
    echo $!
}

if [[ ",$steps," == *",race,"* ]]; then
    work=/tmp/issue17-race
    mkdir -p "$work"
    pids="$(follow "$work/run.log" race-run.log) $(follow /tmp/bench-run/race/results.json race.json) \
          $(follow /tmp/bench-run/race/job.log race-job.log)"
    SKIP_SNAPSHOT=1 RACE="${RACE:-seed,job,unsloth}" RACE_TIMEOUT="${RACE_TIMEOUT:-400}" \
        RACE_CONTENDER_TIMEOUT="${RACE_CONTENDER_TIMEOUT:-160}" \
        bash bench/run_gpu.sh "$work" none "" no-e2e > "$work/run.log" 2>&1 || status=1
    kill $pids 2>/dev/null
    cp "$work/run.log" "$out/race-run.log"
    cp /tmp/bench-run/race/results.json "$out/race.json" 2>/dev/null
    cp /tmp/bench-run/race/job.log "$out/race-job.log" 2>/dev/null
    # run_gpu.sh starts the next step by deleting /tmp/bench-run: every contender's log goes now
    tar czf "$out/race.tgz" -C /tmp/bench-run/race --exclude=work --exclude=job --exclude="*.jsonl" . 2>/dev/null
    tail -25 "$work/run.log"
fi

if [[ ",$steps," == *",mfu,"* ]]; then
    memory_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
    largest=job-b32-compile-kept
    if [ "${memory_mib:-0}" -gt 120000 ]; then largest=job-b48-compile-kept; fi
    work=/tmp/issue17-mfu
    mkdir -p "$work"
    pids="$(follow "$work/run.log" mfu-run.log) $(follow /tmp/bench-run/speed/results.json mfu.json)"
    SKIP_SNAPSHOT=1 SPEED_TIMEOUT="${SPEED_TIMEOUT:-260}" CONFIG_TIMEOUT="${CONFIG_TIMEOUT:-120}" \
        bash bench/run_gpu.sh "$work" "job-b24-compile-kept,$largest" "" no-e2e > "$work/run.log" 2>&1 || status=1
    kill $pids 2>/dev/null
    cp "$work/run.log" "$out/mfu-run.log"
    cp /tmp/bench-run/speed/results.json "$out/mfu.json" 2>/dev/null
    tail -15 "$work/run.log"
fi
exit $status
