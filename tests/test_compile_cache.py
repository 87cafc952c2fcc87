"""The portable compile cache (job/speed/compile_cache.py): a later process on the same machine kind skips the compile."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from job.speed.compile_cache import CompileCache, cache_key, graph_shape
from job.config import from_env
from job.speed.plan import plan
from job.store import open_store

ROOT = Path(__file__).resolve().parent.parent
LLAMA_7B = SimpleNamespace(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)

# One process of a run: a compiled layer (inductor, on the CPU here) behind the job's CompileCache in a local store,
# compiled as job.speed.kernels.compile_layers compiles. (With inductor's CPU ISA probes, ~8 s of test builds in each
# process, the cache's 1-1.5 s saving drowned under CI load: 13.67 s warm against 13.47 s cold, 2026-12-06.)
PROCESS = r"""
import json, sys, time, torch
from torch._dynamo.utils import counters
from job.speed.compile_cache import CompileCache
from job.speed.kernels import without_cpu_isa_probes
from job.store import open_store

without_cpu_isa_probes()   # as compile_layers does: inductor's probe builds take seconds of C++ in every process
cache = CompileCache(open_store(sys.argv[1]), "cpu-test")
found = cache.find() is not None
loaded = cache.load()["loaded"] if found else False
class Layer(torch.nn.Module):   # defined here: dynamo leaves torch's own modules' frames alone
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        return x + self.down(torch.nn.functional.silu(self.up(x)))

torch.manual_seed(0)
layer = Layer()
layer.compile(dynamic=True, backend="inductor")
started = time.perf_counter()
layer(torch.randn(2, 7, 16, requires_grad=True)).sum().backward()
seconds = time.perf_counter() - started
cache.save(seconds, background=False)
print(json.dumps({"found": found, "loaded": loaded, "seconds": seconds,
                  "counters": {k: dict(v) for k, v in counters.items() if k in ("inductor", "aot_autograd")}}))
