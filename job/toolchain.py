"""The compilers the job needs at run time, and checks that they work before any model is loaded.

Triton builds each kernel's launcher when the kernel first runs: C source, compiled with $CC, else gcc, else clang
(Triton's own rule), against Python.h, then loaded. Liger's kernels (on by default on a GPU when installed) and
torch.compile's inductor on a GPU both go through it, and inductor's CPU code is C++. Without a compiler a run passes
every other check, loads the model, and dies at its first training step.

- `gpu_toolchain`: preflight's gpu row, whenever Liger or torch.compile may run on this GPU. A tiny Triton kernel is
  compiled and launched with empty caches (so that it really compiles); ToolchainMissing has one line naming the
  missing piece. `EarlyProbe` runs the same probe in a process of its own, started with the job's process, so that
  its compiles run beside the imports and the other checks.
- `parity`: `python -m job toolchain`, the image's own check on a CPU (CI has no GPU). It goes as far towards the
  GPU path as a CPU can: Triton's real launcher compiled and loaded, a Triton kernel compiled to a GPU binary,
  inductor compiling CPU code, Liger and bitsandbytes importing, and the torch build the image pins.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from . import child_environment

# What to set to train without Triton, for every failure line of the GPU row.
WITHOUT_TRITON = "or set USE_LIGER_KERNEL=false and TORCH_COMPILE=false to train without Triton's kernels (slower)"
# The headers a compile may miss, and what brings them (Ubuntu's package names, the image's base).
HEADERS = {"Python.h": "Python's headers (libpython3.12-dev)", "cuda.h": "Triton's bundled CUDA headers (reinstall "
           "triton)"}
LIBC_HEADERS = "the C library's headers (libc6-dev)"
# The GPU architecture the parity check compiles its Triton kernel for on a CPU (H100/H200); any would do.
PARITY_TARGET = ("cuda", 90, 32)
# The early probe's process, and how long the GPU row waits for its answer before it probes in its own process.
EARLY_PROBE_COMMAND = [sys.executable, "-m", "job.toolchain"]
EARLY_PROBE_TIMEOUT = 120


class ToolchainMissing(Exception):
    """A compile the job needs failed. `line`: one actionable line; `detail`: the table's short text."""

    def __init__(self, line: str, detail: str):
        super().__init__(line)
        self.line, self.detail = line, detail


# ---------------------------------------------------------------- preflight: the GPU row

def triton_may_run(config, world_size: int = 1) -> bool:
    """Will Liger's kernels or torch.compile run on this GPU? TORCH_COMPILE=auto counts when the run could be long
    enough to compile (preflight does not know the steps left yet). Needs a visible CUDA GPU."""
    from .speed.plan import plan, triton_available

    if not triton_available():
        return False
    now = plan(config, "cuda", None, world_size=world_size)
    longest = plan(config, "cuda", None, steps=sys.maxsize, world_size=world_size)
    return now.liger_kernel or now.torch_compile or longest.torch_compile


def gpu_toolchain(config, world_size: int = 1, early: "EarlyProbe | None" = None) -> str:
    """Preflight: compile and launch a tiny Triton kernel on the current GPU when Liger or torch.compile may run.
    Returns the row's extra text ("" when Triton will not run); raises ToolchainMissing. `early`: the probe started
    with the process; its success is the row's, and anything else probes here, whose failure is the row's line."""
    if not triton_may_run(config, world_size):
        return ""
    users = _triton_users(config)
    seconds = early.seconds() if early is not None else None
    if seconds is not None:
        return f", Triton kernel compiled and launched in {seconds:.1f} s beside the imports (for {users})"
    started = time.monotonic()
    try:
        with _fresh_compile_caches(), _captured_stderr() as compiler_output:
            _launch_triton_kernel()
    except Exception as exc:
        why, fix = explain(exc, "".join(compiler_output))
        raise ToolchainMissing(f"{users} need Triton, which cannot compile a kernel here: {why}; {fix}, "
                               f"{WITHOUT_TRITON}", why.split(" (")[0]) from None
    return f", Triton kernel compiled and launched in {time.monotonic() - started:.1f} s (for {users})"


