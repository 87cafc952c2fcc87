"""torch.compile's portable caches in the checkpoint store: a resumed or later run on the same kind of GPU loads
the compiled layers' artifacts (torch.compiler.save_cache_artifacts: AOTAutograd's, inductor's and triton's caches
in one blob) instead of compiling from scratch.

One cache per key: the GPU's name, torch's version, the job's code and the shape of what is compiled (the base
model's dimensions, the adapter, the speed plan, the micro-batch). It lives beside the runs, at the store's root:

    {CHECKPOINT_URI}/compile-cache/{key}/artifacts.bin    the blob torch.compiler.load_cache_artifacts takes
    {CHECKPOINT_URI}/compile-cache/{key}/meta.json        what it is, and the first steps' seconds it was seen to
                                                          cost: cold (it was made) and warm (it was loaded)

`TORCH_COMPILE=auto` weighs a compile against the steps it saves (plan.py); with a cache it weighs the warm first
step this key has been measured at, or, before any run has measured it, the warm first step measured on the GPU
benchmark (plan.CACHED_COMPILE_SECONDS). The cache skips inductor's code generation and Triton's autotuning, not
Dynamo's tracing or AOTAutograd: on H200s it took the first step from 9.9-13.0 s to 4.9-6.5 s. A cache that fails
to load or to save costs the run nothing but the compile: it is reported and training goes on.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "compile-cache/"
ARTIFACTS = "artifacts.bin"
META = "meta.json"
JOB_DIR = Path(__file__).resolve().parent.parent


def job_code_version() -> str:
    """A hash of the job's Python sources: compiled graphs follow the code that builds them."""
    h = hashlib.sha256()
    for path in sorted(JOB_DIR.rglob("*.py")):
        h.update(path.relative_to(JOB_DIR).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def cache_key(gpu: str, torch_version: str, job_version: str, shape: dict[str, Any]) -> str:
    """A store-safe key: readable parts first, then a hash of all of them."""
    slug = "".join(c if c.isalnum() else "-" for c in gpu.lower()).strip("-")
    whole = json.dumps({"gpu": gpu, "torch": torch_version, "job": job_version, "shape": shape}, sort_keys=True)
    return f"{slug}_torch-{torch_version.replace('+', '-')}_{hashlib.sha256(whole.encode()).hexdigest()[:16]}"


def graph_shape(config, model_config) -> dict[str, Any]:
    """What decides the compiled graphs besides the code and the GPU: the base's dimensions, the adapter, the
    micro-batch and the speed settings (which the GPU and these resolve the same way every time)."""
    dims = {k: getattr(model_config, k, None) for k in ("model_type", "hidden_size", "intermediate_size",
                                                         "num_hidden_layers", "num_attention_heads",
                                                         "num_key_value_heads", "vocab_size")}
    return {**dims, "compute_dtype": config.compute_dtype, "lora": [config.lora_r, config.lora_alpha,
            config.lora_dropout, config.lora_target_modules], "batch": config.per_device_train_batch_size,
            "max_seq_length": config.max_seq_length, "padding_free": config.padding_free,
            "liger": config.use_liger_kernel, "gradient_checkpointing": config.gradient_checkpointing,
            "tf32": config.tf32, "double_quant": config.double_quant}


@dataclass
class CompileCache:
    """The compile cache of one key in a checkpoint store (job.store.blob.CheckpointStore)."""
    store: Any
    key: str
    meta: dict[str, Any] = field(default_factory=dict)
    loaded: bool = False
    _saver: threading.Thread | None = None

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{self.key}/"

    def find(self) -> dict[str, Any] | None:
        """The cache's metadata if one is stored for this key (cheap: the blob is not read)."""
        raw = self.store.get_bytes(self.prefix + META)
        self.meta = json.loads(raw) if raw else {}
        return self.meta or None

    def warm_compile_seconds(self) -> float | None:
        """The first step's seconds measured with this cache loaded, else None (not measured yet)."""
        return self.meta.get("warm_first_step_seconds")

    def load(self) -> dict[str, Any]:
        """Hot-load the stored artifacts into this process's compile caches, before the first compiled step."""
        import torch

        blob = self.store.get_bytes(self.prefix + ARTIFACTS)
        if blob is None:
            return {"loaded": False, "why": "no artifacts stored"}
        info = torch.compiler.load_cache_artifacts(blob)
        self.loaded = True
        kinds = {k: len(v) for k, v in (getattr(info, "artifacts", None) or {}).items()}
        return {"loaded": True, "bytes": len(blob), "artifacts": kinds}

    def save(self, first_step_seconds: float, background: bool = True) -> None:
        """After the first compiled step: store this process's artifacts (when it compiled afresh) and the first
        step's seconds, cold or warm. The blob is serialized here and written from a thread (once a run)."""
        import torch

        kind = "warm_first_step_seconds" if self.loaded else "cold_first_step_seconds"
        meta = {**self.meta, kind: round(first_step_seconds, 2), "key": self.key, "updated_at": time.time()}
        artifacts = None if self.loaded else torch.compiler.save_cache_artifacts()

        def write() -> None:
            if artifacts is not None:
                self.store.put_bytes(self.prefix + ARTIFACTS, artifacts[0])
                meta["bytes"] = len(artifacts[0])
            self.store.put_bytes(self.prefix + META, json.dumps(meta, indent=1).encode())
            self.meta = meta

        if background:
            self._saver = threading.Thread(target=write, name="compile-cache-writer", daemon=True)
            self._saver.start()
        else:
            write()

    def wait(self, timeout: float | None = None) -> None:
        if self._saver is not None:
            self._saver.join(timeout)


def prefetch_keys() -> threading.Thread:
    """The keys inductor's and AOTAutograd's caches are looked up by start with hashes of the installed torch and
    Triton (their source files, and Triton's library), computed once a process and cached: 0.55 s of the first
    compiled step of an H100 run (py-spy, docs/PERFORMANCE.md), found or not in the caches. Computed here in a
    thread, started as the model loads (torch's copies leave the interpreter free), the step finds them done (it
    waits for torch's under its lock, or computes Triton's again if asked first: the same value)."""
    def compute() -> None:
        try:
            from torch._inductor.codecache import torch_key
            torch_key()
        except Exception:  # noqa: BLE001 - only a head start: the compile computes what is missing
            pass
        try:
            from triton.runtime.cache import triton_key
            triton_key()
        except Exception:  # noqa: BLE001
            pass

    thread = threading.Thread(target=compute, name="compile-cache-keys", daemon=True)
    thread.start()
    return thread


def for_run(config, store, model_config, gpu: str) -> CompileCache:
    """The cache this run's compiled layers would use: this GPU, torch, job code and graph shape."""
    import torch

    return CompileCache(store, cache_key(gpu, torch.__version__, job_code_version(), graph_shape(config, model_config)))


def lookup(config, store, device: str, model_config) -> CompileCache | None:
    """This run's compile cache, its metadata read if one is stored; None off the GPU (the CPU compiles with
    aot_eager, which leaves nothing to cache) or if the store cannot be read (the run compiles as without one).
    `model_config`: the base model's transformers config (preflight's model shape)."""
    if device != "cuda":
        return None
    import torch

    cache = for_run(config, store, model_config, torch.cuda.get_device_name(0))
    try:
        cache.find()
    except Exception:  # noqa: BLE001 - a cache is an optimization; the store's own errors surface elsewhere
        return None
    return cache


class FirstStepTimer:
    """A Trainer callback: the seconds of the first optimizer step this process runs compiled (the one that
    compiles: the first, or the first once `compiled()` says so), then `on_first_step(seconds)` once."""

    def __init__(self, on_first_step, compiled=lambda: True):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if timer.started is None and compiled():
                    timer.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if timer.started is not None and not timer.done:
                    timer.done = True
                    on_first_step(time.perf_counter() - timer.started)

        self.started: float | None = None
        self.done = False
        self.callback = _Callback()


def attach(cache: CompileCache | None, reporter, is_main: bool, compiled=lambda: True) -> list:
    """For a run whose layers compile: load the cache's artifacts if it has some, and return the Trainer callbacks
    that store them (rank 0) with the first compiled step's seconds once that step has compiled. `compiled()`: the
    layers run compiled from this step on (not while warm.py's helper keeps them eager)."""
    if cache is None:
        return []
    if cache.meta.get("bytes"):
        try:
            found = cache.load()
        except Exception as exc:  # noqa: BLE001 - a broken cache costs a cold compile, nothing more
            found = {"loaded": False, "why": f"{type(exc).__name__}: {exc}"}
        reporter.event("speed", "compile cache " + ("loaded" if found["loaded"] else "not loaded"), key=cache.key,
                       **found)
    if not is_main:
        return []

    def store(seconds: float) -> None:
        try:
            cache.save(seconds)
        except Exception as exc:  # noqa: BLE001
            reporter.event("speed", f"compile cache not saved: {type(exc).__name__}: {exc}", key=cache.key)
            return
        reporter.event("speed", "compile cache " + ("measured" if cache.loaded else "saved"), key=cache.key,
                       first_step_seconds=round(seconds, 2))
    return [FirstStepTimer(store, compiled).callback]
