"""Faster code for the same computation, switched on by the plan: Liger's fused kernels, compiled decoder layers,
and bitsandbytes' optimizer step without its per-parameter waits."""
from __future__ import annotations

import contextlib
import ctypes
import inspect
import os

import torch


def apply_liger(model) -> bool:
    """Liger's Triton RMSNorm, SwiGLU and RoPE on a loaded Llama-family model. The loss keeps transformers'
    own cross-entropy: the persona tokens' output rows live in peft's trainable-tokens wrapper on lm_head,
    which Liger's fused linear cross-entropy would bypass."""
    from liger_kernel.transformers import monkey_patch

    apply = getattr(monkey_patch, f"apply_liger_kernel_to_{model.config.model_type}", None)
    if apply is None:
        return False
    kwargs = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
                  model=model)
    accepted = inspect.signature(apply).parameters
    apply(**{k: v for k, v in kwargs.items() if k in accepted})
    return True



def compile_layers(model, backend=None, recomputed: bool = False, keep_weights: bool = False) -> int:
    """torch.compile each decoder layer of the (peft-wrapped) model in place, for sequence lengths that change
    from batch to batch; returns how many. Every layer runs the same code, so one compiled graph serves them all.
    The parameters and their names are untouched: checkpoints and the adapter are the same as eager ones.
    On a GPU, inductor's kernels; on a CPU, `aot_eager` (the same captured forward and backward graphs, run by
    eager kernels), which is what the CPU tests check. `backend`: another torch.compile backend.

    `recomputed` (whole layers recomputed: GRADIENT_CHECKPOINTING true or offload): only the layer's own forward
    compiles, as each layer's `compiled_forward`, and the recomputation stays outside it, in eager code
    (recompute.py's Recomputed), which runs it without gradients in the forward pass (a graph of its own) and with
    them in the backward pass. Compiling the whole layer would trace the checkpoint into the graph as a
    higher-order op, and inductor failed on that on an H200 (AOTAutograd's partitioner: "Node add_303 was
    invalid, but is output", torch 2.11; docs/PERFORMANCE.md). Their 4-bit linears dequantize in the compiled code
    (nf4.py), not through bitsandbytes' operators: in a step bound by the host, `offload` with DOUBLE_QUANT ran 16%
    faster with that and recompute.py's prefetch than before (H100, 2026-12-06). Unrecomputed compiled layers, where
    the GPU weighs more and bitsandbytes' dequantization kernel is the faster one, keep its kernel; with
    `keep_weights` (the speed plan's, where memory allows) each weight is dequantized once for the run and
    every training pass multiplies by that copy (nf4.keep), otherwise bitsandbytes' operators dequantize it in both
    passes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        return 0
    on_gpu = next(model.parameters()).is_cuda
    if on_gpu:
        from .warm import persistent_compile_cache
        persistent_compile_cache()
    with_constant_floats()
    without_cpu_isa_probes()
    backend = backend or ("inductor" if on_gpu else "aot_eager")
    from . import nf4

    for layer in layers:
        if recomputed:
            nf4.use(layer)
        elif keep_weights:
            nf4.keep(layer)
        # (A layer class without transformers' checkpointing wrapper around its forward compiles whole.)
        if recomputed and hasattr(type(layer).forward, "__wrapped__"):
            layer.compiled_forward = _compiled_forward(type(layer), backend)
        else:
            layer.compile(dynamic=True, backend=backend)
    return len(layers)


_COMPILED_FORWARDS: dict = {}


def _compiled_forward(layer_class, backend):
    """The layer class's own forward (inside transformers' checkpointing wrapper), compiled once for every layer."""
    forward = layer_class.forward.__wrapped__
    key = (forward, backend)
    if key not in _COMPILED_FORWARDS:
        _COMPILED_FORWARDS[key] = torch.compile(forward, dynamic=True, backend=backend)
    return _COMPILED_FORWARDS[key]


def with_constant_floats() -> None:
    """Python floats in the layers' code (RMSNorm's epsilon, LoRA's dropout rate and scaling, attention's scale)
    compiled in as constants. Dynamo's default makes each a float64 CPU tensor input read back with `.item()`:
    arithmetic on those is what put CPU operations, and so inductor's C++ compiler, in a GPU layer's graph. They are
    the same in every layer and every step, so nothing recompiles for them."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.specialize_float = True


def without_cpu_isa_probes() -> None:
    """Inductor's C++ kernels, should a compiled layer's graph on a GPU hold any CPU operation, in plain scalar C++,
    without first probing the CPU's vector instruction sets. That probe compiles a test library per instruction set
    and loads each in a new Python process, once per process: on an H200 machine it was 37.5 s of the compiled run's
    56.6 s first step (py-spy, docs/PERFORMANCE.md), when the layers' floats were still CPU tensors (which
    with_constant_floats removed). Such operations are scalars, so vector code would not make them faster.
    TORCHINDUCTOR_VEC_ISA_OK set by the user wins."""
    import torch._inductor.config as inductor_config

    if "TORCHINDUCTOR_VEC_ISA_OK" not in os.environ:
        inductor_config.cpp.vec_isa_ok = False


