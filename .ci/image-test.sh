#!/usr/bin/env bash
# `make image-test`: build the image from the Dockerfile with podman and run the job in it, as users run it.
#
#   1. Tools: podman (with runc), debootstrap, podman-compose >= 1.6 in a venv of its own.
#   2. A base in place of nvidia/cuda:...-ubuntu24.04, which no registry here serves: Ubuntu 24.04 (noble)
#      minbase, debootstrapped from Ubuntu's archive. The keyring package's sha256 is pinned below.
#   3. A wheelhouse of the image's exact wheels (constraints.txt + constraints-image.txt + torch), cached
#      outside the clone (IMAGE_TEST_CACHE, default /var/cache/persona-qlora) between runs.
#   4. `podman build` of the Dockerfile with three build arguments changed: the base, torch's spelling
#      (PyPI's torch 2.11.0 is the cu130 build) and the wheel source (the wheelhouse instead of the indexes).
#   5. In the image, as UID 10001 with a read-only root and a tmpfs /tmp: the GPU-parity check (and that it
#      fails without the compiler), no pip, the tiny CPU job, `podman stop` mid-run -> exit 75 and a committed
#      checkpoint, a restart that resumes to exit 0.
#   6. docker-compose.yml itself under podman-compose: a CPU copy (.ci/compose_cpu.py) with moto's S3 server
#      built here in place of MinIO; it trains, is stopped (75), resumes to the end (0), and the checkpoints
#      are listed from the S3 service.
#
# If the base or the wheels cannot be fetched at all, it prints one `SKIPPED: <what>` line and exits 0. Every
# failure after that exits 1. Logs: IMAGE_TEST_LOGS (default output/image-test/).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${IMAGE_TEST_CACHE:-/var/cache/persona-qlora}
LOGS=${IMAGE_TEST_LOGS:-$ROOT/output/image-test}
ARCHIVE=${UBUNTU_ARCHIVE:-http://archive.ubuntu.com/ubuntu}
KEYRING_DEB=pool/main/u/ubuntu-keyring/ubuntu-keyring_2023.11.28.1_all.deb
KEYRING_SHA256=36de43b15853ccae0028e9a767613770c704833f82586f28eb262f0311adb8a8
PODMAN_COMPOSE=podman-compose==1.6.0
BASE=localhost/persona-base:noble
IMAGE=localhost/persona-qlora:ci
S3_IMAGE=localhost/persona-s3:moto
PROJECT=persona-qlora-ci
export CONTAINERS_CONF=$ROOT/.ci/containers.conf
mkdir -p "$CACHE" "$LOGS"
started=$(date +%s)
timings=()

note() { printf '[image-test %4ss] %s\n' "$(($(date +%s) - started))" "$*"; }
skip() {
    printf '\n%s\nSKIPPED: %s\n%s\n\n' "################################################################" "$*" \
        "################################################################"
    exit 0
}
fail() { printf '\nimage-test FAILED: %s\n' "$*" >&2; exit 1; }
timed() {   # timed NAME COMMAND...: run it, record its seconds
    local t0=$SECONDS name=$1; shift
    "$@"
    timings+=("$name $((SECONDS - t0))")
}

# ---------------------------------------------------------------- 1. tools
tools() {
    if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
        if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
            skip "podman, runc or debootstrap missing, and not root to install them"
        fi
        note "installing podman, runc, debootstrap (apt-get)"
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc debootstrap uidmap \
            slirp4netns fuse-overlayfs; } >"$LOGS/apt.log" 2>&1 || skip "podman from the Debian archive (apt-get failed, $LOGS/apt.log)"
    fi
    if [ ! -x "$CACHE/tools/bin/podman-compose" ]; then
        note "installing $PODMAN_COMPOSE"
        if ! { python3 -m venv "$CACHE/tools" && "$CACHE/tools/bin/pip" install -q "$PODMAN_COMPOSE"; } \
                >"$LOGS/pip-tools.log" 2>&1; then
            skip "$PODMAN_COMPOSE from PyPI ($LOGS/pip-tools.log)"
        fi
    fi
    note "$(podman --version), runc $(runc --version | head -1 | awk '{print $3}'), $("$CACHE/tools/bin/podman-compose" --version 2>/dev/null | grep -i 'podman-compose version' | head -1)"
}

