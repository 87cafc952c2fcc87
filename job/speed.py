"""How fast the job trains on a GPU: padding-free batches, fused kernels, TF32 for the fp32 LoRA matmuls,
compiled decoder layers, and whether to recompute activations, each decided from the device (the GPU's memory,
the run's length) unless the user sets it.

Everything here is off on the CPU: there the tests hold the job to bit-exact resume and exact reload logits,
and none of these levers exist or pay. docs/PERFORMANCE.md has the measurements behind each default.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import Config

# The attention implementation registered with transformers for padding-free batches (see below).
PADDING_FREE_ATTENTION = "sdpa_padding_free"

# Activation memory kept for the backward pass, in bytes per token per decoder layer per unit of hidden size:
# measured on Llama-2-7B's shape in bf16 without recomputation (docs/PERFORMANCE.md), about 42 unfused and 35
# with Liger's RMSNorm and SwiGLU, which keep no fp32 or intermediate copies; with a margin.
_ACTIVATION_BYTES = {False: 48, True: 40}
# Share of the GPU's memory the estimate may fill before recomputation is switched on.
_MEMORY_HEADROOM = 0.8
# torch.compile of the decoder layers: what the first step pays once (compiling with an empty cache) and what
# every later step saves, for Llama-2-7B at batch 4 on an H100 (docs/PERFORMANCE.md). `auto` compiles when the
# run's remaining steps repay the compile.
COMPILE_SECONDS = 75.0
COMPILE_SAVING_PER_STEP = 0.09


@dataclass(frozen=True)
class SpeedPlan:
    """The speed levers of one run, as resolved for this device. `reasons` says why for each auto choice."""
    padding_free: bool
    liger_kernel: bool
    tf32: bool
    gradient_checkpointing: bool
    reasons: tuple[str, ...] = ()
    torch_compile: bool = False
    recompute: str = ""          # job/recompute.py's mode when gradient_checkpointing: layers, selective, offload

    @property
    def attn_implementation(self) -> str:
        return PADDING_FREE_ATTENTION if self.padding_free else "sdpa"

    def describe(self) -> dict:
        out = asdict(self)
        out["reasons"] = list(self.reasons)
        out["attn_implementation"] = self.attn_implementation
        return out


def _setting(value: str, auto: bool) -> bool:
    return auto if value == "auto" else value == "true"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def liger_available() -> bool:
    return triton_available() and importlib.util.find_spec("liger_kernel") is not None


def plan(config: Config, device: str, model_config=None, steps: int | None = None,
         world_size: int = 1, compile_seconds: float | None = None, cache_unmeasured: bool = False) -> SpeedPlan:
    """Resolve every auto setting for this device. `model_config` (the base's transformers config) sizes the
    gradient-checkpointing choice; without it the choice falls back to a 7B-sized estimate. `steps` (the optimizer
    steps this run has left) decides whether compiling pays; unknown, it does not. `compile_seconds`: what the first
    compiled step was measured to cost with this run's compile cache loaded (job/compile_cache.py), in place of a
    cold compile's; `cache_unmeasured`: a cache is stored but no run has measured its first step yet."""
    gpu = device == "cuda"
    modern = gpu and torch.cuda.get_device_capability(0) >= (8, 0)
    padding_free = _setting(config.padding_free, gpu)
    compile_, compile_why = _torch_compile(config, modern, padding_free, steps, world_size, compile_seconds,
                                           cache_unmeasured)
    eager_liger = _setting(config.use_liger_kernel, gpu and liger_available())
    # Compiled or with Liger's kernels, RMSNorm and SwiGLU keep no intermediate copies.
    checkpointing, why = _gradient_checkpointing(config, device, model_config, compile_ or eager_liger)
    if compile_ and checkpointing and config.torch_compile == "auto":
        # Recomputation wraps each layer in torch.utils.checkpoint; keep such runs on the measured eager path.
        compile_, compile_why = False, "torch.compile off: gradient checkpointing is on"
    # Compiled layers get inductor's fusions of RMSNorm, SwiGLU and RoPE, so Liger's kernels are for eager runs.
    liger = eager_liger and (config.use_liger_kernel == "true" or not compile_)
    reasons = []
    if config.use_liger_kernel == "auto" and gpu and not compile_ and not liger:
        reasons.append("liger-kernel not installed: unfused RMSNorm/SwiGLU/RoPE")
    from .recompute import mode
    return SpeedPlan(padding_free=padding_free, liger_kernel=liger, tf32=_setting(config.tf32, modern),
                     gradient_checkpointing=checkpointing, torch_compile=compile_,
                     recompute=mode(config.gradient_checkpointing, checkpointing),
                     reasons=tuple(reasons + [why, compile_why]))


def _torch_compile(config: Config, modern_gpu: bool, padding_free: bool, steps: int | None,
                   world_size: int, compile_seconds: float | None = None,
                   cache_unmeasured: bool = False) -> tuple[bool, str]:
    if config.torch_compile != "auto":
        return config.torch_compile == "true", f"torch.compile {config.torch_compile} (set)"
    if not modern_gpu or not padding_free or not triton_available():
        return False, "torch.compile off: needs an Ampere or newer GPU, triton and padding-free batches"
    if world_size > 1:   # measured on one GPU only; TORCH_COMPILE=true compiles under DDP too
        return False, "torch.compile off: not measured with several GPUs (TORCH_COMPILE=true to compile)"
    if compile_seconds is None and cache_unmeasured and steps:
        # Only a run that loads the cache can measure what it saves; the next runs weigh that measurement.
        return True, (f"torch.compile on: a compile cache of this GPU, torch and job is stored and its first step "
                      f"not measured yet; this run loads it and measures it ({steps} steps to run)")
    cost = COMPILE_SECONDS if compile_seconds is None else compile_seconds
    what = (f"a ~{cost:.0f} s compile" if compile_seconds is None else
            f"a {cost:.0f} s first step with the compile cache of this GPU, torch and job (measured)")
    repays = int(cost / COMPILE_SAVING_PER_STEP)
    if steps is None or steps < repays:
        return False, (f"torch.compile off: {steps if steps is not None else 'an unknown number of'} steps to run, "
                       f"fewer than the ~{repays} that repay {what}")
    return True, f"torch.compile on: {steps} steps to run repay {what} (>= {repays})"


def activation_bytes(model_config, tokens: int, fused: bool) -> int:
    """Bytes the forward pass keeps for the backward pass, for `tokens` tokens in one micro-batch."""
    layers = getattr(model_config, "num_hidden_layers", 32)
    hidden = getattr(model_config, "hidden_size", 4096)
    vocab = getattr(model_config, "vocab_size", 32000)
    # Logits in bf16, their float32 copy for the loss, and its gradient.
    return tokens * (layers * hidden * _ACTIVATION_BYTES[fused] + vocab * 10)


def weight_bytes(model_config) -> int:
    """NF4 decoder weights (half a byte each plus scales) and the 16-bit embedding and output matrices."""
    layers = getattr(model_config, "num_hidden_layers", 32)
    hidden = getattr(model_config, "hidden_size", 4096)
    inter = getattr(model_config, "intermediate_size", 11008)
    vocab = getattr(model_config, "vocab_size", 32000)
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    return int(layers * per_layer * 0.53) + 2 * vocab * hidden * 2


def _gradient_checkpointing(config: Config, device: str, model_config, fused: bool) -> tuple[bool, str]:
    if config.gradient_checkpointing != "auto":
        return config.gradient_checkpointing != "false", f"gradient checkpointing {config.gradient_checkpointing} (set)"
    if device != "cuda":
        return False, "gradient checkpointing off: not a GPU"
    total = torch.cuda.get_device_properties(0).total_memory
    # The longest micro-batch the data allows: every sequence at MAX_SEQ_LENGTH.
    tokens = config.per_device_train_batch_size * config.max_seq_length
    need = weight_bytes(model_config) + activation_bytes(model_config, tokens, fused)
    on = need > _MEMORY_HEADROOM * total
    return on, (f"gradient checkpointing {'on' if on else 'off'}: ~{need / 2**30:.1f} GiB needed without it "
                f"for {tokens} tokens per micro-batch, {'over' if on else 'within'} "
                f"{_MEMORY_HEADROOM:.0%} of {total / 2**30:.0f} GiB")


# ---------------------------------------------------------------- padding-free attention

def _varlen_kernel():
    """torch's flash-attention varlen entry point (torch >= 2.10), with its causal argument for this version."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, {}
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal


_VARLEN, _CAUSAL = _varlen_kernel()


def padding_free_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """Attention over a flattened batch [1, heads, tokens, dim] holding several sequences back to back.

    The sequence boundaries come from `cu_seq_lens_q` (DataCollatorWithFlattening), so no token attends across
    them. On a GPU with flash attention this is one varlen kernel over only the in-sequence causal blocks;
    elsewhere, one causal SDPA call per sequence (same result, slower). Batches without boundaries (generation,
    a padded batch) take transformers' own SDPA path.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))      # [tokens, heads, dim]
    if _VARLEN is not None and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 8 and \
            q.dtype in (torch.float16, torch.bfloat16):
        longest = int(kwargs["max_length_q"])
        out = _VARLEN(q, k, v, cu, cu, longest, longest, scale=scaling, **_CAUSAL)
    else:
        bounds = cu.tolist()
        out = torch.cat([
            F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                           is_causal=True, scale=scaling).transpose(0, 1)
            for s, e in zip(bounds[:-1], bounds[1:])])
    return out.unsqueeze(0), None                                        # [1, tokens, heads, dim]