def eager():
    """A context in which compiled layers run their eager code: evaluation and generation, whose shapes and
    no-grad mode would otherwise each cost a compile of their own."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()


def without_per_parameter_syncs(optimizer) -> None:
    """bitsandbytes' optimizers wait for the GPU (torch.cuda.synchronize) after updating each parameter, and a
    paged one once more at the end, each wait stalling the host that has to queue the next step (what they cost:
    docs/PERFORMANCE.md, "The levers"). The same updates queued on the one stream in the same order compute the
    same thing without the waits."""
    import types

    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:
        return
    if isinstance(optimizer, Optimizer8bit):
        optimizer.step = types.MethodType(torch.optim.Optimizer.profile_hook_step(_bnb_step), optimizer)


def states_on_gpu(optimizer) -> bool:
    """A paged bitsandbytes optimizer (OPTIM=paged_*) made to keep the states it has not made yet in the GPU's own
    memory, as a plain one does: the speed plan's optimizer_states_on_gpu, where the GPU holds the training without
    paging. Before the first step (the states are made then); True where it changed the optimizer. Its updates are
    the same kernels on the same values; what goes is each update's prefetch of its managed memory. A resumed run's
    states were already on the GPU: bitsandbytes' load_state_dict moves them there."""
    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:
        return False
    if not isinstance(optimizer, Optimizer8bit) or not optimizer.is_paged or optimizer.state:
        return False
    optimizer.is_paged = False
    return True


@torch.no_grad()
def _bnb_step(self, closure=None):
    # bitsandbytes 0.50's Optimizer8bit.step, less its sync_gpu calls; an AdamW's 32-bit updates by their kernel
    # called directly (_adam_32bit).
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    if not self.initialized:
        self.check_overrides()
        self.to_gpu()
        self.initialized = True
    kernel = _adam_32bit(self)
    for gindex, group in enumerate(self.param_groups):
        settings = None
        for pindex, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if len(self.state[p]) == 0:
                self.init_state(group, p, gindex, pindex)
            self.prefetch_state(p)
            if kernel is not None and _direct(p):
                before_step, after_step = settings = settings or _settings(self, group)
                state = self.state[p]
                state["step"] += 1
                g = p.grad
                kernel(ctypes.c_void_p(g.data_ptr()), ctypes.c_void_p(p.data_ptr()),
                       ctypes.c_void_p(state["state1"].data_ptr()), ctypes.c_void_p(state["state2"].data_ptr()),
                       None, *before_step, ctypes.c_int32(state["step"]), *after_step, ctypes.c_int32(g.numel()))
            else:
                self.update_step(group, p, gindex, pindex)
    return loss


def _adam_32bit(optimizer):
    """The CUDA kernel bitsandbytes' update_step reaches (through F.optimizer_update_32bit, the bitsandbytes
    operator and its CUDA implementation) for an Adam/AdamW with 32-bit states and float32 gradients, where every
    parameter takes its group's settings (no per-parameter overrides, no update-norm clipping); None elsewhere,
    or where bitsandbytes is not built for CUDA. Called directly it is the same launch with the same arguments,
    without about 20 us of Python and dispatch a parameter (bench/optim_check.py)."""
    cached = getattr(optimizer, "_job_adam_32bit", False)
    if cached is not False:
        return cached
    kernel = None
    try:
        from bitsandbytes.backends.cuda.ops import str2optimizer32bit
        from bitsandbytes.optim.optimizer import Optimizer2State

        if (isinstance(optimizer, Optimizer2State) and optimizer.optimizer_name == "adam"
                and optimizer.args.optim_bits == 32 and optimizer.args.max_unorm == 0.0
                and not optimizer.mng.index2config and not optimizer.mng.pid2config):
            kernel = str2optimizer32bit["adam"][0]
    except Exception:  # noqa: BLE001 - no CUDA build, another bitsandbytes: its own path
        kernel = None
    optimizer._job_adam_32bit = kernel
    return kernel


def _direct(p) -> bool:
    """A parameter whose update the kernel takes as update_step would give it: float32 weight, gradient and states
    (made by init_state for a 32-bit optimizer), contiguous, on the current GPU."""
    g = p.grad
    return (p.dtype == torch.float32 and g.dtype == torch.float32 and p.is_cuda and p.is_contiguous()
            and g.is_contiguous() and p.get_device() == torch.cuda.current_device())


def _settings(optimizer, group) -> tuple[tuple, tuple]:
    """update_step's scalar arguments for a group, in the kernel's order: those before the step (max_unorm and
    param_norm 0, as F.optimizer_update_32bit passes them without update-norm clipping) and those after it."""
    betas = group["betas"]
    before_step = (0.0, 0.0, betas[0], betas[1], betas[2] if len(betas) >= 3 else 0.0, group.get("alpha", 0.0),
                   group["eps"], group["weight_decay"])
    return (tuple(ctypes.c_float(x) for x in before_step),
            (ctypes.c_float(group["lr"]), ctypes.c_float(1.0), ctypes.c_bool(optimizer.args.skip_zeros)))