# ---------------------------------------------------------------- 2. the base
base() {
    if podman image exists "$BASE"; then note "base $BASE: present"; return; fi
    local tmp; tmp=$(mktemp -d "$CACHE/base.XXXXXX")
    note "debootstrapping Ubuntu 24.04 minbase from $ARCHIVE"
    curl -fsS -m 120 -o "$tmp/keyring.deb" "$ARCHIVE/$KEYRING_DEB" || { rm -rf "$tmp"; skip "Ubuntu keyring from $ARCHIVE"; }
    echo "$KEYRING_SHA256  $tmp/keyring.deb" | sha256sum -c --quiet - || fail "ubuntu-keyring: sha256 differs from the pinned one"
    dpkg-deb -x "$tmp/keyring.deb" "$tmp/keyring"
    local keyring=$tmp/keyring/usr/share/keyrings/ubuntu-archive-keyring.gpg
    # Bookworm's debootstrap has no script named noble; the generic Ubuntu one (gutsy) bootstraps it.
    debootstrap --variant=minbase --keyring="$keyring" noble "$tmp/rootfs" "$ARCHIVE" \
        /usr/share/debootstrap/scripts/gutsy >"$LOGS/debootstrap.log" 2>&1 \
        || { rm -rf "$tmp"; skip "Ubuntu 24.04 base: debootstrap from $ARCHIVE failed ($LOGS/debootstrap.log)"; }
    # The official image's sources: every component (tini is in universe), updates and security.
    install -D -m 0644 "$keyring" "$tmp/rootfs/usr/share/keyrings/ubuntu-archive-keyring.gpg"
    rm -f "$tmp/rootfs/etc/apt/sources.list"
    cat >"$tmp/rootfs/etc/apt/sources.list.d/ubuntu.sources" <<SOURCES
Types: deb
URIs: $ARCHIVE
Suites: noble noble-updates noble-backports noble-security
Components: main universe restricted multiverse
Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg
SOURCES
    rm -rf "$tmp/rootfs/var/cache/apt/archives/"*.deb "$tmp/rootfs/var/lib/apt/lists/"*
    tar -C "$tmp/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null 2>&1
    rm -rf "$tmp"
    note "base $BASE: $(podman image inspect -f '{{.Size}}' "$BASE" | numfmt --to=si)B"
}

# ---------------------------------------------------------------- 3. wheels
# The torch the Dockerfile pins (its TORCH_VERSION default), and PyPI's spelling of the same build.
TORCH_PINNED=$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)
TORCH_PYPI=${TORCH_PINNED%%+*}
CUDA_PINNED=$(echo "$TORCH_PINNED" | sed -n 's/.*+cu\([0-9]*\)\([0-9]\)$/\1.\2/p')
pip_download() {   # pip_download DEST LOG REQUIREMENT-ARGS...: wheels for the image's Python 3.12 on x86-64 Linux
    local dest=$1 log=$2; shift 2
    local platforms=() y
    for y in $(seq 39 -1 5); do platforms+=(--platform "manylinux_2_${y}_x86_64"); done   # nccl: manylinux_2_18
    platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64)
    # This machine's pip configuration (local indexes, constraints for its own Python) stays out: no config
    # file (PIP_CONFIG_FILE=/dev/null), no PIP_* variables (--isolated).
    PIP_CONFIG_FILE=/dev/null "$CACHE/tools/bin/pip" --isolated download --disable-pip-version-check -q --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$dest" "$@" >"$log" 2>&1
}
wheels() {
    local constraints=$CACHE/constraints-image-ci.txt key
    { sed '/^torch==/d' constraints.txt; grep -v '^#' constraints-image.txt; echo "torch==$TORCH_PYPI"; } >"$constraints"
    key=$(cat requirements.txt requirements-gpu.txt "$constraints" | sha256sum | cut -c1-12)
    WHEELS=$CACHE/wheels-$key
    if [ ! -f "$WHEELS/.complete" ]; then
        # Reachable at all? If not, skip; if so, any failure below is the project's (a conflict, a missing pin).
        pip_download "$CACHE/probe" "$LOGS/wheels-probe.log" --no-deps "$(grep '^click==' constraints.txt)" \
            || skip "PyPI: no wheel could be downloaded ($LOGS/wheels-probe.log)"
        rm -rf "$CACHE/probe"
        note "downloading the image's wheels into $WHEELS"
        rm -rf "$WHEELS"
        pip_download "$WHEELS" "$LOGS/wheels.log" -r requirements.txt -r requirements-gpu.txt -c "$constraints" \
            || { tail -n 20 "$LOGS/wheels.log"; fail "downloading the image's wheels ($LOGS/wheels.log)"; }
        touch "$WHEELS/.complete"
        find "$CACHE" -maxdepth 1 -name 'wheels-*' ! -name "wheels-$key" ! -name 'wheels-s3-*' -exec rm -rf {} +
    fi
    key=$(cat constraints.txt | sha256sum | cut -c1-12)
    S3_WHEELS=$CACHE/wheels-s3-$key
    if [ ! -f "$S3_WHEELS/.complete" ]; then
        note "downloading moto's wheels into $S3_WHEELS"
        rm -rf "$S3_WHEELS"
        pip_download "$S3_WHEELS" "$LOGS/wheels-s3.log" 'moto[server]' -c constraints.txt -c constraints-image.txt \
            || { tail -n 20 "$LOGS/wheels-s3.log"; fail "downloading moto's wheels ($LOGS/wheels-s3.log)"; }
        touch "$S3_WHEELS/.complete"
        find "$CACHE" -maxdepth 1 -name 'wheels-s3-*' ! -name "wheels-s3-$key" -exec rm -rf {} +
    fi
    note "wheelhouse: $(find "$WHEELS" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1)"
}

