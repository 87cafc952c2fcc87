"""Compiling while the run starts: the decoder layers' cold compile (8.2 s of an H100 run's first step,
docs/PERFORMANCE.md) done by a helper process while the run loads its model and trains its first steps eagerly.

The helper (`python -m job.speed.warm`) starts with the run's preflight checks, on one GPU, when the run may
compile. While they run it imports what it needs and writes a one-layer model of the base's shape (CPU and disk
only); once they have passed (never before: bad input costs no GPU time) it loads that model in 4 bits on the GPU
with the run's adapter and the speed plan the run takes when it compiles, and runs one compiled training step of
it. That fills inductor's and AOTAutograd's caches on disk (TORCHINDUCTOR_CACHE_DIR, the run's own) with the
graphs every decoder layer compiles to: one layer's graphs are every layer's (kernels.compile_layers). The run's
layers run eagerly until the helper is done, then compile from those caches, as a run with the portable compile
cache does (compile_cache.py).

The helper's imports take seconds, and the sooner it has them the sooner it is done: `start_early` starts it as
`python -m job train` starts, before the run's own imports, wherever a cheap look says the run may compile here (a
GPU's device files, Triton installed, one process, TORCH_COMPILE not false); the run keeps it only if `may_compile`
agrees once torch is imported, and stops it otherwise.

It is a speed lever and nothing more: the helper writes nothing but caches and the scratch folder the run gives it
(and removes, however the helper ends), and where it fails, or the run does not compile with the plan it compiled
for, or a stored compile cache was loaded, or the run has no training left, the run goes on as without it (a cold
compile, or none). Where the plan recomputes activations to fit the GPU's memory, the helper does not run: the
memory its one-layer model and step would take is the training's.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import child_environment

# The steps the helper's plan assumes: a run long enough for `auto` to compile.
LONG_RUN = 10 ** 6
REPORT = "compile-warmup.json"
LOG = "compile-warmup.log"


def may_compile(config, topology) -> bool:
    """Whether this run may compile its layers on this machine, judged before the checks and the plan: one process
    on a GPU with Triton, TORCH_COMPILE not false, and for `auto`, MAX_STEPS (when set) enough to repay a cold
    compile."""
    from .plan import COMPILE_SAVING_PER_STEP, COMPILE_SECONDS

    if not _settings_may_compile(config, topology):
        return False
    if config.torch_compile == "auto" and 0 < config.max_steps < COMPILE_SECONDS / COMPILE_SAVING_PER_STEP:
        return False
    import torch

    return torch.cuda.is_available()


def may_start_early(config, topology) -> bool:
    """`may_compile`'s cheap half, before torch is imported: TORCH_COMPILE not false, one process, Triton installed,
    and an NVIDIA GPU's device file visible (as the NVIDIA container runtime mounts them) with CUDA_VISIBLE_DEVICES
    not hiding it."""
    return _settings_may_compile(config, topology) and gpu_visible()


def _settings_may_compile(config, topology) -> bool:
    """TORCH_COMPILE not false, one process, Triton installed: what both looks ask first (no torch import)."""
    return config.torch_compile != "false" and topology.world_size == 1 and triton_installed()


def triton_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def gpu_visible() -> bool:
    """A cheap look, before torch is imported: an NVIDIA GPU's device file (as the NVIDIA container runtime mounts
    them), with CUDA_VISIBLE_DEVICES not hiding it."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return False
    return gpu_device_files()


def gpu_device_files() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*"))


def start_early(config, topology) -> "Warmup | None":
    """The helper, started before the run imports torch, where `may_start_early`; None elsewhere, or where it cannot
    start (OUTPUT_DIR not writable: the checks say so)."""
    if not may_start_early(config, topology):
        return None
    try:
        return Warmup(config, Path(config.output_dir) / "work")
    except OSError:
        return None


def persistent_compile_cache() -> None:
    """Inductor's caches beside the Hub cache (a volume in compose and the Kubernetes Job), in the environment,
    for this process and the ones it starts (the helper): by default they go under /tmp, lost with the container,
    where a restarted or resumed run would not find them and compile again. Set by `python -m job` before torch is
    imported: importing torch._inductor's config sets TORCHINDUCTOR_CACHE_DIR to that /tmp default itself (torch
    2.11), after which this finds it set and leaves it (so until 2026-12-07 the job's caches went to /tmp)."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from huggingface_hub import constants
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(constants.HF_HOME) / "torch-compile")


def compiled_plan(config, device: str, model_shape):
    """The plan the helper compiles for: the run's, were it long enough to compile."""
    from .plan import plan

    return plan(config, device, model_shape, LONG_RUN)


