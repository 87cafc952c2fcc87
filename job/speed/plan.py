"""Which speed levers a run uses, and the memory model that sizes them: one estimate of what training keeps in
memory, used for the gradient-checkpointing choice here and for preflight's memory and disk rows."""
from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from ..config import Config
from .attention import PADDING_FREE_ATTENTION
from .recompute import mode

GiB = 2 ** 30
# Activation memory kept for the backward pass, in bytes per token per decoder layer per unit of hidden size, for
# Llama-2-7B's shape in bf16 without recomputation; fused RMSNorm and SwiGLU keep no fp32 or intermediate copies.
# Measured values, with a margin: docs/PERFORMANCE.md, "The memory model".
_ACTIVATION_BYTES = {False: 48, True: 40}
# Share of the GPU's memory the estimate may fill before recomputation is switched on.
_MEMORY_HEADROOM = 0.8
# torch.compile of the decoder layers, for Llama-2-7B at batch 4 (docs/PERFORMANCE.md): what the first step pays
# once with an empty cache (9.9 s and 13.0 s measured on H200s, 2026-11-29, once the layers' floats were constants
# and inductor's ISA probe was off; 41.7-56.6 s before); what it pays with the portable compile cache loaded
# (compile_cache.py), before a run of this cache's key has measured it (4.9 s and 6.5 s measured); and what every
# later step saves, the smallest of the measured savings. `auto` compiles when the run's remaining steps repay the
# first step: from 218 steps cold, so the seed's own run (238 steps) compiles.
COMPILE_SECONDS = 15.0
CACHED_COMPILE_SECONDS = 8.0
COMPILE_SAVING_PER_STEP = 0.069
# The shape the estimates take where the base's config is not at hand: Llama-2-7B's (the defaults' base).
_LLAMA_7B_SHAPE = SimpleNamespace(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, vocab_size=32000,
                                  num_attention_heads=32)
# CUDA context, cuBLAS workspace and allocator fragmentation on a GPU; the interpreter and libraries on a CPU.
RUNTIME_OVERHEAD = GiB


@dataclass(frozen=True)
class SpeedPlan:
    """The speed levers of one run, as resolved for this device. `reasons` says why for each auto choice."""
    padding_free: bool
    liger_kernel: bool
    tf32: bool
    gradient_checkpointing: bool
    reasons: tuple[str, ...] = ()
    torch_compile: bool = False
    recompute: str = ""          # recompute.py's mode when gradient_checkpointing: layers, selective, offload
    keep_weights: bool = False   # compiled layers' 4-bit weights dequantized once for the run (nf4.keep)
    optimizer_states_on_gpu: bool = False   # a paged optimizer's states in the GPU's own memory (kernels.py)

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
    compiled step was measured to cost with this run's compile cache loaded (compile_cache.py), in place of a
    cold compile's; `cache_unmeasured`: a cache is stored but no run has measured its first step yet."""
    gpu = device == "cuda"
    modern = gpu and torch.cuda.get_device_capability(0) >= (8, 0)
    padding_free = _setting(config.padding_free, gpu)
    compile_, compile_why = _torch_compile(config, modern, padding_free, steps, world_size, compile_seconds,
                                           cache_unmeasured)
    eager_liger = _setting(config.use_liger_kernel, gpu and liger_available())
    # Compiled or with Liger's kernels, RMSNorm and SwiGLU keep no intermediate copies.
    checkpointing, why = _gradient_checkpointing(config, device, model_config, compile_ or eager_liger)
    if compile_ and checkpointing and gpu and mode(config.gradient_checkpointing, checkpointing) == "selective":
        # The attention block's checkpoint sits inside the compiled layer, traced as a higher-order op, and inductor
        # failed on that on an H200 (torch 2.11): AOTAutograd's partitioner raised "Node add_303 was invalid, but is
        # output" at the first step (docs/PERFORMANCE.md). Whole recomputed layers keep their checkpoint outside the
        # compiled forward (kernels.compile_layers). A CPU run compiles with aot_eager, which recomputes right.
        set_aside = " (TORCH_COMPILE=true set aside)" if config.torch_compile == "true" else ""
        compile_, compile_why = False, (f"torch.compile off{set_aside}: selective recomputation checkpoints inside "
                                        f"the compiled layer, which inductor failed to compile on a GPU")
    # Compiled layers get inductor's fusions of RMSNorm, SwiGLU and RoPE, so Liger's kernels are for eager runs.
    liger = eager_liger and (config.use_liger_kernel == "true" or not compile_)
    reasons = []
    if config.use_liger_kernel == "auto" and gpu and not compile_ and not liger:
        reasons.append("liger-kernel not installed: unfused RMSNorm/SwiGLU/RoPE")
    reasons += [why, compile_why]
    keep = False
    if gpu and compile_ and not checkpointing:
        keep, keep_why = _keep_weights(config, model_config)
        reasons.append(keep_why)
    states_on_gpu = False
    if gpu and not checkpointing and config.optim.startswith("paged_"):
        states_on_gpu, states_why = _optimizer_states_on_gpu(config, model_config, compile_ or eager_liger, keep)
        reasons.append(states_why)
    return SpeedPlan(padding_free=padding_free, liger_kernel=liger, tf32=_setting(config.tf32, modern),
                     gradient_checkpointing=checkpointing, torch_compile=compile_,
                     recompute=mode(config.gradient_checkpointing, checkpointing), keep_weights=keep,
                     optimizer_states_on_gpu=states_on_gpu, reasons=tuple(reasons))


