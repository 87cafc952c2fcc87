"""A CUDA stand-in on a CPU, only for `python bench/unsloth_bench.py --cpu-check`: Unsloth (UNSLOTH_ALLOW_CPU=1)
keeps its CUDA branches on a CPU torch, so its loader asks for device properties and puts buffers on "cuda". This
answers those questions with a 16 GB Ampere-like card and puts the tensors on the CPU. No kernel of Unsloth runs:
the check covers the import, the loader, the patching and the plumbing, not the numerics or the speed."""
from __future__ import annotations

import os

import torch
from torch.overrides import TorchFunctionMode


def _cpu(device):
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    return "cpu" if device is not None and str(device).startswith("cuda") else device


class _OnCPU(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        name = getattr(func, "__name__", "")
        if name == "to" and len(args) > 1 and isinstance(args[1], (str, int, torch.device)):
            args = (args[0], _cpu(args[1]), *args[2:])
        if name == "cuda":
            return args[0]
        return func(*args, **kwargs)


class _Properties:
    name, total_memory, major, minor, multi_processor_count = "CPU stand-in", 16 * 2**30, 8, 0, 1


def install() -> None:
    os.environ["UNSLOTH_ALLOW_CPU"] = "1"
    _OnCPU().__enter__()
    torch.cuda.get_device_properties = lambda *a, **k: _Properties()
    torch.cuda.mem_get_info = lambda *a, **k: (15 * 2**30, 16 * 2**30)
    for name in ("max_memory_reserved", "max_memory_allocated", "memory_allocated", "memory_reserved"):
        setattr(torch.cuda, name, lambda *a, **k: 0)
    torch.cuda.empty_cache = lambda *a, **k: None
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_device_capability = lambda *a, **k: (8, 0)
    torch.cuda.current_device = lambda: 0