def same_graphs(plan, other) -> bool:
    """Whether two plans compile the same layers (every choice but the reasons)."""
    return dataclasses.replace(plan, reasons=()) == dataclasses.replace(other, reasons=())


class Warmup:
    """The helper process, seen from the run: started with the checks, told to go once they pass, and stopped
    when the run no longer needs it (or ends)."""

    def __init__(self, config, folder: Path, device: str = "cuda"):
        persistent_compile_cache()   # the helper fills the run's own on-disk caches: the environment says where
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        # Its one-layer model (about 0.9 GB for Llama-2-7B's shape), removed here however the helper ends.
        self.scratch = Path(tempfile.mkdtemp(prefix="compile-warmup-"))
        self.report_path = folder / REPORT
        self.report_path.unlink(missing_ok=True)
        self.started = time.time()
        self.went: float | None = None
        with open(folder / LOG, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "job.speed.warm"], stdin=subprocess.PIPE,
                                            stdout=log, stderr=subprocess.STDOUT, env=child_environment())
        # The settings travel through the pipe, not the command line or a file: they hold the run's tokens.
        self._send(pickle.dumps({"config": config, "device": device, "report": str(self.report_path),
                                 "scratch": str(self.scratch)}))

    def _send(self, data: bytes) -> None:
        try:
            self.process.stdin.write(data)
            self.process.stdin.flush()
        except OSError:   # it exited already: `outcome` says why
            pass

    def go(self) -> None:
        """The checks passed: build and compile."""
        self.went = time.time()
        self._send(b"go\n")
        self._close_stdin()

    def _close_stdin(self) -> None:
        try:
            self.process.stdin.close()
        except OSError:
            pass

    def done(self) -> bool:
        if self.process.poll() is None:
            return False
        shutil.rmtree(self.scratch, ignore_errors=True)
        return True

    def stop(self) -> None:
        """End the helper, whatever it is doing (its caches are written whole or not at all)."""
        self._close_stdin()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def outcome(self) -> dict:
        """What the helper did, once done: its report, or why there is none."""
        try:
            return json.loads(self.report_path.read_text())
        except (OSError, ValueError):
            tail = (self.folder / LOG).read_bytes()[-400:].decode(errors="replace").strip().splitlines()
            return {"compiled": False, "why": f"exit {self.process.returncode}: {tail[-1] if tail else 'no output'}"}


class EagerUntilWarm:
    """A Trainer callback: the compiled layers run eagerly from the first step until the helper is done (checked
    at each step's start), then compile, from its caches if it compiled. `on_compiled(step)` once then;
    `compiling` from then on."""

    def __init__(self, ready, on_compiled):
        from transformers import TrainerCallback

        hold = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                hold.check(state.global_step + 1)

            def on_step_begin(self, args, state, control, **kwargs):
                hold.check(state.global_step + 1)

            def on_train_end(self, args, state, control, **kwargs):
                hold.release()

        self.ready, self.on_compiled = ready, on_compiled
        self.eager = False
        self.compiling = False
        self.callback = _Callback()

    def check(self, step: int) -> None:
        import torch

        if self.compiling:
            return
        if not self.ready():
            if not self.eager:
                torch.compiler.set_stance("force_eager")
                self.eager = True
            return
        self.release()
        self.on_compiled(step)

    def release(self) -> None:
        import torch

        if self.eager:
            torch.compiler.set_stance("default")
            self.eager = False
        self.compiling = True


# ---------------------------------------------------------------- the helper process

def _examples(config, vocab_size: int) -> list[dict]:
    """One micro-batch of persona-length rows of random tokens, each of another length (as the data's are: equal
    sizes would compile into graphs of their own)."""
    rng = random.Random(0)
    lengths = rng.sample(range(180, min(config.max_seq_length, 520)), config.per_device_train_batch_size)
    rows = []
    for length in lengths:
        ids = [rng.randrange(3, vocab_size) for _ in range(length)]
        reply = length // 3
        rows.append({"input_ids": ids, "labels": [-100] * (length - reply) + ids[-reply:]})
    return rows