class EarlyProbe:
    """The GPU row's Triton probe (`python -m job.toolchain`) in a process of its own, started as the job's process
    starts: its two C compiles of Triton's (1.3-1.5 s on an H100 host) then run beside the process's imports and
    other checks instead of inside the GPU row. Its empty caches are a folder of its own, removed with it. It only
    saves time: the row takes its success, and on anything else (a failed compile, a GPU in an exclusive compute
    mode, where it declines to hold a context beside the job's, no answer within EARLY_PROBE_TIMEOUT) probes in the
    job's own process as before."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="job-toolchain-"))
        env = child_environment(TRITON_CACHE_DIR=str(self.folder / "triton"),
                                TORCHINDUCTOR_CACHE_DIR=str(self.folder / "inductor"))
        # Its compiler output is not kept: a failure is probed again in the job's process, whose line names it.
        with open(self.folder / "answer.json", "wb") as answer:
            self.process = subprocess.Popen(EARLY_PROBE_COMMAND, stdin=subprocess.DEVNULL, stdout=answer,
                                            stderr=subprocess.DEVNULL, env=env)
        atexit.register(self.stop)

    def seconds(self, timeout: float | None = None) -> float | None:
        """Once it is done: what its compile and launch took; None where it did not succeed (or did not answer within
        `timeout`, by default EARLY_PROBE_TIMEOUT)."""
        try:
            self.process.wait(EARLY_PROBE_TIMEOUT if timeout is None else timeout)
            answer = json.loads((self.folder / "answer.json").read_text()) if self.process.returncode == 0 else {}
        except (subprocess.TimeoutExpired, OSError, ValueError):
            answer = {}
        self.stop()
        seconds = answer.get("seconds") if isinstance(answer, dict) else None
        return float(seconds) if isinstance(seconds, (int, float)) else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def start_early_probe(config, topology) -> EarlyProbe | None:
    """The early probe, where a cheap look (no torch import) says the GPU row will probe: Liger or torch.compile
    not switched off, one process, Triton installed, a GPU visible (job/speed/warm.py's look)."""
    from .speed.warm import gpu_visible, triton_installed

    if config.use_liger_kernel == "false" and config.torch_compile == "false":
        return None
    if topology.world_size != 1 or not triton_installed() or not gpu_visible():
        return None
    try:
        return EarlyProbe()
    except OSError:
        return None


def _early_probe_main() -> int:
    """The early probe's process: after its imports and CUDA's start (which the GPU row's own probe finds done), the
    kernel compiled and launched; its time, or the error, as JSON on stdout.
    It holds a CUDA context of its own while the job's process starts: only where every GPU lets a second process
    hold one (on a GPU in an exclusive compute mode, the job's own context could fail while the probe's lives)."""
    if not gpus_shared():
        print(json.dumps({"error": "a GPU is not in the default compute mode, or NVML cannot say"}))
        return 1
    import torch
    import triton  # noqa: F401

    torch.cuda.init()
    started = time.monotonic()
    try:
        _launch_triton_kernel()
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps({"seconds": round(time.monotonic() - started, 2)}))
    return 0


def _triton_users(config) -> str:
    names = []
    if config.use_liger_kernel != "false":
        names.append("Liger's kernels (USE_LIGER_KERNEL)")
    if config.torch_compile != "false":
        names.append("torch.compile (TORCH_COMPILE)")
    return " and ".join(names) or "Triton's kernels"


def _add_one_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1, mask=mask)

    return add_one


def _launch_triton_kernel() -> None:
    import torch

    x = torch.arange(8, dtype=torch.float32, device="cuda")
    _add_one_kernel()[(1,)](x, 8, BLOCK=8)
    torch.cuda.synchronize()
    if not torch.equal(x.cpu(), torch.arange(8, dtype=torch.float32) + 1):
        raise RuntimeError("the kernel ran but computed a wrong result")


# ---------------------------------------------------------------- naming what is missing