def _padding_free_mask(**kwargs):
    # No 2D mask means a flattened batch (its boundaries travel as cu_seq_lens) or an unpadded one: causal either
    # way, so no dense mask is built. A padded batch gets SDPA's mask as usual.
    from transformers.masking_utils import sdpa_mask

    return None if kwargs.get("attention_mask") is None else sdpa_mask(**kwargs)


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PADDING_FREE_ATTENTION, padding_free_attention)
    AttentionMaskInterface.register(PADDING_FREE_ATTENTION, _padding_free_mask)


def data_collator(plan_: SpeedPlan, tokenizer):
    """Padding-free: each batch's sequences back to back in one row, positions restarting per sequence and the
    first label of each masked, so no sequence predicts the next one's first token. Otherwise: padded."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if plan_.padding_free:
        return DataCollatorWithFlattening(return_flash_attn_kwargs=True, separator_id=-100)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


# ---------------------------------------------------------------- fused kernels

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


# ---------------------------------------------------------------- compiled decoder layers

def compile_layers(model) -> int:
    """torch.compile each decoder layer of the (peft-wrapped) model in place, for sequence lengths that change
    from batch to batch; returns how many. Every layer runs the same code, so one compiled graph serves them all.
    The parameters and their names are untouched: checkpoints and the adapter are the same as eager ones.
    On a GPU, inductor's kernels; on a CPU, `aot_eager` (the same captured forward and backward graphs, run by
    eager kernels), which is what the CPU tests check."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        return 0
    on_gpu = next(model.parameters()).is_cuda
    if on_gpu:
        _persistent_compile_cache()
    for layer in layers:
        layer.compile(dynamic=True, backend="inductor" if on_gpu else "aot_eager")
    return len(layers)


def _persistent_compile_cache() -> None:
    # Inductor caches its kernels under /tmp by default, lost with the container; beside the Hub cache (a volume
    # in compose and the Kubernetes Job) a restarted or resumed run reuses them and compiles in seconds.
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from huggingface_hub import constants
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(constants.HF_HOME) / "torch-compile")


def eager():
    """A context in which compiled layers run their eager code: evaluation and generation, whose shapes and
    no-grad mode would otherwise each cost a compile of their own."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()
