"""What the backward pass recomputes when memory is short (GRADIENT_CHECKPOINTING), in three modes:

- `layers` (`true`, and what `auto` picks when memory needs it): each decoder layer keeps only its input and runs
  its whole forward again in the backward pass. Least memory, a third more compute.
- `selective`: only each layer's attention block (its q/k/v/o projections with their LoRA, RoPE and attention) keeps
  just its input and runs again in the backward pass; the MLP keeps its activations. With LoRA on the attention
  projections (the default q_proj,v_proj) that block holds most of what a layer keeps (the LoRA dropout's inputs
  and masks, the rotated q and k, v, attention's output) for a third of the layer's matmul work, so it is the part
  worth recomputing. Only that block's Python runs twice, not the whole layer's (the batch-4 step is bound by the
  host, docs/PERFORMANCE.md).
- `offload`: `layers`, with each layer's kept input in pinned host memory instead of on the GPU, as Unsloth's
  "unsloth" checkpointing does: the GPU keeps no activations between layers. The copy out runs on a stream of its
  own once the layer's input is ready, the copy back is queued before the layer's recomputation; neither makes the
  host wait for the GPU, and the gradients never leave the GPU.

Whole layers (`layers`, `offload`) run their forward pass without gradients, as Unsloth's checkpoint and a
reentrant torch.utils.checkpoint do (Recomputed): nothing but the layer's input is kept, and no saved-tensor hook
runs for what the layer would have saved. torch.utils.checkpoint's non-reentrant form, which `selective` uses, runs
the forward with gradients and passes every tensor the layer saves through a Python hook: in a compiled layer that
multiplied AOTAutograd's host time per call by four or five, in a step the host bounds (H200 profile,
docs/PERFORMANCE.md).

All three give the eager run's losses and gradients exactly on the CPU (tests/test_recompute.py): recomputation
reruns the same kernels on the same inputs, with the same dropout masks (the RNG state is restored for it).
"""
from __future__ import annotations

import contextlib
import functools
import weakref

import torch

MODES = ("layers", "selective", "offload")


def mode(setting: str, on: bool) -> str:
    """The recompute mode of a GRADIENT_CHECKPOINTING setting, once `auto` has been resolved to `on`."""
    if not on:
        return ""
    return setting if setting in MODES else "layers"


def checkpoint_kwargs(recompute: str) -> dict | None:
    """TrainingArguments' gradient_checkpointing_kwargs for a mode (the Trainer enables checkpointing with them).
    `selective` and `offload` are functions, which TrainingArguments must not hold (it is written out as JSON): they
    take over the layers at the start of training (callbacks())."""
    return {"use_reentrant": False} if recompute else None


def _checkpoint(function, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint

    kwargs.setdefault("use_reentrant", False)
    return checkpoint(function, *args, **kwargs)


# ---------------------------------------------------------------- selective

def layer_as_is(function, *args, **kwargs):
    """A decoder layer's checkpoint function under `selective`: the layer runs once, as without recomputation; its
    attention block is the part that recomputes (recompute_attention)."""
    return function(*args, **kwargs)


def recompute_attention(attention: torch.nn.Module) -> None:
    """Make an attention block keep only its input and run again in the backward pass, whenever it runs with
    gradients in training mode (not in evaluation or generation). Once per module."""
    if getattr(attention, "recomputed_in_backward", False):
        return
    forward = attention.forward

    def recomputed(*args, **kwargs):
        if attention.training and torch.is_grad_enabled():
            return _checkpoint(forward, *args, **kwargs)
        return forward(*args, **kwargs)

    attention.forward = recomputed
    attention.recomputed_in_backward = True


# ---------------------------------------------------------------- offload

_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device):
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


class HostCopy:
    """A recomputed layer's input in host memory (to_host), and, once asked for, its copy back on the device."""
    __slots__ = ("device", "host", "copied", "back", "arrived", "taken", "__weakref__")

    def __init__(self, device: torch.device, host: torch.Tensor, copied):
        self.device, self.host, self.copied = device, host, copied
        self.back, self.arrived, self.taken = None, None, False


# Per device, the inputs Recomputed packed to the host, in the order the forward passes made them (weakly: a graph
# freed without its backward pass takes its own with it). The backward pass recomputes the layers in the opposite
# order, so the newest one not yet taken back is the next one it needs (prefetch, which also empties this stack).
# offloaded_checkpoint's inputs are not in it: nothing there prefetches, so nothing would take them out.
_ON_HOST: dict[torch.device, list] = {}


