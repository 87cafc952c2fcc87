"""What the backward pass recomputes when memory is short (GRADIENT_CHECKPOINTING), in three modes:

- `layers` (`true`, and what `auto` picks when memory needs it): each decoder layer keeps only its input and runs
  its whole forward again in the backward pass (torch.utils.checkpoint, non-reentrant). Least memory, a third more
  compute.
- `selective`: each decoder layer keeps the outputs of its matrix products and attention (torch's selective
  activation checkpointing: `create_selective_checkpoint_contexts` with `save_matmuls` below) and recomputes only
  the cheap elementwise work between them (norms, SiLU, products, RoPE, casts, dropout masks are kept by torch).
  No matmul or 4-bit dequantization is redone; more memory than `layers`, less than none.
- `offload`: `layers`, with each layer's kept input held in pinned host memory instead of on the GPU, as
  Unsloth's "unsloth" checkpointing does: the GPU keeps no activations between layers; a copy to the host in the
  forward pass (queued on the stream, not waited for) and back in the backward pass. (transformers' own `offload`
  of activation checkpointing wraps the checkpoint in torch's save_on_cpu, which asks for pinned memory on a CPU
  too and fails there.)

All three give the eager run's losses and gradients exactly on the CPU (tests/test_recompute.py): recomputation
reruns the same kernels on the same inputs.
"""
from __future__ import annotations

import torch

MODES = ("layers", "selective", "offload")


def mode(setting: str, on: bool) -> str:
    """The recompute mode of a GRADIENT_CHECKPOINTING setting, once `auto` has been resolved to `on`."""
    if not on:
        return ""
    return setting if setting in MODES else "layers"


# The ops whose outputs `selective` keeps: the matrix products (cuBLAS, and bitsandbytes' 4-bit GEMM where it takes
# that path) and attention (SDPA's kernels; torch's flash-attention varlen op, which the job's padding-free batches
# call). Named, so that an op a torch or bitsandbytes build lacks is simply never seen.
SAVED_OPS = frozenset({
    "aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default", "aten._scaled_mm.default",
    "bitsandbytes.gemm_4bit.default",
    "aten._scaled_dot_product_flash_attention.default", "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default", "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._flash_attention_forward.default", "aten._efficient_attention_forward.default",
    "torch_attn._varlen_attn.default", "torch_attn._varlen_attn_out.default",
})


def save_matmuls(ctx, op, *args, **kwargs):
    """Selective checkpointing's policy: keep what the matrix units and attention produced, recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    if str(op) in SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    """The context_fn of torch.utils.checkpoint for `selective`."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(save_matmuls)


def checkpoint_kwargs(recompute: str) -> dict | None:
    """TrainingArguments' gradient_checkpointing_kwargs for a mode (the Trainer enables checkpointing with them).
    `selective` and `offload` are functions, which TrainingArguments must not hold (it is written out as JSON): they
    replace the Trainer's checkpoint function on the layers at the start of training (callbacks())."""
    return {"use_reentrant": False} if recompute else None


def selective_checkpoint(function, *args, **kwargs):
    """What each decoder layer calls instead of torch.utils.checkpoint.checkpoint under `selective`."""
    from torch.utils.checkpoint import checkpoint

    kwargs.setdefault("use_reentrant", False)
    return checkpoint(function, *args, context_fn=selective_context, **kwargs)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A differentiable copy of a GPU tensor in pinned host memory, queued on the current stream."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
    return host.copy_(tensor, non_blocking=tensor.is_cuda)


def offloaded_checkpoint(function, *args, **kwargs):
    """What each decoder layer calls instead of torch.utils.checkpoint.checkpoint under `offload`: the checkpoint
    keeps the layer's tensor inputs as host copies (the GPU ones are freed once nothing else holds them) and brings
    them back for the recomputation; gradients flow back through both copies."""
    from torch.utils.checkpoint import checkpoint

    devices = [a.device if isinstance(a, torch.Tensor) else None for a in args]
    hosted = [to_host(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]

    def run(*inputs):
        return function(*[x.to(d, non_blocking=True) if d is not None and isinstance(x, torch.Tensor) else x
                          for x, d in zip(inputs, devices)])
    kwargs.setdefault("use_reentrant", False)
    return checkpoint(run, *hosted, **kwargs)


CHECKPOINT_FUNCTIONS = {"selective": "selective_checkpoint", "offload": "offloaded_checkpoint"}


def use(model, recompute: str) -> int:
    """Point every module the Trainer set up for checkpointing at this mode's function; returns how many."""
    function = globals()[CHECKPOINT_FUNCTIONS[recompute]]
    count = 0
    for module in model.modules():
        if getattr(module, "_gradient_checkpointing_func", None) is not None:
            module._gradient_checkpointing_func = function
            count += 1
    return count


def callbacks(recompute: str) -> list:
    """Trainer callbacks for a mode: `selective` and `offload` put their checkpoint function on the layers once
    the Trainer has enabled checkpointing (at the start of training, before the first forward)."""
    if recompute not in CHECKPOINT_FUNCTIONS:
        return []
    from transformers import TrainerCallback

    class Recompute(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if not use(model, recompute):
                raise RuntimeError(f"GRADIENT_CHECKPOINTING={recompute}: the model has no checkpointed layers")
    return [Recompute()]