def _keep_weights(config: Config, model_config) -> tuple[bool, str]:
    """nf4.keep for unrecomputed compiled layers, where the GPU holds the training's estimated peak and a bf16 copy
    of every 4-bit weight within the same headroom as the checkpointing choice. On an H100 (2026-12-06), as a copy
    made once a step for the backward pass, it ran the batch-4 step at 1.15x (11,617 against 10,068 tokens/s; the
    step is bound by the host, and bitsandbytes' backward dequantizations were half its 448 operator calls) and
    batch 24 at 1.02x, for 12.05 GiB more; the copy is now made once for the run, the same memory at the peak."""
    total = torch.cuda.get_device_properties(0).total_memory
    kept = kept_weight_bytes(model_config)
    need = _unrecomputed_need(config, model_config, fused=True)[0] + kept
    on = need <= _MEMORY_HEADROOM * total
    return on, (f"4-bit weights {'kept' if on else 'not kept'} dequantized for the run: "
                f"~{need / 2**30:.1f} GiB needed with their {kept / 2**30:.1f} GiB, "
                f"{'within' if on else 'over'} {_MEMORY_HEADROOM:.0%} of {total / 2**30:.0f} GiB")


def _optimizer_states_on_gpu(config: Config, model_config, fused: bool, kept: bool) -> tuple[bool, str]:
    """A paged optimizer's states (OPTIM=paged_*) in the GPU's own memory rather than in CUDA managed memory, for
    unrecomputed layers where the GPU holds the training's estimated peak (`peak_memory`, Adam's moments included)
    within the checkpointing choice's headroom: paging is for a GPU that runs out, and here it does not. The same
    update kernels on the same values (bitwise the same parameters, bench/optim_check.py), as every resumed run
    already had them (bitsandbytes' load_state_dict moves them to the GPU). On an H100 (2026-12-07) the step over
    the defaults' 128 LoRA matrices took 3.0-3.2 ms against 5.0-5.8 ms paged: without the managed memory's
    prefetch before each update."""
    total = torch.cuda.get_device_properties(0).total_memory
    shape = model_config or _LLAMA_7B_SHAPE
    need = sum(peak_memory(config, shape, config.per_device_train_batch_size, False, fused,
                           kept_weights=kept).values())
    on = need <= _MEMORY_HEADROOM * total
    return on, (f"{config.optim} states {'in GPU memory (not paged)' if on else 'paged'}: ~{need / 2**30:.1f} GiB "
                f"needed at the peak, {'within' if on else 'over'} {_MEMORY_HEADROOM:.0%} of {total / 2**30:.0f} GiB")