def to_host(tensor: torch.Tensor) -> HostCopy:
    """A recomputed layer's input, packed into host memory (Recomputed under `offload`; saved_tensors_hooks' pack in
    offloaded_checkpoint). On a GPU: a pinned buffer, filled on the copy stream once the compute stream has produced
    the tensor; the GPU tensor's memory is not reused before that copy has read it (record_stream), and nothing
    waits on the host. On a CPU: a copy, so that the tests take the same path."""
    tensor = tensor.detach()
    if not tensor.is_cuda:
        return HostCopy(tensor.device, tensor.clone(), None)
    compute, stream = torch.cuda.current_stream(tensor.device), _copy_stream(tensor.device)
    stream.wait_stream(compute)
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    with torch.cuda.stream(stream):
        host.copy_(tensor, non_blocking=True)
    tensor.record_stream(stream)
    return HostCopy(tensor.device, host, stream.record_event())


def _awaited(packed: HostCopy) -> HostCopy:
    """A packed input that the backward pass will prefetch in its turn."""
    _ON_HOST.setdefault(packed.device, []).append(weakref.ref(packed))
    return packed


def _copy_back(packed: HostCopy) -> None:
    """Queue the copy of a packed input back to its device on the copy stream, behind its copy out. The destination
    comes from the compute stream's memory, so the copy first waits for what the compute stream has queued (that
    memory may still be read there); the compute stream waits for the copy (`arrived`) only where it uses it."""
    if packed.copied is None:
        packed.back = packed.host
        return
    compute, stream = torch.cuda.current_stream(packed.device), _copy_stream(packed.device)
    packed.back = torch.empty(packed.host.shape, dtype=packed.host.dtype, device=packed.device)
    stream.wait_stream(compute)
    with torch.cuda.stream(stream):
        packed.back.copy_(packed.host, non_blocking=True)
    packed.arrived = stream.record_event()


def prefetch(device: torch.device) -> None:
    """Start copying back the input the backward pass will recompute next: the newest packed one not yet taken,
    while the layer after it is recomputed (Unsloth's checkpoint prefetches the same way)."""
    stack = _ON_HOST.get(device, [])
    while stack:
        packed = stack[-1]()
        if packed is None or packed.taken:
            stack.pop()
            continue
        if packed.back is None:
            _copy_back(packed)
        return


def to_device(packed: HostCopy) -> torch.Tensor:
    """The saved input back where it was (to_host's inverse), for the recomputation: prefetched where prefetch()
    started it, else copied now; on a GPU the compute stream waits for the copy (a wait on the GPU, not on the
    host)."""
    if packed.back is None:
        _copy_back(packed)
    if packed.arrived is not None:
        torch.cuda.current_stream(packed.device).wait_event(packed.arrived)
    back, packed.back, packed.arrived, packed.taken = packed.back, None, None, True
    return back


def offloaded_checkpoint(function, *args, **kwargs):
    """What each decoder layer calls instead of torch.utils.checkpoint.checkpoint under `offload`: whole-layer
    checkpointing whose saved inputs (the layer's input) are packed to host memory. Only the checkpoint's own inputs
    pass through these hooks: what the layer saves inside goes to the checkpoint's hooks, which recompute it."""
    with torch.autograd.graph.saved_tensors_hooks(to_host, to_device):
        return _checkpoint(function, *args, **kwargs)


# ---------------------------------------------------------------- whole layers, forward without gradients

def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def _rng_restored(state: tuple, device: torch.device):
    """The RNG as the forward pass found it (the same dropout masks), and as it was again afterwards."""
    cpu, gpu = state
    with torch.random.fork_rng(devices=[device] if gpu is not None else [], device_type="cuda"):
        torch.set_rng_state(cpu)
        if gpu is not None:
            torch.cuda.set_rng_state(gpu, device)
        yield


def _autocast_state(device: torch.device) -> list[dict]:
    """The autocast the forward pass ran under (the Trainer's mixed precision), which the backward pass is not in."""
    return [dict(device_type=kind, enabled=torch.is_autocast_enabled(kind), dtype=torch.get_autocast_dtype(kind),
                 cache_enabled=torch.is_autocast_cache_enabled())
            for kind in dict.fromkeys((device.type, "cpu"))]