# ---------------------------------------------------------------- 4. build
build() {
    note "podman build (base $BASE, torch==$TORCH_PYPI from the wheelhouse); log: $LOGS/build.log"
    local t0=$SECONDS
    podman build --format docker --network host --volume "$WHEELS:/wheels:ro" \
        --build-arg BASE_IMAGE="$BASE" --build-arg TORCH_VERSION="$TORCH_PYPI" \
        --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels \
        --tag "$IMAGE" . >"$LOGS/build.log" 2>&1 || { tail -n 40 "$LOGS/build.log"; fail "podman build of the Dockerfile"; }
    BUILD_SECONDS=$((SECONDS - t0))
    podman build --format docker --network host --volume "$S3_WHEELS:/wheels:ro" --build-arg BASE_IMAGE="$BASE" \
        --file .ci/s3.Containerfile --tag "$S3_IMAGE" .ci >"$LOGS/build-s3.log" 2>&1 \
        || { tail -n 20 "$LOGS/build-s3.log"; fail "podman build of the S3 stand-in"; }
    SIZE=$(podman image inspect -f '{{.Size}}' "$IMAGE")
    note "built $IMAGE in ${BUILD_SECONDS} s: $(numfmt --to=si "$SIZE")B ($SIZE bytes); layers:"
    podman history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | cut -c1-150 | sed 's/^/    /' | head -n 20
}

# ---------------------------------------------------------------- 5. the image as users run it
# As the image's USER (10001), a read-only root and a writable /tmp, Docker's semantics (podman's --read-only
# would add its own tmpfs mounts), no capabilities: what the Kubernetes Job asks for.
# shellcheck disable=SC2054  # the commas are tmpfs options, not array separators
LOCKED=(--read-only --read-only-tmpfs=false --tmpfs /tmp:rw,size=512m,mode=1777 --cap-drop ALL
        --security-opt no-new-privileges)
