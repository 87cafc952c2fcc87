"""The tokenizer with the persona tokens, the 4-bit NF4 base, and the LoRA adapter on it."""
from __future__ import annotations

import torch

from .config import Config
from .data import PERSONA_TOKENS


def compute_dtype(config: Config, device: str) -> torch.dtype:
    """The dtype the 4-bit layers compute in: COMPUTE_DTYPE, or this device's own (`device_dtype`)."""
    if config.compute_dtype != "auto":
        return getattr(torch, config.compute_dtype)
    return device_dtype(device)


def device_dtype(device: str) -> torch.dtype:
    """bfloat16 on a GPU that has it, else float16; float32 on a CPU, where bnb's 4-bit path is exact and fastest."""
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(config: Config):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.base_model, token=config.hf_token or None)
    tokenizer.add_special_tokens({"additional_special_tokens": PERSONA_TOKENS})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def persona_token_ids(tokenizer) -> list[int]:
    return tokenizer.convert_tokens_to_ids(PERSONA_TOKENS)


def base_shape(config: Config):
    """BASE_MODEL's transformers config (layers, widths, vocabulary): what sizes the speed plan."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(config.base_model, token=config.hf_token or None)


def speed_plan(config: Config, device: str, steps: int | None = None, world_size: int = 1,
               compile_seconds: float | None = None, cache_unmeasured: bool = False):
    """The speed levers for this device (job/speed/plan.py), sized by the base model's shape and the run's length."""
    from .speed.plan import plan

    return plan(config, device, base_shape(config), steps, world_size, compile_seconds, cache_unmeasured)


def load_base_model(config: Config, tokenizer, device: str, plan=None, shape=None):
    """The base in 4-bit NF4, with room for the persona tokens (their rows start as the mean row), and the
    attention and fused kernels the speed plan asks for. `shape`: its config (`base_shape`), where already read."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .speed.attention import register_attention
    from .speed.kernels import apply_liger

    plan = plan or speed_plan(config, device)
    dtype = compute_dtype(config, device)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=dtype,
                                      bnb_4bit_use_double_quant=config.double_quant)
    register_attention()
    # Loaded as stored, not converted to the compute dtype on the way (on an H100, Llama-2-7B's shape in float16
    # loaded in 1.9 s, and in 3.65 s converted to bfloat16): the 4-bit weights are quantized from the stored values,
    # and the few unquantized tensors are converted after (`to_compute_dtype`).
    model = AutoModelForCausalLM.from_pretrained(config.base_model, quantization_config=quantization,
                                                 dtype=stored_dtype(shape or base_shape(config)) or dtype,
                                                 device_map={"": torch.cuda.current_device() if device == "cuda" else device},
                                                 attn_implementation=plan.attn_implementation,
                                                 token=config.hf_token or None)
    to_compute_dtype(model, dtype)
    grow_vocabulary(model, len(tokenizer))
    model.config.use_cache = False
    if plan.liger_kernel:
        apply_liger(model)
    if device == "cpu":
        _one_cpu_kernel(model)
    return model


def stored_dtype(shape) -> torch.dtype | None:
    """The floating dtype the base's weights are stored in, as its config (`base_shape`) says; None if it does not."""
    stored = getattr(shape, "dtype", None) or getattr(shape, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) and stored.is_floating_point else None


def to_compute_dtype(model, dtype: torch.dtype) -> None:
    """The unquantized weights (embeddings, norms, lm_head) in the compute dtype, and each 4-bit weight dequantizing
    to it: what loading with `dtype` gives, but for the 4-bit weights' source values."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            state.dtype = dtype


def grow_vocabulary(model, vocab_size: int) -> None:
    """Resize to `vocab_size`, filling new rows with the mean row: deterministic, unlike resize's sampling."""
    old = model.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            layer.weight[old:] = layer.weight[:old].float().mean(0).to(layer.weight.dtype)


def _one_cpu_kernel(model) -> None:
    # bitsandbytes switches a CPU Linear4bit to a repacked bf16 kernel the first time it runs in eval mode
    # without grad (an eval pass). Training after that would take other numerics than a resumed run that
    # never evaluated, breaking bit-exact resume; so keep every layer on the one reference kernel.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def add_lora(config: Config, model, tokenizer):
    """LoRA on the target modules; the persona tokens' embedding and output rows train as well, alone (without
    copies of the embedding and output matrices: speed/tokens.py). The training loss is computed without the
    whole batch's logits (speed/loss.py)."""
    from peft import LoraConfig, get_peft_model

    from .speed.loss import chunked_loss
    from .speed.tokens import lean_trainable_tokens

    ids = persona_token_ids(tokenizer)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.target_modules, bias="none", task_type="CAUSAL_LM",
                      trainable_token_indices={"embed_tokens": ids, "lm_head": ids})
    # The LoRA matrices made where the base is: made on the host and moved (peft's way), they took 1.6-1.8 s of a
    # first run's start on an H100 (128 small tensors zeroed, initialized and copied, beside the compile's helper;
    # docs/PERFORMANCE.md). On a GPU they are initialized by its random generator, seeded as the host's is.
    with torch.device(model.get_input_embeddings().weight.device):
        model = get_peft_model(model, lora)
    lean_trainable_tokens(model)
    chunked_loss(model)
    return model