"""


def run_process(store: Path, inductor_dir: Path) -> dict:
    env = {"PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), "OMP_NUM_THREADS": "1",
           "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", PROCESS, str(store)], env=env, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_with_an_empty_local_cache_loads_the_stored_artifacts_and_compiles_nothing(tmp_path):
    first = run_process(tmp_path / "store", tmp_path / "inductor-1")
    assert not first["found"] and not first["loaded"]
    assert first["counters"]["inductor"].get("fxgraph_cache_miss", 0) >= 1            # compiled afresh
    meta = json.loads((tmp_path / "store" / "compile-cache" / "cpu-test" / "meta.json").read_text())
    assert meta["bytes"] > 0 and meta["cold_first_step_seconds"] > 0

    second = run_process(tmp_path / "store", tmp_path / "inductor-2")    # another machine: nothing local
    assert second["found"] and second["loaded"]
    assert second["counters"]["inductor"].get("fxgraph_cache_miss", 0) == 0, second
    assert second["counters"]["inductor"].get("fxgraph_cache_hit", 0) >= 1
    assert second["counters"]["aot_autograd"].get("autograd_cache_hit", 0) >= 1
    assert second["seconds"] < first["seconds"]
    meta = json.loads((tmp_path / "store" / "compile-cache" / "cpu-test" / "meta.json").read_text())
    assert meta["warm_first_step_seconds"] == round(second["seconds"], 2)   # what `auto` weighs next time


def test_the_cache_is_keyed_by_gpu_torch_job_code_and_what_is_compiled():
    shape = graph_shape(from_env({}), LLAMA_7B)
    key = cache_key("NVIDIA H200", "2.11.0+cu130", "abc", shape)
    assert key == cache_key("NVIDIA H200", "2.11.0+cu130", "abc", dict(shape))
    assert key.startswith("nvidia-h200_torch-2.11.0-cu130_")
    others = {cache_key("NVIDIA H100 80GB HBM3", "2.11.0+cu130", "abc", shape),
              cache_key("NVIDIA H200", "2.13.0+cu130", "abc", shape),
              cache_key("NVIDIA H200", "2.11.0+cu130", "abd", shape),
              cache_key("NVIDIA H200", "2.11.0+cu130", "abc", graph_shape(from_env({"LORA_R": "16"}), LLAMA_7B)),
              cache_key("NVIDIA H200", "2.11.0+cu130", "abc",
                        graph_shape(from_env({"PER_DEVICE_TRAIN_BATCH_SIZE": "24"}), LLAMA_7B))}
    assert key not in others and len(others) == 5


def test_a_cache_without_a_warm_measurement_leaves_auto_as_it_was(tmp_path):
    cache = CompileCache(open_store(str(tmp_path)), "k")
    assert cache.find() is None and cache.warm_compile_seconds() is None


def test_auto_compiles_only_the_runs_whose_steps_repay_the_first_step_it_weighs_and_says_why(monkeypatch):
    import job.speed.plan
    from job.speed.plan import CACHED_COMPILE_SECONDS, COMPILE_SAVING_PER_STEP, COMPILE_SECONDS

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=141 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))
    monkeypatch.setattr(job.speed.plan, "triton_available", lambda: True)
    monkeypatch.setattr(job.speed.plan, "liger_available", lambda: True)
    config = from_env({})
    assert plan(config, "cuda", LLAMA_7B, steps=250).torch_compile            # the seed's run repays a cold compile
    assert not plan(config, "cuda", LLAMA_7B, steps=150).torch_compile        # a shorter one does not
    # This key's cache measured by an earlier run: its own first step is weighed.
    warm = plan(config, "cuda", LLAMA_7B, steps=150, compile_seconds=6.0)
    assert warm.torch_compile and "6 s first step with the compile cache" in " ".join(warm.reasons)
    slow = plan(config, "cuda", LLAMA_7B, steps=250, compile_seconds=60.0)   # a cache that barely helps
    assert not slow.torch_compile and "compile cache" in " ".join(slow.reasons)
    # A cache stored but not measured for this key yet: weighed at the measured warm first step (4.9-6.5 s on H200s
    # against 9.9-13.0 s cold), with a margin: a 150-step run compiles on it, a 100-step one does not.
    assert CACHED_COMPILE_SECONDS == 8.0
    unmeasured = plan(config, "cuda", LLAMA_7B, steps=150, cache_unmeasured=True)
    assert unmeasured.torch_compile and "not measured here yet" in " ".join(unmeasured.reasons)
    assert not plan(config, "cuda", LLAMA_7B, steps=100, cache_unmeasured=True).torch_compile
    # Whatever it weighs, auto compiles exactly the runs whose steps repay it.
    for kwargs, cost in (({}, COMPILE_SECONDS), ({"cache_unmeasured": True}, CACHED_COMPILE_SECONDS),
                         ({"compile_seconds": 30.0}, 30.0), ({"compile_seconds": 30.0, "cache_unmeasured": True}, 30.0)):
        for steps in (100, 115, 116, 217, 218, 434, 435, 5000):
            compiles = plan(config, "cuda", LLAMA_7B, steps=steps, **kwargs).torch_compile
            assert compiles == (steps * COMPILE_SAVING_PER_STEP >= cost), (kwargs, steps)
    assert not plan(from_env({"TORCH_COMPILE": "false"}), "cuda", LLAMA_7B, steps=5000,
                    cache_unmeasured=True).torch_compile


def test_the_cache_keys_hashes_of_torch_and_triton_are_computed_in_a_thread_started_before_the_model_loads(
        monkeypatch):
    # Both computed once a process and cached where the first compiled step looks them up: the thread computes them
    # (as torch and Triton name them), and a failure there is left to the compile, which computes them itself.
    import sys
    import threading
    import types

    import torch._inductor.codecache as codecache

    from job.speed.compile_cache import prefetch_keys

    calls = []

    def recorder(name, fails=False):
        def key():
            calls.append((name, threading.current_thread().name))
            if fails:
                raise RuntimeError("no key")
            return name
        return key

    triton = types.ModuleType("triton.runtime.cache")
    triton.triton_key = recorder("triton", fails=True)
    monkeypatch.setitem(sys.modules, "triton.runtime.cache", triton)
    monkeypatch.setattr(codecache, "torch_key", recorder("torch"))
    thread = prefetch_keys()
    thread.join(10)
    assert not thread.is_alive() and thread.daemon
    assert calls == [("torch", "compile-cache-keys"), ("triton", "compile-cache-keys")]
    # Run.setup starts it where the run compiles on a GPU, before the model loads
    import inspect

    from job.run import Run
    setup = inspect.getsource(Run.setup)
    assert setup.index("compile_cache.prefetch_keys()") < setup.index("load_base_model(self.config")
