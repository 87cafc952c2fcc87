"""The 4-bit base layers' matmuls in plain torch operations, for compiled recomputed layers: the NF4 weight (and,
under DOUBLE_QUANT, its 8-bit scales) dequantized by code that inductor fuses into the layer's own generated
kernels, then the same bfloat16 matmul bitsandbytes runs.

bitsandbytes computes the same numbers through its own operators, each a Python function that the compiled layer
calls back into: per linear and pass, its heuristics, a buffer, a dequantization kernel (one more for the scales
with DOUBLE_QUANT) and the matmul, for 7 linears x 32 layers x 3 passes a step. The recomputed batch-4 step is
bound by the host (docs/PERFORMANCE.md): on an H100, 448 gemm_4bit and 224 dequantize_4bit calls were 26 ms of
host time a step, profiled, and DOUBLE_QUANT added 1,100 kernel launches. Here the dequantization is a few lines
of arithmetic held by the compiled graph.

The values are bitsandbytes' own: each NF4 code's value times its block's float32 scale, rounded once to bfloat16;
the nested scales are their 8-bit code's value times the second-level scale, plus the offset, in bitsandbytes'
order. tests/test_nf4.py and tests/test_recompute.py (training to the eager run's losses and adapter bit for bit)
check that on the CPU, and bench/nf4_check.py on a GPU.

`keep` is the other trade, for unrecomputed compiled layers where memory allows (the speed plan's keep_weights):
each weight dequantized once for the whole run by bitsandbytes' kernel, and the bf16 copy (12.06 GiB for the 7B)
multiplied by every training step, forward and backward, eager or compiled. The base is frozen, so that copy is
what bitsandbytes would dequantize again at every pass, bit for bit. The memory is what dequantizing once a step
and keeping the copy for the backward pass took at the step's peak anyway (the end of the forward pass, every
layer's copy held); what goes is 224 dequantizations a step, their host time and ~15 GB of memory traffic.
(Dequantized once a step, on an H100 (2026-12-06), the batch-4 step ran 1.15x as fast as dequantizing twice and
batch 24 1.02x: docs/PERFORMANCE.md; bench/kept_check.py times one layer's linears.)"""
from __future__ import annotations

import types

import torch


def scales(state, for_backward: bool = False) -> torch.Tensor:
    """A 4-bit weight's float32 block scales: stored as they are, or (DOUBLE_QUANT) dequantized from 8 bits, in
    bitsandbytes' order: each code times its block's float32 scale, then the offset added. (`for_backward`: other
    index and product operations for the same values, dequantize's reason.)"""
    if not state.nested:
        return state.absmax
    inner = state.state2
    count = state.absmax.numel()
    blocks = -(-count // inner.blocksize)
    values = inner.code[state.absmax.int() if for_backward else state.absmax.long()]
    values = torch.nn.functional.pad(values, (0, blocks * inner.blocksize - count)).view(blocks, inner.blocksize)
    values = inner.absmax.view(blocks, 1) * values if for_backward else values * inner.absmax.view(blocks, 1)
    return values.view(-1)[:count] + state.offset


def dequantize(weight: torch.Tensor, state, dtype: torch.dtype, for_backward: bool = False) -> torch.Tensor:
    """An NF4 weight ([(n * k + 1) // 2, 1] bytes, two codes a byte, high nibble first) as an [n, k] matrix: each
    code's value times its block's float32 scale, rounded once to `dtype`. Broadcast elementwise operations only
    (no concatenation), which inductor makes one kernel of.

    `for_backward` splits the bytes with division instead of shifts, the same codes: AOTAutograd merges identical
    computations of the forward and backward graphs (CSE), and merged, their result would be kept from the forward
    pass for the backward one (a bfloat16 copy of every 4-bit weight of the layer, or a byte per code)."""
    packed = weight.view(torch.uint8).view(-1, 1)
    first = torch.arange(2, device=packed.device, dtype=torch.uint8)        # [0, 1]: high nibble, then low
    if for_backward:
        codes = (packed // (16 - 15 * first)) % 16
    else:
        codes = (packed >> (4 - 4 * first)) & 15
    values = state.code[codes.long()].view(-1, state.blocksize) * scales(state, for_backward).view(-1, 1)
    return values.to(dtype).view(state.shape)


class NF4Linear(torch.autograd.Function):
    """x @ W.T for a frozen NF4 weight W: dequantized for the product, and again for the input's gradient, never
    kept (as bitsandbytes' MatMul4Bit does)."""

    @staticmethod
    def forward(ctx, x, weight, state):
        ctx.state = state
        ctx.save_for_backward(weight)
        return torch.nn.functional.linear(x, dequantize(weight, state, x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ dequantize(weight, ctx.state, grad.dtype, for_backward=True), None, None


def _linear4bit_forward(product):
    """bitsandbytes' Linear4bit.forward for a bias-free NF4 linear, with `product(x, weight, quant_state)` in place of
    matmul_4bit where dynamo traces it; run eagerly (evaluation and generation, kernels.eager()), bitsandbytes' own
    kernels."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return type(self).forward(self, x)
        inp_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        return product(x, self.weight, self.weight.quant_state).to(inp_dtype)
    return forward


def use(module: torch.nn.Module) -> int:
    """Put NF4Linear on every bias-free NF4 Linear4bit under `module` whose rows are whole blocks (others keep
    bitsandbytes' forward), for when `module` is compiled; returns how many."""
    return _replace_forwards(module, _linear4bit_forward(NF4Linear.apply), whole_blocks=True)


def keep(module: torch.nn.Module) -> int:
    """For when `module` is compiled and memory allows: every bias-free NF4 Linear4bit under it has its weight
    dequantized now by bitsandbytes' kernel, in its compute dtype, and kept for the run (2 bytes a weight) as the
    plain attribute `dequantized`: no parameter, buffer or state-dict entry, so never in a checkpoint, the adapter
    or DDP's broadcasts. Training forwards (gradients on, eager or compiled) multiply by it; without gradients
    (evaluation, generation) bitsandbytes' own operators run as before. Returns how many."""
    import bitsandbytes.functional as bnbf

    def dequantize_once(linear) -> None:
        state = linear.weight.quant_state
        dtype = linear.compute_dtype or state.dtype
        with torch.no_grad():
            linear.dequantized = bnbf.dequantize_4bit(linear.weight, state).to(dtype)

    return _replace_forwards(module, _resident_forward, whole_blocks=False, prepare=dequantize_once)


def _resident_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Linear4bit.forward for a bias-free NF4 linear with its weight dequantized once (`keep`): the product
    bitsandbytes' training path computes (its weight dequantized, then a plain product), with that copy."""
    if not (torch.is_grad_enabled() or torch.compiler.is_compiling()):
        return type(self).forward(self, x)
    inp_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    return torch.nn.functional.linear(x, self.dequantized.to(x.dtype)).to(inp_dtype)


def _replace_forwards(module: torch.nn.Module, forward, whole_blocks: bool, prepare=None) -> int:
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    count = 0
    for linear in module.modules():
        state = getattr(getattr(linear, "weight", None), "quant_state", None)
        if not isinstance(linear, Linear4bit) or linear.bias is not None or state is None \
                or state.quant_type != "nf4" or len(state.shape) != 2 \
                or (whole_blocks and state.shape[1] % state.blocksize):
            continue
        if prepare is not None:
            prepare(linear)
        linear.forward = types.MethodType(forward, linear)
        count += 1
    return count
