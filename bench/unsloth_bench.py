"""Unsloth as a configuration of bench/speed.py (issue 17): the same random Llama-2-7B-shaped model, the same token
stream, the seed's math, through Unsloth's own fast path.

bench/speed.py runs each Unsloth configuration in its own process (as every configuration), with its own site
directory on PYTHONPATH in place of the job's stack (unsloth 2026.10.9 needs transformers <= 5.17; the GPU image has
5.17.0, the job carries 5.24.0), and with UNSLOTH_DISABLE_STATISTICS=1 and HF_HUB_OFFLINE=1.

The model: bench/speed.py builds the random model once, on the GPU, and saves it (safetensors and a tokenizer) for
every configuration, which then loads it through `from_pretrained` in NF4, as a job loads a Hub model. Unsloth's
fast path is put on a model the same way, through its own loader: `FastLanguageModel.from_pretrained(<that
folder>, load_in_4bit=True, local_files_only=True)` dispatches a Llama config to `FastLlamaModel`, whose
`pre_patch()` replaces LlamaAttention/LlamaDecoderLayer/LlamaModel/LlamaForCausalLM's forwards before the model is
built and loads it with bitsandbytes NF4; then `FastLanguageModel.get_peft_model(...,
use_gradient_checkpointing="unsloth")` adds peft's LoRA, Unsloth's fused LoRA kernels (only with lora_dropout 0,
bias "none" and LoRA on all of q, k and v, or on all of gate, up and down: the seed's q_proj,v_proj never qualify,
so both rows run peft's LoRA forward and differ by the dropout alone) and its offloaded gradient checkpointing. `fast_path()` checks each of these on the
loaded model and raises `UnslothUnavailable` if one is missing: a configuration named unsloth never measures
anything but Unsloth.

Training: transformers' Trainer (which Unsloth patches on import) with the seed's arguments (paged AdamW 32-bit,
lr 2e-4 cosine, warmup 0.03, weight decay 0.001, clipping 0.3, batch 4, LoRA r64/alpha16 on q_proj,v_proj), with
Unsloth's precision (bf16 weights and bf16 autocast where the GPU has bf16, as its notebooks set). Batches: padded
by the seed's collator, or (`-pf`) padding-free the way Unsloth's SFTTrainer does it (sequences back to back, their
lengths in `packed_seq_lengths`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# name -> (LoRA dropout, padding-free)
SETTINGS = {
    "unsloth": (0.1, False),          # the seed's math
    "unsloth-d0": (0.0, False),       # Unsloth's best: dropout 0 lets it fuse the LoRA kernels
    "unsloth-d0-pf": (0.0, True),     # and padding-free batches, as its SFTTrainer makes them by default
    "unsloth-e2e": (0.1, False),      # the seed's whole run, end to end (bench/e2e_race.py)
    "unsloth-d0-e2e": (0.0, False),
}
DEFAULT_SITE = "/tmp/site-unsloth"
REQUIRED_ENV = {"UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_OFFLINE": "1"}
MAX_SEQ_LENGTH = 1024
TARGET_MODULES = ["q_proj", "v_proj"]   # the seed's


class UnslothUnavailable(RuntimeError):
    """Unsloth or a piece of its fast path is not there: the configuration fails instead of measuring anything else."""


def child_environment(env: dict[str, str]) -> dict[str, str]:
    """The environment of an Unsloth configuration's process: its own site directory (UNSLOTH_SITE, default
    /tmp/site-unsloth) first on PYTHONPATH, with the job's /tmp/site taken off it, plus REQUIRED_ENV."""
    site = env.get("UNSLOTH_SITE", DEFAULT_SITE)
    if not (Path(site) / "unsloth" / "__init__.py").exists():
        raise UnslothUnavailable(f"no unsloth in {site} (UNSLOTH_SITE): install the wheels of "
                                 f"bench/fetch_unsloth_wheels.sh there (bench/run_gpu.sh does, from .whl-unsloth)")
    job_site = env.get("JOB_SITE", "/tmp/site")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != job_site]
    return {**env, **REQUIRED_ENV, "PYTHONPATH": os.pathsep.join([site] + paths)}