def _torch_compile(config: Config, modern_gpu: bool, padding_free: bool, steps: int | None,
                   world_size: int, compile_seconds: float | None = None,
                   cache_unmeasured: bool = False) -> tuple[bool, str]:
    if config.torch_compile != "auto":
        return config.torch_compile == "true", f"torch.compile {config.torch_compile} (set)"
    if config.use_liger_kernel == "true":   # config.from_env refuses both set to true: dynamo cannot trace Liger
        return False, "torch.compile off: USE_LIGER_KERNEL=true, and torch.compile cannot trace Liger's kernels"
    if not modern_gpu or not padding_free or not triton_available():
        return False, "torch.compile off: needs an Ampere or newer GPU, triton and padding-free batches"
    if world_size > 1:   # measured on one GPU only; TORCH_COMPILE=true compiles under DDP too
        return False, "torch.compile off: not measured with several GPUs (TORCH_COMPILE=true to compile)"
    if compile_seconds is not None:
        cost, what = compile_seconds, (f"a {compile_seconds:.0f} s first step with the compile cache of this GPU, "
                                       f"torch and job (measured by an earlier run)")
    elif cache_unmeasured:
        # A run that compiles loads the cache and measures its first step; the runs after weigh that measurement.
        cost, what = CACHED_COMPILE_SECONDS, (f"a ~{CACHED_COMPILE_SECONDS:.0f} s first step with the stored compile "
                                              f"cache of this GPU, torch and job (the benchmark's; not measured here "
                                              f"yet)")
    else:
        cost, what = COMPILE_SECONDS, f"a ~{COMPILE_SECONDS:.0f} s compile"
    repays = math.ceil(cost / COMPILE_SAVING_PER_STEP)
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


def decoder_weights(model_config) -> int:
    """The decoder layers' linear weights (the 4-bit ones): q, k, v, o and the MLP's gate, up and down."""
    layers = getattr(model_config, "num_hidden_layers", 32)
    hidden = getattr(model_config, "hidden_size", 4096)
    inter = getattr(model_config, "intermediate_size", 11008)
    return layers * (4 * hidden * hidden + 3 * hidden * inter)


def weight_bytes(model_config, double_quant: bool = False) -> int:
    """NF4 decoder weights (half a byte each plus scales) and the 16-bit embedding and output matrices. Double
    quantization stores a byte per 64 weights and a float32 per 16,384 in place of a float32 per 64."""
    hidden = getattr(model_config, "hidden_size", 4096)
    vocab = getattr(model_config, "vocab_size", 32000)
    per_weight = 0.53 - (4 / 64 - 1 / 64 - 4 / 16384 if double_quant else 0)
    return int(decoder_weights(model_config) * per_weight) + 2 * vocab * hidden * 2


def kept_weight_bytes(model_config) -> int:
    """The decoder layers' 4-bit weights dequantized to bf16 (nf4.keep): 2 bytes a weight, 12.06 GiB for the 7B (the
    bench's peak grew by 12.05 GiB with them at batch 4 and at batch 24, H100, 2026-12-06)."""
    return decoder_weights(model_config) * 2


def _unrecomputed_need(config: Config, model_config, fused: bool) -> tuple[int, int]:
    """Bytes of weights and activations without recomputation for the longest micro-batch the data allows (every
    sequence at MAX_SEQ_LENGTH), and that micro-batch's tokens."""
    tokens = config.per_device_train_batch_size * config.max_seq_length
    return weight_bytes(model_config, config.double_quant) + activation_bytes(model_config, tokens, fused), tokens