def explain(exc: BaseException, compiler_output: str = "") -> tuple[str, str]:
    """(what is missing, how to fix it) for a failed compile: Triton's and inductor's errors, and the compiler's own
    lines (which Triton lets through to stderr)."""
    text = f"{type(exc).__name__}: {exc}\n{compiler_output}"
    if "Failed to find C compiler" in text:
        return (f"no C compiler (Triton looks for $CC, gcc, clang; PATH={os.environ.get('PATH', '')})",
                "install gcc and libc6-dev, or set CC")
    if "InvalidCxxCompiler" in text or "No working C++ compiler" in text:
        return "no C++ compiler (inductor compiles CPU code with g++)", "install g++"
    header = re.search(r"fatal error: ([\w./-]+): No such file or directory", text)
    if header:
        name = header.group(1)
        what = HEADERS.get(os.path.basename(name), LIBC_HEADERS)
        return f"the compiler cannot find {name}", f"install {what}"
    library = re.search(r"cannot find -l:?([\w.+-]+)", text)
    if library:
        return f"the linker cannot find {library.group(1)}", _library_fix(library.group(1))
    if re.search(r"libcuda\.so\S* cannot", text) or "Failed to open libcuda" in text:
        return "the NVIDIA driver's libcuda.so.1 is not visible", _library_fix("libcuda.so.1")
    if re.search(r"cannot find (crt1|crti|crtn)\.o", text):
        return "the C runtime's start files are missing", "install libc6-dev"
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename} is missing", "install it, or the package that brings it"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return first[:200], "see the compiler's output above"


def _library_fix(name: str) -> str:
    if name.startswith("libcuda") or name == "cuda":
        return ("run with the NVIDIA Container Toolkit (docker --gpus all, the NVIDIA device plugin), so that the "
                "driver's libcuda.so.1 is mounted and in ldconfig's cache")
    return "install the library's development package"


@contextlib.contextmanager
def _fresh_compile_caches() -> Iterator[None]:
    """Triton's and inductor's caches in a new temporary folder for the duration: a probe that found its kernel in a
    cache built earlier (by an image with a compiler, say) would prove nothing."""
    keys = ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")
    saved = {key: os.environ.get(key) for key in keys}
    with tempfile.TemporaryDirectory(prefix="job-toolchain-") as folder:
        for key in keys:
            os.environ[key] = os.path.join(folder, key.lower())
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """What is written to file descriptor 2 meanwhile (a compiler's errors), returned in the list at the end."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buffer:
        os.dup2(buffer.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            buffer.seek(0)
            out.append(buffer.read().decode(errors="replace"))


# ---------------------------------------------------------------- the image's parity check (CPU)

def parity(torch_version: str | None = None, cuda: str | None = None) -> list[tuple[str, bool, str]]:
    """Each step of the GPU path that a CPU can run: (name, passed, detail)."""
    steps: list[tuple[str, Callable[[], str]]] = [
        ("triton launcher", _parity_launcher),
        ("triton kernel", _parity_kernel),
        ("inductor (CPU)", _parity_inductor),
        ("liger-kernel", _parity_liger),
        ("bitsandbytes", _parity_bitsandbytes),
        ("torch build", lambda: _parity_torch(torch_version, cuda)),
    ]
    results = []
    for name, step in steps:
        started = time.monotonic()
        try:
            with _fresh_compile_caches(), _captured_stderr() as compiler_output:
                detail = step()
        except Exception as exc:
            why, fix = explain(exc, "".join(compiler_output))
            results.append((name, False, f"{why}; {fix}"))
        else:
            results.append((name, True, f"{detail} ({time.monotonic() - started:.1f} s)"))
    return results


def _parity_launcher() -> str:
    """Triton's own CUDA launcher source for a small kernel signature, compiled and loaded as Triton does at a
    kernel's first launch. Its libcuda calls are bound lazily, so it loads without a driver."""
    from triton.backends.nvidia import driver
    from triton.runtime.build import compile_module_from_src

    source = driver.make_launcher({}, {0: "*fp32", 1: "i32"}, None)
    flags = sys.getdlopenflags()
    sys.setdlopenflags(os.RTLD_LAZY)
    try:
        module = compile_module_from_src(source, "__triton_launcher", include_dirs=driver.include_dirs)
    finally:
        sys.setdlopenflags(flags)
    if not callable(getattr(module, "launch", None)):
        raise RuntimeError("the compiled launcher has no launch()")
    return f"compiled with {_c_compiler()} against Python.h and loaded"