def import_unsloth():
    """`import unsloth`, first: it patches transformers, peft and trl as they are imported."""
    if "unsloth" in sys.modules:
        import transformers
        import unsloth
        return {"unsloth": unsloth.__version__, "transformers": transformers.__version__,
                "unsloth_file": unsloth.__file__}
    missing = {k: v for k, v in REQUIRED_ENV.items() if os.environ.get(k) != v}
    if missing:
        raise UnslothUnavailable(f"set {missing} for an Unsloth configuration (child_environment does)")
    early = [m for m in ("transformers", "peft", "trl") if m in sys.modules]
    if early:
        raise UnslothUnavailable(f"{early} imported before unsloth: Unsloth would not patch them")
    try:
        import unsloth
    except Exception as exc:  # noqa: BLE001 - any failure to import is the one message that matters here
        raise UnslothUnavailable(f"import unsloth failed: {type(exc).__name__}: {exc}") from exc
    import transformers
    return {"unsloth": unsloth.__version__, "transformers": transformers.__version__,
            "unsloth_file": unsloth.__file__}


def load(model_dir: Path, dropout: float, seed: int = 42):
    """The saved random model through Unsloth's loader, NF4, with its LoRA and gradient checkpointing."""
    import torch
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(model_dir), max_seq_length=MAX_SEQ_LENGTH, dtype=None, load_in_4bit=True,
        local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=64, lora_alpha=16, lora_dropout=dropout, target_modules=TARGET_MODULES, bias="none",
        use_gradient_checkpointing="unsloth", random_state=seed)
    return model, tokenizer, fast_path(model, dropout, on_gpu=torch.cuda.is_available())


def fast_path(model, dropout: float, on_gpu: bool = True) -> dict:
    """What of Unsloth's fast path is on `model` (a peft model from FastLanguageModel); raises if a piece that
    this configuration is about is missing."""
    import bitsandbytes as bnb

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = base.model.layers
    layer_forward = type(layers[0]).forward
    found = {
        "decoder_layer_forward": f"{layer_forward.__module__}.{layer_forward.__qualname__}",
        "model_forward": f"{type(base.model).forward.__module__}.{type(base.model).forward.__qualname__}",
        "attention_forward": f"{type(layers[0].self_attn).forward.__module__}."
                             f"{type(layers[0].self_attn).forward.__qualname__}",
        "gradient_checkpointing": getattr(model, "_unsloth_gradient_checkpointing", None),
        "lora_dropout": dropout,
        "qkv": sorted({_name(getattr(layer.self_attn, "apply_qkv", None)) for layer in layers}),
        "o": sorted({_name(getattr(layer.self_attn, "apply_o", None)) for layer in layers}),
        "nf4_linears": sum(isinstance(m, bnb.nn.Linear4bit) for m in base.modules()),
        "dtype": str(base.model.embed_tokens.weight.dtype),
    }
    problems = []
    for key in ("decoder_layer_forward", "model_forward", "attention_forward"):
        if not found[key].startswith("unsloth."):
            problems.append(f"{key} is {found[key]}, not Unsloth's")
    if found["gradient_checkpointing"] != "unsloth":
        problems.append(f"gradient checkpointing is {found['gradient_checkpointing']!r}, not Unsloth's 'unsloth'")
    if on_gpu:
        if found["nf4_linears"] != 7 * len(layers):
            problems.append(f"{found['nf4_linears']} NF4 linear layers, expected {7 * len(layers)}")
        # Unsloth fuses q/k/v's LoRA (apply_lora_qkv) only at dropout 0 and only when q, k and v all carry LoRA
        # (unsloth/models/llama.py, patch_peft_model); the seed's q_proj,v_proj never qualify, at any dropout.
        fusable = dropout == 0 and {"q_proj", "k_proj", "v_proj"} <= set(TARGET_MODULES)
        if fusable and found["qkv"] != ["apply_lora_qkv"]:
            problems.append(f"lora_dropout 0 with LoRA on q, k and v, but the projections run {found['qkv']}, not "
                            f"Unsloth's fused apply_lora_qkv")
    if problems:
        raise UnslothUnavailable("Unsloth's fast path is not on the model: " + "; ".join(problems))
    return found