def _gradient_checkpointing(config: Config, device: str, model_config, fused: bool) -> tuple[bool, str]:
    if config.gradient_checkpointing != "auto":
        return config.gradient_checkpointing != "false", f"gradient checkpointing {config.gradient_checkpointing} (set)"
    if device != "cuda":
        return False, "gradient checkpointing off: not a GPU"
    total = torch.cuda.get_device_properties(0).total_memory
    need, tokens = _unrecomputed_need(config, model_config, fused)
    on = need > _MEMORY_HEADROOM * total
    return on, (f"gradient checkpointing {'on' if on else 'off'}: ~{need / 2**30:.1f} GiB needed without it "
                f"for {tokens} tokens per micro-batch, {'over' if on else 'within'} "
                f"{_MEMORY_HEADROOM:.0%} of {total / 2**30:.0f} GiB")



# ---------------------------------------------------------------- the memory model

def lora_parameters(config: Config, shape) -> int:
    """Trainable parameters: r x (in + out) per adapted linear layer, plus the persona tokens' embedding and
    output rows. Module shapes follow Llama's names; an unknown name counts as hidden x hidden."""
    hidden = shape.hidden_size
    heads = getattr(shape, "num_attention_heads", None) or 1
    head_dim = getattr(shape, "head_dim", None) or hidden // heads
    kv = (getattr(shape, "num_key_value_heads", None) or heads) * head_dim
    inter = getattr(shape, "intermediate_size", None) or 4 * hidden
    linear = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
              "o_proj": (heads * head_dim, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}
    targets = list(linear) if config.target_modules == "all-linear" else config.target_modules
    per_layer = sum(config.lora_r * sum(linear.get(name, (hidden, hidden))) for name in targets)
    return shape.num_hidden_layers * per_layer + 2 * 2 * hidden


def checkpoint_bytes(config: Config, shape) -> int:
    """One checkpoint: the float32 adapter and its two Adam moments, plus the tokenizer and trainer state."""
    return lora_parameters(config, shape) * 12 + 64 * 2 ** 20


def peak_memory(config: Config, shape, micro_batch: int, checkpointing: bool, fused: bool,
                dtype_bytes: int = 2, kept_weights: bool = False) -> dict[str, int]:
    """Estimated peak memory of one training process, in bytes, by part:

    - weights: `weight_bytes` (NF4 decoder weights, 16-bit embeddings and lm_head), the embeddings at
      `dtype_bytes` instead of 2 where the compute dtype differs (float32 on a CPU);
    - lora: trainable parameters (`lora_parameters`) x 16 bytes: float32 weight, gradient, and Adam's two moments;
    - activations, for the longest micro-batch the data allows (micro_batch x MAX_SEQ_LENGTH tokens):
      without gradient checkpointing, `activation_bytes` (measured per token, layer and hidden unit, plus the
      logits); with it, each layer's input kept (layers x hidden x dtype_bytes per token) plus one layer's
      activations recomputed and the logits (`activation_bytes` of a one-layer model); both scaled by
      dtype_bytes / 2, as they were measured in bf16;
    - kept weights, where the plan keeps the dequantized 4-bit weights for the backward pass: `kept_weight_bytes`;
    - overhead: `RUNTIME_OVERHEAD`.

    It errs high: sequences rarely all reach MAX_SEQ_LENGTH. docs/PERFORMANCE.md ("The memory model") has the
    estimate for the defaults beside what the GPU benchmark measured.
    """
    tokens = micro_batch * config.max_seq_length
    hidden, layers = shape.hidden_size, shape.num_hidden_layers
    weights = weight_bytes(shape, config.double_quant) + 2 * shape.vocab_size * hidden * (dtype_bytes - 2)
    if checkpointing:
        one_layer = SimpleNamespace(num_hidden_layers=1, hidden_size=hidden, vocab_size=shape.vocab_size)
        activations = tokens * layers * hidden * dtype_bytes + activation_bytes(one_layer, tokens, fused)
    else:
        activations = activation_bytes(shape, tokens, fused)
    kept = {"kept weights": kept_weight_bytes(shape)} if kept_weights else {}
    return {"weights": weights, "lora": lora_parameters(config, shape) * 16,
            "activations": activations * dtype_bytes // 2, **kept, "overhead": RUNTIME_OVERHEAD}


def host_memory() -> int:
    """The host's memory, or the container's limit where a cgroup sets a lower one."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total