def _parity_kernel() -> str:
    """A Triton kernel compiled to a GPU binary (LLVM, then ptxas) for a fixed target: no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _add_one_kernel()
    source = ASTSource(kernel, {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, constexprs={"BLOCK": 8})
    compiled = triton.compile(source, target=GPUTarget(*PARITY_TARGET))
    binary = compiled.asm.get("cubin", b"")
    if not binary:
        raise RuntimeError("triton.compile produced no cubin")
    return f"compiled to a {len(binary):,}-byte cubin for sm_{PARITY_TARGET[1]}"


def _parity_inductor() -> str:
    import torch

    def f(x):
        return torch.nn.functional.silu(x) * x.sin() + 1

    x = torch.randn(64, 32)
    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    got = compiled(x)
    torch.testing.assert_close(got, f(x))
    from torch._inductor import config
    return f"compiled a CPU function with {config.cpp.cxx[-1] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx}"


def _parity_liger() -> str:
    import importlib.metadata

    import liger_kernel.transformers  # noqa: F401  (imports triton and every kernel module the job patches in)
    return f"liger-kernel {importlib.metadata.version('liger-kernel')} imports"


def _parity_bitsandbytes() -> str:
    import bitsandbytes
    return f"bitsandbytes {bitsandbytes.__version__} imports"


def _parity_torch(torch_version: str | None, cuda: str | None) -> str:
    import torch

    found = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    if torch_version and torch.__version__ != torch_version:
        raise RuntimeError(f"{found}, but the image pins torch {torch_version}")
    if cuda and torch.version.cuda != cuda:
        raise RuntimeError(f"{found}, but the image pins CUDA {cuda}")
    import triton
    return f"{found}, triton {triton.__version__}"


def _c_compiler() -> str:
    import shutil
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang") or "?"


def render(results: list[tuple[str, bool, str]]) -> str:
    width = max(len(name) for name, _, _ in results)
    lines = [f"{name:<{width}}  {'ok' if passed else 'FAILED':<6}  {detail}" for name, passed, detail in results]
    failed = sum(not passed for _, passed, _ in results)
    lines.append(f"toolchain check: {failed} of {len(results)} steps failed" if failed else
                 f"toolchain check: all {len(results)} steps passed")
    return "\n".join(lines)


NVML_COMPUTEMODE_DEFAULT = 0   # nvml.h: several processes may hold a context on the GPU


def gpus_shared(nvml=None) -> bool:
    """Whether every GPU that NVML sees is in the default compute mode, where a process may hold a CUDA context
    beside another's; False wherever NVML cannot say. Asked through NVML (the driver's library, which the NVIDIA
    container runtime mounts), so that no CUDA context is made to ask. `nvml`: the loaded library, for tests."""
    import ctypes

    try:
        nvml = nvml or ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return False
    except (OSError, AttributeError):
        return False
    try:
        count = ctypes.c_uint(0)
        if nvml.nvmlDeviceGetCount_v2(ctypes.pointer(count)) != 0 or count.value == 0:
            return False
        for index in range(count.value):
            handle, mode = ctypes.c_void_p(), ctypes.c_int(-1)
            if (nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.pointer(handle)) != 0
                    or nvml.nvmlDeviceGetComputeMode(handle, ctypes.pointer(mode)) != 0
                    or mode.value != NVML_COMPUTEMODE_DEFAULT):
                return False
        return True
    except AttributeError:
        return False
    finally:
        nvml.nvmlShutdown()


if __name__ == "__main__":
    sys.exit(_early_probe_main())