expect_exit() {   # expect_exit WANT GOT WHAT
    [ "$2" = "$1" ] || fail "$3: exit $2, expected $1"
    note "$3: exit $2 (expected $1)"
}
in_image() {
    local run=$LOGS/run
    rm -rf "$run"; mkdir -p "$run/scratch"; chown 10001:10001 "$run/scratch"
    podman volume rm -f "$PROJECT-hf" >/dev/null 2>&1 || true
    local mounts=(-v "$run/scratch:/scratch" -v "$PROJECT-hf:/cache/huggingface") rc

    note "GPU-parity check in the image (CPU): python -m job toolchain"
    set +e
    podman run --rm "${LOCKED[@]}" "${mounts[@]}" "$IMAGE" toolchain --torch "$TORCH_PINNED" --cuda "$CUDA_PINNED" \
        2>&1 | tee "$LOGS/parity.log"
    rc=${PIPESTATUS[0]}; set -e
    expect_exit 0 "$rc" "parity check"

    note "the same check with PATH holding only the venv's bin (no C compiler, as in the image before) must fail"
    set +e
    podman run --rm "${LOCKED[@]}" "${mounts[@]}" -e PATH=/opt/venv/bin --entrypoint /opt/venv/bin/python "$IMAGE" \
        -m job toolchain --torch "$TORCH_PINNED" --cuda "$CUDA_PINNED" >"$LOGS/parity-no-compiler.log" 2>&1
    rc=$?; set -e
    sed 's/^/    /' "$LOGS/parity-no-compiler.log"
    expect_exit 1 "$rc" "parity check without a compiler"
    grep -q "C compiler" "$LOGS/parity-no-compiler.log" || fail "the failing parity check does not name the C compiler"

    set +e
    podman run --rm "${LOCKED[@]}" "${mounts[@]}" --entrypoint python "$IMAGE" -m pip --version >"$LOGS/pip.log" 2>&1
    rc=$?; set -e
    if [ "$rc" = 0 ] || ! grep -q "No module named pip" "$LOGS/pip.log"; then
        fail "pip is in the runtime venv: $(cat "$LOGS/pip.log")"
    fi
    note "no pip in the image: $(tail -n 1 "$LOGS/pip.log")"

    # Bytecode for the job and the libraries it imports at every start: with PYTHONDONTWRITEBYTECODE and a read-only
    # root, a module without it is compiled from source on each start (11 s of a start on a GPU machine without it).
    podman run --rm "${LOCKED[@]}" "${mounts[@]}" --entrypoint python "$IMAGE" -c '
import importlib.util, pathlib, sys
roots = [pathlib.Path("/app/job")] + [pathlib.Path(importlib.util.find_spec(m).origin).parent
                                      for m in ("torch", "transformers", "peft", "bitsandbytes", "datasets")]
files = [p for r in roots for p in r.rglob("*.py")]
missing = [str(p) for p in files if not pathlib.Path(importlib.util.cache_from_source(str(p))).exists()]
print(f"{len(files) - len(missing)} of {len(files)} modules have bytecode; without: {missing[:5]}")
sys.exit(1 if missing else 0)' >"$LOGS/bytecode.log" 2>&1 || fail "modules without bytecode: $(cat "$LOGS/bytecode.log")"
    note "bytecode: $(cat "$LOGS/bytecode.log")"

    podman run --rm "${LOCKED[@]}" "${mounts[@]}" "$IMAGE" tiny-model /scratch/tiny >"$LOGS/tiny-model.log" 2>&1 \
        || fail "tiny-model in the image: $(tail -n 5 "$LOGS/tiny-model.log")"
    # 200 steps, not cpu.env's 20: the tiny run's 20 steps take ~2 s, and a stop that came after the run was done
    # found nothing to stop (exit 0, not 75). With 200 it lands mid-run.
    local settings=(--env-file .ci/cpu.env -e MAX_STEPS=200 -e RUN_ID=cpu-podman -e CHECKPOINT_URI=/scratch/checkpoints)
    local store=$run/scratch/checkpoints/cpu-podman

    note "train, then podman stop after the first committed checkpoint"
    podman rm -f "$PROJECT-train" >/dev/null 2>&1 || true
    podman run -d --name "$PROJECT-train" "${LOCKED[@]}" "${mounts[@]}" "${settings[@]}" "$IMAGE" train >/dev/null
    stop_after_checkpoint "$PROJECT-train"
    rc=$(podman inspect -f '{{.State.ExitCode}}' "$PROJECT-train")
    podman logs "$PROJECT-train" >"$LOGS/train-stopped.log" 2>&1; podman rm "$PROJECT-train" >/dev/null
    expect_exit 75 "$rc" "podman stop mid-run"
    local committed
    committed=$(find "$store/checkpoints" -mindepth 2 -maxdepth 2 -name MANIFEST.json 2>/dev/null | sort \
        | awk -F/ '{print $(NF-1)}' | paste -sd' ')
    [ -n "$committed" ] || fail "stopped with 75, but no committed checkpoint under $store/checkpoints"
    note "committed in the store after the stop: $committed"

    note "run again: it resumes"
    set +e
    podman run --rm "${LOCKED[@]}" "${mounts[@]}" "${settings[@]}" "$IMAGE" train >"$LOGS/train-resumed.log" 2>&1
    rc=$?; set -e
    expect_exit 0 "$rc" "restart"
    grep -o '"message": "resuming from committed checkpoint[^"]*"' "$LOGS/train-resumed.log" | head -n 1 | sed 's/^/    /' \
        | grep . || fail "the restart did not resume from the committed checkpoint"
    [ -f "$store/final/MANIFEST.json" ] || fail "no final/MANIFEST.json after the restart"
    note "final adapter committed: $store/final/MANIFEST.json"
    podman volume rm -f "$PROJECT-hf" >/dev/null
}