def one_layer_model(config, shape, device: str, scratch: Path):
    """A one-layer model of the base's shape, stored as the base is (so that it loads as the base does), and the
    run's tokenizer, written to `scratch`: the settings that load it, and its shape. Its weights are one constant:
    the graphs compile from shapes alone, and made on the CPU without random initialization (over 10 s on an H100's
    host for the 7B's layer and embeddings) it is ready in about a second, before the checks have passed.
    `shape`: the base's (`base_shape`)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from ..model import load_tokenizer, stored_dtype

    one_layer = dataclasses.replace(config, base_model=str(scratch / "model"), output_dir=str(scratch / "out"))
    shape = copy.deepcopy(shape)
    shape.num_hidden_layers = 1
    stored = stored_dtype(shape) or (torch.bfloat16 if device == "cuda" else torch.float32)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape, dtype=stored)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(0.01)   # finite, and the same in every block: 4-bit quantization of it is too
    model.save_pretrained(one_layer.base_model)
    load_tokenizer(config).save_pretrained(one_layer.base_model)
    return one_layer, shape


def prepare(config, device: str, scratch: Path):
    """The one-layer model, made while the run checks its inputs (no GPU): the base's shape (`base_shape`, which the
    step's plan needs too: one read of the base's config.json, a request to the Hub for a Hub model) and
    `one_layer_model`'s result; None where it failed (the step tries again after `go`, and its report says why)."""
    from ..model import base_shape

    try:
        base = base_shape(config)
        return (base, *one_layer_model(config, base, device, scratch))
    except Exception:  # noqa: BLE001 - only a head start
        return None


def warm(config, device: str, scratch: Path, prepared=None) -> dict:
    """One compiled training step of the one-layer model on `device`, with the plan of the run were it to compile.
    `prepared`: what `prepare` made (the base's shape and the one-layer model), or None to make them now."""
    import torch

    from ..log import Reporter
    from ..model import base_shape
    from ..run import Run

    base = prepared[0] if prepared else base_shape(config)
    plan = compiled_plan(config, device, base)
    if not plan.torch_compile:
        return {"compiled": False, "why": "the plan does not compile"}
    if plan.gradient_checkpointing and device == "cuda":
        return {"compiled": False, "why": "the GPU's memory is the training's (it recomputes to fit)"}
    started = time.time()
    one_layer, shape = prepared[1:] if prepared else one_layer_model(config, base, device, scratch)

    class OneStep(Run):
        """Run.setup on the one-layer model and one micro-batch: the run's plan, model, adapter, compiled layers and
        Trainer, without its store, data, evaluation or callbacks."""

        def examples(self):
            return _examples(config, shape.vocab_size), []

        def resume_point(self):
            return None

        def compile_cache(self):
            return None

        def speed_plan(self):
            return plan

        def arguments(self):
            return dataclasses.replace(super().arguments(), max_steps=1, save_strategy="no", logging_strategy="no")

        def callbacks(self):
            return []

    run = OneStep(one_layer, Reporter("json", secrets=config.secrets()))
    run.device, run.model_shape = device, shape
    run.setup()
    built = time.time()
    run.trainer.train()
    peak = torch.cuda.max_memory_reserved() / 2 ** 30 if device == "cuda" else None
    return {"compiled": True, "model_made_before_go": prepared is not None, "build_seconds": round(built - started, 2),
            "step_seconds": round(time.time() - built, 2), "peak_gib": peak and round(peak, 2),
            "compile_seconds": _compile_seconds(), "plan": plan.describe()}


def _compile_seconds() -> dict[str, float]:
    """Where the compile's time went: Dynamo's own timers (tracing, AOTAutograd, inductor, Triton), summed."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return {}
    return {name: round(sum(times), 3) for name, times in compilation_time_metrics.items()}


def preload() -> None:
    """What the step needs imported while the run checks its inputs (seconds of imports, none on the GPU): the
    Trainer, peft, bitsandbytes, Dynamo and inductor. (The base's model class: `prepare`, which makes the model.)"""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch._dynamo  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401

    from .. import run, trainer  # noqa: F401


def main() -> int:
    spec = pickle.load(sys.stdin.buffer)
    config, device, scratch = spec["config"], spec["device"], Path(spec["scratch"])
    preload()
    prepared = prepare(config, device, scratch)
    if sys.stdin.buffer.readline().strip() != b"go":
        return 0   # the checks failed, or the run ended: nothing to do (the run removes the scratch folder)
    went = time.time()
    report = warm(config, device, scratch, prepared)
    report["seconds_after_go"] = round(time.time() - went, 2)
    Path(spec["report"]).write_text(json.dumps(report))
    # Done: the run waits for this process's exit, which need not tear down the interpreter first (seconds).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