def _name(function) -> str:
    return getattr(function, "__name__", str(function))


class PaddingFreeCollator:
    """Unsloth's padding-free batches (unsloth/utils/packing.py enable_padding_free_metadata over TRL's
    padding-free collator): one row of the batch's sequences back to back, positions restarting at each, the first
    label of each masked, and their lengths in `packed_seq_lengths` for Unsloth's varlen attention."""

    def __init__(self):
        from transformers import DataCollatorWithFlattening
        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)

    def __call__(self, examples):
        import torch
        batch = self.flatten(examples)
        batch["packed_seq_lengths"] = torch.tensor([len(e["input_ids"]) for e in examples], dtype=torch.int32)
        batch.pop("attention_mask", None)
        return batch


def run_unsloth(name: str, model_dir: Path, rows, batch: int, steps: int, work: Path, meter, log_every: int):
    """bench/speed.py's runner for the Unsloth configurations: (trainer, info)."""
    import datasets
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    versions = import_unsloth()
    dropout, padding_free = SETTINGS[name]
    model, tokenizer, found = load(model_dir, dropout)
    bf16 = found["dtype"] == str(torch.bfloat16)
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        optim="paged_adamw_32bit", save_strategy="no", logging_steps=log_every, learning_rate=2e-4,
        weight_decay=0.001, bf16=bf16, fp16=not bf16 and torch.cuda.is_available(), max_grad_norm=0.3, max_steps=steps,
        warmup_steps=0.03, lr_scheduler_type="cosine", train_sampling_strategy="sequential", report_to="none",
        seed=42, disable_tqdm=True, remove_unused_columns=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    collator = PaddingFreeCollator() if padding_free else DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                      data_collator=collator, callbacks=[meter])
    return trainer, {"recipe": f"unsloth: lora_dropout {dropout}, {'padding-free' if padding_free else 'padded'}",
                     "unsloth": {**versions, "fast_path": found}}


def cpu_check(model_dir: Path, out: Path) -> dict:
    """On a CPU, with bench/unsloth_cpu_stub.py standing in for the GPU: import Unsloth from its site directory,
    load the bench's (small) model through its loader for each configuration, check its fast path, build the
    Trainer on the bench's shared token stream and collate the first batch. Returns what it found."""
    import unsloth_cpu_stub
    unsloth_cpu_stub.install()
    import json
    versions = import_unsloth()
    sys.path.insert(0, str(Path(__file__).parent))
    import speed
    rows = speed.shared_token_stream(out)
    # The shared file is what the configurations read; drawn afresh under this transformers it must be the same.
    report = {**versions, "token_stream": speed.stream_digest(rows),
              "token_stream_drawn_here": speed.stream_digest(speed.token_stream()), "configs": {}}
    for name in SETTINGS:
        meter = speed.make_meter(False)
        trainer, info = run_unsloth(name, model_dir, rows[:8], 4, 2, out / "work" / name, meter, speed.LOG_EVERY)
        batch = trainer.data_collator(rows[:4])
        report["configs"][name] = {
            "fast_path": info["unsloth"]["fast_path"], "recipe": info["recipe"],
            "trainer": f"{type(trainer).__module__}.{type(trainer).__name__}",
            "inner_training_loop": type(trainer)._inner_training_loop.__name__,
            "optimizer": trainer.args.optim, "bf16": trainer.args.bf16, "lr": trainer.args.learning_rate,
            "batch": {k: list(v.shape) for k, v in batch.items()},
            "packed_seq_lengths": batch["packed_seq_lengths"].tolist() if "packed_seq_lengths" in batch else None,
            "real_tokens": int((batch["labels"] != -100).sum()),
        }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="check the Unsloth configurations' plumbing on a CPU")
    parser.add_argument("--cpu-check", type=Path, required=True, metavar="MODEL_DIR")
    parser.add_argument("--out", type=Path, required=True)
    parsed = parser.parse_args()
    cpu_check(parsed.cpu_check, parsed.out)
