"""Two checks that keep a run from failing late: on a GPU, preflight compiles and launches a Triton kernel whenever
Liger or torch.compile may run, so a missing compiler fails in seconds with one line (exit 2) instead of at the
first training step; and inside a Kubernetes pod, a local CHECKPOINT_URI that dies with the pod fails preflight.

CI has no GPU and no triton, so the GPU row is driven here with the GPU calls replaced; the real compile runs in the
image (`make image-test`: `python -m job toolchain`) and on a GPU machine (bench/toolchain_check.sh).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from conftest import JobResult
from job import pod, toolchain
from job.cli import cli
from job.config import from_env
from job.distributed import Topology
from job.checks import CheckFailed, Found, check_gpu

TRITON_NO_CC = ("Failed to find C compiler. Please specify via CC environment variable or set "
                "triton.knobs.build.impl.")   # triton 3.6, runtime/build.py


# ------------------------------------------------------------------------------------------ the GPU row

@pytest.fixture
def fake_gpu(monkeypatch):
    """An Ampere-or-newer GPU with 80 GB as far as the speed plan can tell, triton and liger-kernel installed,
    and everything in check_gpu before the toolchain row passing."""
    import job.checks as checks
    import job.speed.plan as speed

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: SimpleNamespace(total_memory=80 * 2 ** 30))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(speed, "triton_available", lambda: True)
    monkeypatch.setattr(speed, "liger_available", lambda: True)
    monkeypatch.setattr(checks, "check_machine", lambda config: "cuda")
    monkeypatch.setattr(checks, "_matmul_4bit", lambda *a: "bitsandbytes: 4-bit NF4 matmul ok")
    monkeypatch.setattr(checks, "_driver_version", lambda: "580")
    launches = []
    monkeypatch.setattr(toolchain, "_launch_triton_kernel", lambda: launches.append(1))
    return launches


def _config(**settings: str):
    return from_env({"REQUIRE_GPU": "true", **settings})


def test_triton_is_checked_whenever_liger_or_torch_compile_may_run(fake_gpu):
    assert toolchain.triton_may_run(_config())                                   # the defaults: Liger on a GPU
    assert toolchain.triton_may_run(_config(USE_LIGER_KERNEL="false"))           # auto may compile a long run
    assert toolchain.triton_may_run(_config(USE_LIGER_KERNEL="false", TORCH_COMPILE="true"))
    assert not toolchain.triton_may_run(_config(USE_LIGER_KERNEL="false", TORCH_COMPILE="false"))
    # torch.compile=auto never compiles before Ampere, nor without padding-free batches.
    assert not toolchain.triton_may_run(_config(USE_LIGER_KERNEL="false", PADDING_FREE="false"))


def test_triton_is_not_checked_where_it_is_not_installed(fake_gpu, monkeypatch):
    import job.speed.plan as speed
    monkeypatch.setattr(speed, "triton_available", lambda: False)
    assert not toolchain.triton_may_run(_config())
    assert toolchain.gpu_toolchain(_config()) == "" and fake_gpu == []


def test_the_gpu_row_launches_a_triton_kernel_with_the_default_settings(fake_gpu):
    detail = check_gpu(Found(_config(), Topology()))
    assert fake_gpu == [1]
    assert "Triton kernel compiled and launched" in detail and "Liger's kernels" in detail


def test_the_gpu_row_skips_the_kernel_when_neither_liger_nor_compile_will_run(fake_gpu):
    detail = check_gpu(Found(_config(USE_LIGER_KERNEL="false", TORCH_COMPILE="false"), Topology()))
    assert fake_gpu == [] and "Triton" not in detail


def test_a_missing_c_compiler_fails_the_gpu_row_with_one_line_naming_it(fake_gpu, monkeypatch):
    def no_compiler():
        raise RuntimeError(TRITON_NO_CC)
    monkeypatch.setattr(toolchain, "_launch_triton_kernel", no_compiler)
    with pytest.raises(CheckFailed) as failed:
        check_gpu(Found(_config(), Topology()))
    (line,) = failed.value.problems
    assert "\n" not in line
    assert "no C compiler" in line and "install gcc" in line
    assert "USE_LIGER_KERNEL=false and TORCH_COMPILE=false" in line
    assert failed.value.detail == "no C compiler"


def _early_probe(monkeypatch, script: str) -> toolchain.EarlyProbe:
    """An early probe whose process is `script` (Python) in place of `python -m job.toolchain`."""
    monkeypatch.setattr(toolchain, "EARLY_PROBE_COMMAND", [sys.executable, "-c", script])
    return toolchain.EarlyProbe()


def test_the_gpu_row_takes_the_early_probes_success_and_does_not_compile_again(fake_gpu, monkeypatch):
    probe = _early_probe(monkeypatch, "import json, os; print(json.dumps({'seconds': 1.37, "
                                      "'caches': [os.environ['TRITON_CACHE_DIR'], os.environ['TORCHINDUCTOR_CACHE_DIR']]}))")
    detail = check_gpu(Found(_config(), Topology(), early_probe=probe))
    assert fake_gpu == []   # no second probe in this process
    assert "Triton kernel compiled and launched in 1.4 s beside the imports" in detail
    assert not probe.folder.exists()   # its empty caches went with it


def test_the_early_probe_compiles_with_empty_caches_of_its_own(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "warm-triton-cache"))
    probe = _early_probe(monkeypatch, "import os, sys; print(os.environ['TRITON_CACHE_DIR'], "
                                      "os.environ['TORCHINDUCTOR_CACHE_DIR']); sys.exit(3)")
    probe.process.wait(30)
    caches = (probe.folder / "answer.json").read_text().split()
    assert all(Path(c).parent == probe.folder and not Path(c).exists() for c in caches)
    assert probe.seconds() is None   # exit 3: no answer to take


def test_a_failed_early_probe_leaves_the_verdict_to_the_rows_own_probe(fake_gpu, monkeypatch):
    # The real probe process (python -m job.toolchain) on this CPU: no CUDA, so it fails; the row probes again here.
    monkeypatch.setattr(toolchain, "EARLY_PROBE_COMMAND", [sys.executable, "-m", "job.toolchain"])
    probe = toolchain.EarlyProbe()
    assert probe.process.wait(120) != 0
    detail = check_gpu(Found(_config(), Topology(), early_probe=probe))
    assert fake_gpu == [1] and "compiled and launched in" in detail and "beside" not in detail

    def no_compiler():
        raise RuntimeError(TRITON_NO_CC)
    monkeypatch.setattr(toolchain, "_launch_triton_kernel", no_compiler)
    probe = _early_probe(monkeypatch, "import sys; sys.stderr.write('gcc: not found\\n'); sys.exit(1)")
    with pytest.raises(CheckFailed) as failed:
        check_gpu(Found(_config(), Topology(), early_probe=probe))
    assert failed.value.detail == "no C compiler"


def test_an_early_probe_that_does_not_answer_in_time_is_stopped_and_the_row_probes_itself(fake_gpu, monkeypatch):
    import time

    monkeypatch.setattr(toolchain, "EARLY_PROBE_TIMEOUT", 0.5)
    probe = _early_probe(monkeypatch, "import time; time.sleep(600)")
    started = time.monotonic()
    assert "compiled and launched in" in check_gpu(Found(_config(), Topology(), early_probe=probe))
    assert time.monotonic() - started < 10
    assert fake_gpu == [1] and probe.process.poll() is not None and not probe.folder.exists()


class FakeNvml:
    """NVML as ctypes calls it: status codes returned, answers written through the pointers given."""

    def __init__(self, modes: list[int], init: int = 0):
        self.modes, self.init, self.shut = modes, init, False

    def nvmlInit_v2(self):
        return self.init

    def nvmlShutdown(self):
        self.shut = True
        return 0

    def nvmlDeviceGetCount_v2(self, count):
        count.contents.value = len(self.modes)
        return 0

    def nvmlDeviceGetHandleByIndex_v2(self, index, handle):
        handle.contents.value = 1000 + index
        return 0

    def nvmlDeviceGetComputeMode(self, handle, mode):
        mode.contents.value = self.modes[handle.value - 1000]
        return 0


def test_the_early_probe_holds_a_cuda_context_only_where_every_gpu_is_shared():
    # nvml.h: 0 default, 1 exclusive thread (gone), 2 prohibited, 3 exclusive process
    assert toolchain.gpus_shared(FakeNvml([0])) and toolchain.gpus_shared(FakeNvml([0, 0, 0, 0]))
    for modes in ([3], [0, 3], [2], []):
        nvml = FakeNvml(modes)
        assert not toolchain.gpus_shared(nvml) and nvml.shut
    assert not toolchain.gpus_shared(FakeNvml([0], init=9))   # NVML_ERROR_DRIVER_NOT_LOADED
    import ctypes
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:   # no NVIDIA driver here (CI): NVML cannot say, so no context beside the job's
        assert not toolchain.gpus_shared()


def test_the_early_probe_starts_only_where_the_gpu_row_may_probe(monkeypatch):
    from job.speed import warm

    monkeypatch.setattr(toolchain, "EARLY_PROBE_COMMAND", [sys.executable, "-c", "pass"])
    monkeypatch.setattr(warm, "triton_installed", lambda: True)
    monkeypatch.setattr(warm, "gpu_device_files", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    single, two = Topology(), Topology(world_size=2, rank=0, local_rank=0)
    probe = toolchain.start_early_probe(_config(), single)
    assert probe is not None
    probe.stop()
    assert toolchain.start_early_probe(_config(USE_LIGER_KERNEL="false", TORCH_COMPILE="false"), single) is None
    assert toolchain.start_early_probe(_config(), two) is None   # each torchrun worker probes its own GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert toolchain.start_early_probe(_config(), single) is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(warm, "gpu_device_files", lambda: False)   # this machine: no GPU
    assert toolchain.start_early_probe(_config(), single) is None
    monkeypatch.setattr(warm, "gpu_device_files", lambda: True)
    monkeypatch.setattr(warm, "triton_installed", lambda: False)
    assert toolchain.start_early_probe(_config(), single) is None


def test_preflight_stops_an_early_probe_the_gpu_row_did_not_use(monkeypatch, tmp_path):
    # On this CPU the row has no Triton to probe; the probe started with the process must not outlive the checks.
    from job.checks import run_checks
    probe = _early_probe(monkeypatch, "import time; time.sleep(600)")
    results, _ = run_checks(_config(REQUIRE_GPU="false", BASE_MODEL=str(tmp_path / "no-model"),
                                    DATASET=str(tmp_path / "no-rows.jsonl"), CHECKPOINT_URI=str(tmp_path / "store"),
                                    OUTPUT_DIR=str(tmp_path / "out")), Topology(), early_probe=probe)
    assert {r.name: r.status for r in results}["gpu"] == "passed"
    assert probe.process.poll() is not None and not probe.folder.exists()


def test_the_probe_compiles_with_empty_caches_and_restores_them(monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", "/cache/huggingface/triton")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with toolchain._fresh_compile_caches():
        inside = os.environ["TRITON_CACHE_DIR"], os.environ["TORCHINDUCTOR_CACHE_DIR"]
        assert all(Path(p).parent.is_dir() and not Path(p).exists() for p in inside)
    assert os.environ["TRITON_CACHE_DIR"] == "/cache/huggingface/triton"
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


# ------------------------------------------------------------------------------------------ naming the piece

def test_the_compilers_own_errors_name_the_missing_piece():
    assert toolchain.explain(RuntimeError(TRITON_NO_CC))[0].startswith("no C compiler")
    assert toolchain.explain(RuntimeError("InvalidCxxCompiler: No working C++ compiler found in "
                                          "torch._inductor.config.cpp.cxx: (None, 'g++')")) == \
        ("no C++ compiler (inductor compiles CPU code with g++)", "install g++")
    failed = subprocess.CalledProcessError(1, ["gcc"])
    why, fix = toolchain.explain(failed, "/tmp/x/main.c:1:10: fatal error: Python.h: No such file or directory\n")
    assert why == "the compiler cannot find Python.h" and "libpython3.12-dev" in fix
    why, fix = toolchain.explain(failed, "/usr/bin/ld: cannot find -l:libcuda.so.1: No such file or directory\n")
    assert why == "the linker cannot find libcuda.so.1" and "NVIDIA Container Toolkit" in fix
    why, _ = toolchain.explain(AssertionError('libcuda.so cannot found!\nPlease make sure GPU is set up'))
    assert "libcuda.so.1 is not visible" in why


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_a_real_compilers_missing_header_is_named_from_what_it_printed():
    with toolchain._captured_stderr() as output:
        proc = subprocess.run(["gcc", "-x", "c", "-c", "-o", os.devnull, "-"], input=b"#include <Python.h>\n",
                              env={"PATH": os.environ["PATH"], "C_INCLUDE_PATH": ""})
    assert proc.returncode != 0
    why, fix = toolchain.explain(subprocess.CalledProcessError(proc.returncode, "gcc"), "".join(output))
    assert why == "the compiler cannot find Python.h", "".join(output)


def test_the_toolchain_command_fails_when_a_step_fails(monkeypatch):
    monkeypatch.setattr(toolchain, "parity", lambda *a: [("triton launcher", False, "no C compiler; install gcc"),
                                                        ("bitsandbytes", True, "imports")])
    out = CliRunner().invoke(cli, ["toolchain"])
    assert out.exit_code == 1
    assert "triton launcher  FAILED  no C compiler" in out.stdout and "1 of 2 steps failed" in out.stdout


def test_the_parity_check_refuses_a_torch_build_other_than_the_pinned_one():
    with pytest.raises(RuntimeError, match=r"but the image pins torch 0\.0\.0\+cu999"):
        toolchain._parity_torch("0.0.0+cu999", None)
    with pytest.raises(RuntimeError, match="but the image pins CUDA 99.9"):
        toolchain._parity_torch(None, "99.9")


# ------------------------------------------------------------------------------------------ pods

ROOT_OVERLAY = "1 0 0:50 / / rw,relatime - overlay overlay rw,lowerdir=/var/lib/containerd/a"
EMPTY_DIR = "2 1 8:1 /var/lib/kubelet/pods/0a/volumes/kubernetes.io~empty-dir/scratch /scratch rw - ext4 /dev/sda1 rw"
PVC = "3 1 8:16 / /checkpoints rw - ext4 /dev/sdb rw"
SHM = "4 1 0:60 / /dev/shm rw - tmpfs shm rw"
SPACED = r"5 1 8:32 / /mnt/my\040volume rw - ext4 /dev/sdc rw"


@pytest.fixture
def mountinfo(tmp_path):
    path = tmp_path / "mountinfo"
    path.write_text("\n".join([ROOT_OVERLAY, EMPTY_DIR, PVC, SHM, SPACED]) + "\n")
    return path


IN_POD = {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}


@pytest.mark.parametrize("uri,lost", [
    ("/scratch/checkpoints", "on an emptyDir volume (/scratch)"),
    ("/data/checkpoints", "on the container's own root filesystem"),
    ("/dev/shm/ckpt", "on a memory-backed tmpfs (/dev/shm)"),
    ("/checkpoints", None),
    ("/checkpoints/runs", None),
    ("/mnt/my volume/runs", None),
    ("s3://bucket/runs", None),
])
def test_in_a_pod_a_local_store_must_be_on_a_volume_that_outlives_it(mountinfo, uri, lost):
    line = pod.local_checkpoints_problem(uri, False, IN_POD, mountinfo)
    if lost is None:
        assert line is None
    else:
        assert lost in line and f"CHECKPOINT_URI={uri}" in line and "ALLOW_POD_LOCAL_CHECKPOINTS=true" in line


def test_outside_a_pod_or_when_meant_a_local_store_is_fine(mountinfo):
    assert pod.local_checkpoints_problem("/data/checkpoints", False, {}, mountinfo) is None
    assert pod.local_checkpoints_problem("/data/checkpoints", True, IN_POD, mountinfo) is None


def _preflight(env: dict[str, str]) -> JobResult:
    cleared = {k: None for k in os.environ if k not in env}
    out = CliRunner().invoke(cli, ["preflight"], env={**cleared, **env}, catch_exceptions=False)
    return JobResult(out.exit_code, out.stdout, out.stderr)


def test_preflight_in_a_pod_refuses_checkpoints_on_the_pods_own_disk(cpu_job, tmp_path, monkeypatch):
    # The store's folder as the pod sees it: on the container's root filesystem.
    (tmp_path / "mountinfo").write_text(ROOT_OVERLAY + "\n")
    monkeypatch.setattr(pod, "MOUNTINFO", tmp_path / "mountinfo")
    result = _preflight(cpu_job(**IN_POD))
    assert result.returncode == 2
    rows = {e["check"]: e for e in result.events("preflight")}
    assert rows["checkpoint store"]["status"] == "failed"
    assert all(e["status"] != "failed" for name, e in rows.items() if name != "checkpoint store")
    (line,) = [line for line in result.stderr.splitlines() if "CHECKPOINT_URI" in line]
    assert "Kubernetes pod" in line and "ALLOW_POD_LOCAL_CHECKPOINTS=true" in line
    assert not (tmp_path / "store").exists(), "nothing written to a store that would be lost"

    meant = _preflight(cpu_job(**IN_POD, ALLOW_POD_LOCAL_CHECKPOINTS="true"))
    assert meant.returncode == 0, meant.stderr