class Recomputed(torch.autograd.Function):
    """A whole layer recomputed: its forward runs without gradients, keeping only its inputs (in host memory when
    `offload`) and the RNG and autocast states; the backward pass runs it again with gradients from those and
    returns the gradients of its inputs and of the layer's trainable parameters. The parameters are inputs of this
    function, so that its output needs a gradient even where the layer's input does not (the first layer's), and
    their gradients reach them as anyone's do (DDP's hooks included)."""

    @staticmethod
    def forward(ctx, run, offload: bool, count: int, *tensors):
        inputs = tensors[:count]
        ctx.run, ctx.offload, ctx.params = run, offload, tensors[count:]
        ctx.device = inputs[0].device
        ctx.rng, ctx.autocast = _rng_state(ctx.device), _autocast_state(ctx.device)
        outputs = run(*inputs)
        if offload:
            ctx.packed = [_awaited(to_host(x)) for x in inputs]
        else:
            ctx.save_for_backward(*inputs)
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        if ctx.offload:
            inputs = [to_device(p) for p in ctx.packed]
            prefetch(ctx.device)   # the next layer's input comes back while this one is recomputed
        else:
            inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        inputs = [x.detach().requires_grad_(need) for x, need in zip(inputs, needs)]
        with _rng_restored(ctx.rng, ctx.device), torch.enable_grad(), contextlib.ExitStack() as stack:
            for state in ctx.autocast:
                stack.enter_context(torch.autocast(**state))
            outputs = ctx.run(*inputs)
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
        wanted = [t for t, need in zip((*inputs, *ctx.params), needs) if need]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        return (None, None, None, *(next(grads) if need else None for need in needs))


def _trainable(layer) -> tuple:
    if not hasattr(layer, "_recomputed_params"):
        layer._recomputed_params = tuple(p for p in layer.parameters() if p.requires_grad)
    return layer._recomputed_params


def whole_layer(offload: bool = False):
    """A decoder layer's checkpoint function for `layers` (or `offload`): the layer through Recomputed, its compiled
    forward (kernels.compile_layers with `recomputed`) in place of its eager one where it has one. transformers
    calls it with partial(forward, layer, **kwargs) and the layer's positional inputs. Inputs it cannot take
    (anything but tensors, or a keyword tensor that needs a gradient) go through torch.utils.checkpoint instead."""
    def recompute(function, *args):
        layer = function.args[0] if function.args else None
        compiled_forward = getattr(layer, "compiled_forward", None)
        if compiled_forward is not None and function.func is getattr(compiled_forward, "__wrapped__", None):
            function = functools.partial(compiled_forward, *function.args, **function.keywords)
        if layer is None or not args or not all(isinstance(a, torch.Tensor) for a in args) or any(
                isinstance(v, torch.Tensor) and v.requires_grad for v in function.keywords.values()):
            if offload:
                return offloaded_checkpoint(function, *args)
            return _checkpoint(function, *args)
        return Recomputed.apply(function, offload, len(args), *args, *_trainable(layer))
    return recompute


# ---------------------------------------------------------------- putting a mode on the model

def use(model, recompute: str) -> int:
    """Put this mode on every decoder layer the Trainer set up for checkpointing; returns how many layers."""
    count = 0
    for module in model.modules():
        if getattr(module, "_gradient_checkpointing_func", None) is None:
            continue
        if recompute in ("layers", "offload"):
            module._gradient_checkpointing_func = whole_layer(offload=recompute == "offload")
            count += 1
        elif recompute == "selective" and isinstance(getattr(module, "self_attn", None), torch.nn.Module):
            recompute_attention(module.self_attn)
            module._gradient_checkpointing_func = layer_as_is
            count += 1
    return count


def callbacks(recompute: str) -> list:
    """Trainer callbacks for a mode: each takes over the layers once the Trainer has enabled checkpointing (at the
    start of training, before the first forward); layers compiled for recomputation are found as they run."""
    if recompute not in MODES:
        return []
    from transformers import TrainerCallback

    class Recompute(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if not use(model, recompute):
                raise RuntimeError(f"GRADIENT_CHECKPOINTING={recompute}: the model has no checkpointed layers")
    return [Recompute()]