stop_after_checkpoint() {   # stop_after_checkpoint CONTAINER [stop command...]: SIGTERM once a checkpoint is committed
    local name=$1 i; shift
    for i in $(seq 1 600); do
        podman logs "$name" 2>&1 | grep -q '"event": "checkpoint"' && break
        [ "$(podman inspect -f '{{.State.Running}}' "$name")" = true ] \
            || fail "$name exited before its first checkpoint: $(podman logs "$name" 2>&1 | tail -n 5)"
        sleep 0.5
    done
    note "first checkpoint logged after ~$((i / 2)) s; stopping $name"
    local t0=$SECONDS
    if [ $# -gt 0 ]; then "$@" >/dev/null 2>&1; else podman stop -t 90 "$name" >/dev/null; fi
    note "stop took $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------- 6. docker-compose.yml under podman-compose
compose() {
    local derived=$LOGS/compose/docker-compose.cpu.yml
    mkdir -p "$(dirname "$derived")"
    podman run --rm -v "$ROOT:/src:ro" --entrypoint python "$IMAGE" /src/.ci/compose_cpu.py \
        /src/docker-compose.yml /src/.ci/cpu.env "$IMAGE" "$S3_IMAGE" >"$derived" || fail "deriving the CPU compose file"
    local pc=("$CACHE/tools/bin/podman-compose" -p "$PROJECT" -f "$derived")
    "${pc[@]}" down -v >/dev/null 2>&1 || true
    # podman 4.3 cannot wait for service_healthy, so the services come up one at a time, each with --no-deps.
    note "compose: up -d minio (moto's S3 server)"
    "${pc[@]}" up -d minio >"$LOGS/compose-up.log" 2>&1 || fail "compose up minio: $(tail -n 5 "$LOGS/compose-up.log")"
    "${pc[@]}" run --rm --no-deps train tiny-model /scratch/tiny >>"$LOGS/compose-up.log" 2>&1 \
        || fail "compose run train tiny-model: $(tail -n 5 "$LOGS/compose-up.log")"
    note "compose: up --no-deps createbucket"
    "${pc[@]}" up --no-deps createbucket >>"$LOGS/compose-up.log" 2>&1 || true
    local bucket rc train
    bucket=$(container_of createbucket)
    rc=$(podman wait "$bucket")
    expect_exit 0 "$rc" "compose createbucket"
    note "compose: up -d --no-deps train, then compose stop train after the first checkpoint"
    "${pc[@]}" up -d --no-deps train >>"$LOGS/compose-up.log" 2>&1 || fail "compose up train: $(tail -n 5 "$LOGS/compose-up.log")"
    train=$(container_of train)
    stop_after_checkpoint "$train" "${pc[@]}" stop train
    rc=$(podman wait "$train")
    podman logs "$train" >"$LOGS/compose-train-stopped.log" 2>&1
    expect_exit 75 "$rc" "compose stop train"
    note "compose: up -d --no-deps train again, to the end"
    "${pc[@]}" up -d --no-deps train >>"$LOGS/compose-up.log" 2>&1 || fail "compose up train (resume)"
    train=$(container_of train)
    rc=$(podman wait "$train")
    podman logs "$train" >"$LOGS/compose-train-resumed.log" 2>&1
    expect_exit 0 "$rc" "compose train resumed"
    grep -q 'resuming from committed checkpoint' "$LOGS/compose-train-resumed.log" || fail "compose: the second run did not resume"
    note "checkpoints listed from the S3 service:"
    podman run --rm --network "${PROJECT}_default" --env-file .ci/cpu.env -e RUN_ID=cpu-compose \
        -e CHECKPOINT_URI=s3://persona-checkpoints/runs -e AWS_ENDPOINT_URL_S3=http://minio:9000 \
        -e AWS_ACCESS_KEY_ID=persona-minio -e AWS_SECRET_ACCESS_KEY=persona-minio-dev-only -e AWS_DEFAULT_REGION=us-east-1 \
        -v "$ROOT/.ci/list_store.py:/list_store.py:ro" --entrypoint python "$IMAGE" /list_store.py \
        | tee "$LOGS/compose-store.txt" | sed 's/^/    /'
    if ! grep -q '^committed checkpoints: [0-9]' "$LOGS/compose-store.txt" \
            || ! grep -q '^final: committed' "$LOGS/compose-store.txt"; then
        fail "the S3 service does not hold the run's checkpoints and final adapter"
    fi
    "${pc[@]}" down -v >>"$LOGS/compose-up.log" 2>&1 || true
}

container_of() {   # the container of a compose service of this project
    podman ps -a --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -n 1
}

timed tools tools
timed base base
timed wheels wheels
timed build build
timed in-image in_image
timed compose compose
printf '\nimage-test passed in %s s: image %s (%s bytes), built in %s s\n' "$(($(date +%s) - started))" \
    "$(numfmt --to=si "$SIZE")B" "$SIZE" "$BUILD_SECONDS"
for timing in "${timings[@]}"; do
    read -r name seconds <<<"$timing"
    printf '  %-10s %5s s\n' "$name" "$seconds"
done
