"""Speed benchmark on one GPU: the seed's recipe against the job's own training path, on identical token streams.

    python bench/speed.py --out DIR [--model 7b|small] [--configs seed,job,...]

What it does, in order:
1. Builds a random-weight Llama of Llama-2-7B's exact shape (hidden 4096, 32 layers, 32 heads, intermediate 11008,
   vocab 32000) in float16 on the GPU and saves it as safetensors with a 32000-token tokenizer, so that every
   configuration loads it through `from_pretrained` in 4-bit, as the job loads a Hub model. `--model small` keeps
   the width and has 2 layers (a smoke test of the same code).
2. Draws one token stream with a fixed seed: sequences of 200-500 tokens (persona-chat-like lengths), labels on
   the reply spans only, ordered once by transformers' own `get_length_grouped_indices` (what the seed's
   `group_by_length=True` did; transformers 5 spells it `train_sampling_strategy="group_by_length"`). Every
   configuration then reads that order sequentially, so all see the same batches in the same order.
3. Runs each configuration in a fresh process (`--run-one`): load, train, measure. Timing syncs the GPU at each
   optimizer step's end; tokens/s counts real tokens only (no padding); peak memory is
   torch.cuda.max_memory_allocated over the whole process, loading included.

Configurations: `seed` is the seed's recipe written plainly (transformers Trainer + peft + bitsandbytes,
prepare_model_for_kbit_training, fp16 compute without autocast, gradient checkpointing, batch 4,
paged_adamw_32bit, LoRA r64/alpha16/dropout .1 on q_proj,v_proj). `job*` run the job's own path: job.model's
loading, LoRA and speed plan, job.trainer's TrainingArguments and PersonaTrainer, job.speed's collator, all built
by job.run's Run.setup, with the job's defaults unless the configuration overrides a setting (by its environment
name).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
PARAMS_7B = 6.74e9          # Llama-2-7B's parameter count, for MFU
PEAK_BF16 = 989e12          # dense bf16 peak of H100 SXM and H200 (datasheet)

# name -> (recipe, sequences per optimizer step, steps, settings). Settings are job environment names, or for the
# seed recipe the few things the issue varies.
CONFIGS = {
    "seed": ("seed", 4, 30, {}),
    "seed-bf16-autocast": ("seed", 4, 30, {"autocast": "bf16"}),
    "job": ("job", 4, 30, {}),
    "job-ckpt": ("job", 4, 110, {"SAVE_STEPS": "50"}),
    "job-110": ("job", 4, 110, {}),        # job-ckpt's steps without saving: its baseline, run beside it
    "job-gc": ("job", 4, 30, {"GRADIENT_CHECKPOINTING": "true"}),
    "job-padded": ("job", 4, 30, {"PADDING_FREE": "false"}),
    "job-no-liger": ("job", 4, 30, {"USE_LIGER_KERNEL": "false"}),
    "job-no-tf32": ("job", 4, 30, {"TF32": "false"}),
    "job-autocast": ("job", 4, 30, {"autocast": "bf16"}),
    "job-expandable": ("job", 4, 30, {"os_env": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}}),
    "job-b16": ("job", 16, 20, {"PER_DEVICE_TRAIN_BATCH_SIZE": "16", "GRADIENT_CHECKPOINTING": "false"}),
    "job-b24": ("job", 24, 16, {"PER_DEVICE_TRAIN_BATCH_SIZE": "24", "GRADIENT_CHECKPOINTING": "false"}),
    "job-b32": ("job", 32, 16, {"PER_DEVICE_TRAIN_BATCH_SIZE": "32", "GRADIENT_CHECKPOINTING": "false"}),
    "job-b32-gc": ("job", 32, 16, {"PER_DEVICE_TRAIN_BATCH_SIZE": "32", "GRADIENT_CHECKPOINTING": "true"}),
    "job-b64-gc": ("job", 64, 10, {"PER_DEVICE_TRAIN_BATCH_SIZE": "64", "GRADIENT_CHECKPOINTING": "true"}),
    # job-sync: bitsandbytes' optimizer with its own sync after every parameter (the job drops them).
    "job-sync": ("job", 4, 30, {"patch": ["bnb-syncs"]}),
    # TORCH_COMPILE=true; the first step compiles (its time is `first_step_seconds`). The cache starts empty in
    # job-compile and is warm for the ones after it (same TORCHINDUCTOR_CACHE_DIR).
    "job-compile": ("job", 4, 30, {"TORCH_COMPILE": "true",
                                   "os_env": {"TORCH_LOGS": "recompiles,graph_breaks"}}),
    "job-compile-warm": ("job", 4, 30, {"TORCH_COMPILE": "true"}),
    "job-compile-liger": ("job", 4, 30, {"TORCH_COMPILE": "true", "USE_LIGER_KERNEL": "true"}),
    "job-ckpt-compile": ("job", 4, 110, {"SAVE_STEPS": "50", "TORCH_COMPILE": "true"}),
    "job-110-compile": ("job", 4, 110, {"TORCH_COMPILE": "true"}),
    # The portable compile cache (job/speed/compile_cache.py): cold saves it, cached loads it into an empty inductor cache
    # (a fresh machine's), so its first step is what a resumed or later run pays.
    "job-compile-cold": ("job", 4, 30, {"TORCH_COMPILE": "true", "compile_cache": True,
                                        "os_env": {"TORCHINDUCTOR_CACHE_DIR": "/tmp/inductor-cold"}}),
    "job-compile-cached": ("job", 4, 30, {"TORCH_COMPILE": "true", "compile_cache": True,
                                          "os_env": {"TORCHINDUCTOR_CACHE_DIR": "/tmp/inductor-cached"}}),
    # After job-compile-cold, on the same machine: its inductor cache and its portable cache both there, as a
    # restarted or resumed run on the same node finds them.
    "job-compile-rerun": ("job", 4, 30, {"TORCH_COMPILE": "true", "compile_cache": True,
                                         "os_env": {"TORCHINDUCTOR_CACHE_DIR": "/tmp/inductor-cold"}}),
    # nf4.keep, which the plan puts in where its estimate allows (batch 4 where 80% of the GPU holds ~37 GiB):
    # without it (apply_patches' unkept-weights) bitsandbytes' operators dequantize each weight again for the
    # backward pass; with it forced on (kept-weights) where the estimate, for every row at MAX_SEQ_LENGTH, does not
    # allow it.
    "job-compile-unkept": ("job", 4, 30, {"TORCH_COMPILE": "true", "patch": ["unkept-weights"]}),
    "job-b24-compile-kept": ("job", 24, 16, {"PER_DEVICE_TRAIN_BATCH_SIZE": "24", "GRADIENT_CHECKPOINTING": "false",
                                             "TORCH_COMPILE": "true", "patch": ["kept-weights"]}),
    "job-b32-compile-kept": ("job", 32, 16, {"PER_DEVICE_TRAIN_BATCH_SIZE": "32", "GRADIENT_CHECKPOINTING": "false",
                                             "TORCH_COMPILE": "true", "patch": ["kept-weights"]}),
    # The same with inductor's GEMM autotuning (TORCHINDUCTOR_MAX_AUTOTUNE_GEMM: its Triton matmul templates, with
    # their fused epilogues, against cuBLAS, per product shape), in a cache of its own: the compile takes longer.
    "job-b24-compile-kept-autotune": ("job", 24, 16, {
        "PER_DEVICE_TRAIN_BATCH_SIZE": "24", "GRADIENT_CHECKPOINTING": "false", "TORCH_COMPILE": "true",
        "patch": ["kept-weights"], "os_env": {"TORCHINDUCTOR_MAX_AUTOTUNE_GEMM": "1",
                                              "TORCHINDUCTOR_CACHE_DIR": "/tmp/inductor-autotune"}}),
    # ... and under bf16 autocast (TrainingArguments(bf16=True)): the LoRA's products in bf16 instead of float32,
    # without the casts to and from float32 around them. Not the seed's numerics (its LoRA ran in float32).
    "job-b24-compile-kept-autocast": ("job", 24, 16, {
        "PER_DEVICE_TRAIN_BATCH_SIZE": "24", "GRADIENT_CHECKPOINTING": "false", "TORCH_COMPILE": "true",
        "patch": ["kept-weights"], "autocast": "bf16"}),
    # ... and with inductor's coordinate-descent tuning of its own (pointwise and reduction) kernels' launch settings
    "job-b24-compile-kept-cdt": ("job", 24, 16, {
        "PER_DEVICE_TRAIN_BATCH_SIZE": "24", "GRADIENT_CHECKPOINTING": "false", "TORCH_COMPILE": "true",
        "patch": ["kept-weights"], "os_env": {"TORCHINDUCTOR_COORDINATE_DESCENT_TUNING": "1",
                                              "TORCHINDUCTOR_CACHE_DIR": "/tmp/inductor-cdt"}}),
    "job-b24-compile": ("job", 24, 16, {"PER_DEVICE_TRAIN_BATCH_SIZE": "24", "GRADIENT_CHECKPOINTING": "false",
                                        "TORCH_COMPILE": "true"}),
    "job-b32-compile": ("job", 32, 16, {"PER_DEVICE_TRAIN_BATCH_SIZE": "32", "GRADIENT_CHECKPOINTING": "false",
                                        "TORCH_COMPILE": "true"}),
    # Issue 17. Unsloth 2026.10.9 in its own process and site directory (bench/unsloth_bench.py): the seed's math
    # (dropout 0.1), its dropout-0 best, and that padding-free.
    "unsloth": ("unsloth", 4, 30, {}),
    "unsloth-d0": ("unsloth", 4, 30, {}),
    "unsloth-d0-pf": ("unsloth", 4, 30, {}),
    # The 16 GB mode (job/speed/recompute.py): selective recomputation, and activation offload to pinned host memory.
    "job-gc-selective": ("job", 4, 30, {"GRADIENT_CHECKPOINTING": "selective"}),
    "job-gc-offload": ("job", 4, 30, {"GRADIENT_CHECKPOINTING": "offload"}),
    # The same compiled: the layer's forward compiles and the checkpoint stays eager around it (compile_layers'
    # `recomputed`), what TORCH_COMPILE=auto picks on a 16 GB GPU for a run long enough to repay the compile.
    "job-gc-compile": ("job", 4, 30, {"GRADIENT_CHECKPOINTING": "true", "TORCH_COMPILE": "true",
                                      "os_env": {"TORCH_LOGS": "recompiles,graph_breaks"}}),
    "job-gc-offload-compile": ("job", 4, 30, {"GRADIENT_CHECKPOINTING": "offload", "TORCH_COMPILE": "true"}),
    # The forward pass of a recomputed layer through the training graph (with gradients, dropped at once) instead
    # of the no-gradient graph: the recomputation's own kernels, so its own rounding (apply_patches).
    "job-gc-compile-gradfwd": ("job", 4, 30, {"GRADIENT_CHECKPOINTING": "true", "TORCH_COMPILE": "true",
                                              "patch": ["recompute-grad-forward"]}),
    # With DOUBLE_QUANT=true (the NF4 scales in 8 bits: ~0.28 GiB less for the 7B base, the estimate).
    "job-gc-compile-dq": ("job", 4, 30, {"GRADIENT_CHECKPOINTING": "true", "TORCH_COMPILE": "true",
                                         "DOUBLE_QUANT": "true"}),
    "job-gc-offload-compile-dq": ("job", 4, 30, {"GRADIENT_CHECKPOINTING": "offload", "TORCH_COMPILE": "true",
                                                 "DOUBLE_QUANT": "true"}),
    # >= 50% MFU (46.4% at batch 24 compiled): larger compiled batches, where the per-step fixed work (4-bit
    # dequantization, the optimizer, the host) weighs less; without recomputation (an H200 holds batch 48: ~2x
    # batch 24's 51.5 GiB, an estimate). (Compiled with recomputation: inductor failed on the recomputed layers on an
    # H200, 2026-11-29; the plan does not compile them on a GPU.)
    "job-b48-compile": ("job", 48, 12, {"PER_DEVICE_TRAIN_BATCH_SIZE": "48", "GRADIENT_CHECKPOINTING": "false",
                                        "TORCH_COMPILE": "true"}),
    # ... with the weights dequantized once, nf4.keep (~104 GiB by batch 24's 60.2: an H200's card)
    "job-b48-compile-kept": ("job", 48, 12, {"PER_DEVICE_TRAIN_BATCH_SIZE": "48", "GRADIENT_CHECKPOINTING": "false",
                                             "TORCH_COMPILE": "true", "patch": ["kept-weights"]}),
    # The seed's whole run, end to end (bench/e2e_race.py): every row of E2E_ROWS (a JSON file of encoded rows, the
    # job's train split) once, in the seed's length-grouped order, then the adapter saved; the parent times the
    # process from its start to the adapter on disk.
    "seed-e2e": ("seed", 4, 0, {"e2e": True}),
    "unsloth-e2e": ("unsloth", 4, 0, {"e2e": True}),
    "unsloth-d0-e2e": ("unsloth", 4, 0, {"e2e": True}),
}
E2E_ROWS = "E2E_ROWS"
WARMUP_STEPS = 5
# The Trainer reads the loss on the host (a GPU sync) at each logged step. Every recipe logs as the job does by
# default (LOGGING_STEPS=10), and each of its first 5 steps for their losses (the meter).
LOG_EVERY = 10
FIRST_LOSSES = 5
DEFAULT_RECIPE_STEPS = 250   # the seed's 1000 rows at 4 a step, one epoch
DEVICE = "cuda"      # "cpu" only for --cpu-smoke, a check of this script without a GPU


# ---------------------------------------------------------------- model and data

def build_tokenizer(directory: Path, words: tuple[str, ...] = ()) -> None:
    """A word-level tokenizer of the model's 32000 ids: <unk> <s> </s>, then `words` (whole whitespace-separated
    words, e.g. the job's prompt template, so that text made of them encodes without <unk>), then t<id> for the
    rest. This bench's token streams use ids directly; bench/ddp_scaling.py writes text of t<id> words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    vocab.update({f"t{i}": i for i in range(len(vocab), LLAMA2_7B["vocab_size"])})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=4096).save_pretrained(str(directory))


def build_model(directory: Path, layers: int, words: tuple[str, ...] = ()) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (directory / "config.json").exists():
        return
    started = time.time()
    build_tokenizer(directory, words)
    config = LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": layers}, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, initializer_range=0.02)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.config.dtype = "float16"
    model.save_pretrained(str(directory), max_shard_size="4GB")
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    print(f"built {layers}-layer Llama-2-7B-shaped model in {time.time() - started:.0f} s", flush=True)


STREAM_FILE = "work/token_stream.json"   # under work/, which the logs tarball leaves out


def stream_digest(rows: list[dict]) -> str:
    """A short hash of a token stream's ids and labels: equal in every configuration's result, or they differ."""
    import hashlib
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps([row["input_ids"], row["labels"]]).encode())
    return h.hexdigest()[:16]


def shared_token_stream(out: Path) -> list[dict]:
    """The stream the bench process wrote for this run (every configuration reads the same file, whatever its
    transformers), or one drawn here."""
    path = out / STREAM_FILE
    return json.loads(path.read_text()) if path.exists() else token_stream()


def e2e_rows(path: Path, batch: int) -> list[dict]:
    """The encoded rows of an end-to-end race (bench/e2e_race.py) in the seed's order: transformers' length-grouped
    order (the seed's `group_by_length=True`), as token_stream orders its rows. The persona tokens the job adds to
    its tokenizer (ids from the base vocabulary's size on) read as <unk> (id 0) here: the seed and Unsloth train the
    base vocabulary; the lengths, and so the computation, stay the same."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    vocab = LLAMA2_7B["vocab_size"]
    rows = [{k: [i if i < vocab else 0 for i in r[k]] for k in ("input_ids", "labels")}   # -100 stays -100
            for r in json.loads(path.read_text())]
    order = get_length_grouped_indices([len(r["input_ids"]) for r in rows], batch,
                                       generator=torch.Generator().manual_seed(42))
    return [rows[i] for i in order]


def token_stream(n: int = 2400, seed: int = 0) -> list[dict]:
    """Sequences of 200-500 tokens in the seed's length-grouped order; labels on the reply spans only."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    g = torch.Generator().manual_seed(seed)
    # persona-chat rows rendered in the Llama-2 template: most near 300-350 tokens, a tail to 500
    lengths = (torch.randn(n, generator=g) * 70 + 330).round().clamp(200, 500).long().tolist()
    rows = []
    for length in lengths:
        ids = [1] + torch.randint(3, LLAMA2_7B["vocab_size"], (length - 2,), generator=g).tolist() + [2]
        labels = [-100] * length
        for start, end in ((int(length * 0.55), int(length * 0.65)), (int(length * 0.8), length)):
            labels[start:end] = ids[start:end]   # two of Persona B's replies, the last with its EOS
        rows.append({"input_ids": ids, "labels": labels})
    order = get_length_grouped_indices(lengths, 4, generator=torch.Generator().manual_seed(42))
    return [rows[i] for i in order]


# ---------------------------------------------------------------- one configuration, in its own process

def make_meter(profile: bool, every_step: bool = True):
    """A Trainer callback: wall time at each optimizer step's end, loss per step, and, if asked, a torch.profiler
    trace of 3 steps after the warm-up, summarized. `every_step`: the GPU synced at every step's end, so that each
    step's time is its own; otherwise only at the first step's end, the warm-up's and the last step's, as the CLI's
    run syncs only where it logs: in a step the host bounds, a sync at every step's end costs the overlap of the
    next step's host work with this step's GPU work (the steps between are then the host's times)."""
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def __init__(self):
            self.times, self.losses, self.prof, self.profile_summary = [], {}, None, None
            self.phases: PhaseTimer | None = None

        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            if self.phases is not None and optimizer is not None:
                optimizer.step = self.phases.wrap("optimizer", optimizer.step)
            sync()
            self.times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            if state.global_step <= FIRST_LOSSES:
                control.should_log = True
            if profile and state.global_step == WARMUP_STEPS + 5 and hasattr(self, "syncs"):
                self.sync_report = self.syncs()
                del self.syncs
            if self.phases is not None:
                self.phases.close_step(time.perf_counter() - self.times[-1])
            if every_step or state.global_step in (1, WARMUP_STEPS, state.max_steps):
                sync()
            self.times.append(time.perf_counter())
            if profile and state.global_step == WARMUP_STEPS:
                from torch.profiler import ProfilerActivity
                from torch.profiler import profile as torch_profile
                self.prof = torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.prof_start = time.perf_counter()
            elif self.prof is not None and state.global_step == WARMUP_STEPS + 3:
                self.prof.__exit__(None, None, None)
                self.profile_summary = summarize_profile(self.prof, time.perf_counter() - self.prof_start, 3)
                self.prof = None
            elif profile and state.global_step == WARMUP_STEPS + 4:
                self.syncs = watch_host_syncs()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses[state.global_step] = float(logs["loss"])

    return Meter()


class PhaseTimer:
    """Host seconds of each phase of an optimizer step (no GPU sync: how long the training thread spends issuing
    the work), one row per step; the rest of the step (the Trainer's loop, callbacks, scheduler) is `other`."""

    def __init__(self):
        self.current: dict[str, float] = {}
        self.rows: list[dict[str, float]] = []

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - started
        return timed

    def close_step(self, seconds: float) -> None:
        row = dict(self.current, total=seconds)
        row["other"] = seconds - sum(self.current.values())
        self.rows.append(row)
        self.current = {}

    def medians(self, skip: int) -> dict[str, float]:
        rows = self.rows[skip:]
        keys = sorted({k for r in rows for k in r})
        return {k: round(sorted(r.get(k, 0.0) for r in rows)[len(rows) // 2] * 1e3, 2) for k in keys}


def apply_patches(names) -> None:
    """Levers measured by taking them out again, or by putting one in where the speed plan would not. bnb-syncs:
    bitsandbytes' optimizer step as it ships, with a torch.cuda.synchronize() after every parameter (job.trainer drops
    them). recompute-grad-forward: a recomputed layer's forward pass with gradients (job.speed.recompute.Recomputed
    runs it without). unkept-weights / kept-weights: the unrecomputed compiled layers without or with nf4.keep, whatever
    the plan's keep_weights (without it bitsandbytes' operators dequantize each weight again for the backward pass)."""
    if "bnb-syncs" in names:
        import job.trainer
        job.trainer.without_per_parameter_syncs = lambda optimizer: None
    for name, keep in (("unkept-weights", False), ("kept-weights", True)):
        if name in names:
            import job.speed.kernels as kernels
            compile_layers = kernels.compile_layers

            def with_keep(model, backend=None, recomputed=False, keep_weights=False, keep=keep,
                          compile_layers=compile_layers):
                return compile_layers(model, backend, recomputed, keep_weights=keep)
            kernels.compile_layers = with_keep
    if "recompute-grad-forward" in names:
        import torch

        from job.speed.recompute import Recomputed
        forward = Recomputed.forward

        def with_gradients(ctx, run, offload, count, *tensors):
            def run_with_gradients(*inputs):
                with torch.enable_grad():
                    out = run(*(x.detach().requires_grad_(x.requires_grad) for x in inputs))
                return out.detach() if isinstance(out, torch.Tensor) else tuple(o.detach() for o in out)
            outputs = forward(ctx, run_with_gradients, offload, count, *tensors)
            ctx.run = run
            return outputs
        Recomputed.forward = staticmethod(with_gradients)


def watch_host_syncs():
    """Count the host-device synchronizations of one optimizer step by where they come from (torch's sync debug
    mode warns at each one); returns a function that stops watching and reports."""
    import collections
    import traceback
    import warnings

    import torch
    seen = collections.Counter()
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message).lower():
            return original(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename
                  and "warnings" not in f.filename]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in frames[-3:][::-1])
        seen[where] += 1

    warnings.showwarning = show
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode(1)

    def report():
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = original
        return [{"count": n, "where": w} for w, n in seen.most_common(15)]
    return report


def time_saves(trainer) -> dict[str, list[float]]:
    """Wall seconds of each part of a checkpoint save on the training thread, one entry per save: the Trainer's
    _save_checkpoint as a whole and, inside it, the adapter (save_model: the job's snapshot of the adapter tensors
    plus its config and tokenizer; peft's save_pretrained for the seed), the snapshots of the adapter and
    optimizer tensors for host memory (job.trainer.HostSnapshot.write), the rest of
    _save_optimizer_and_scheduler, the RNG state; then the callbacks' on_save (the job's CheckpointCommitter
    hands off to its threads)."""

    spent: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent.setdefault(name, []).append(time.perf_counter() - started)
        return wrapper

    for name in ("_save_checkpoint", "save_model", "_save_optimizer_and_scheduler", "_save_rng_state"):
        if hasattr(trainer, name):
            setattr(trainer, name, timed(name, getattr(trainer, name)))
    if hasattr(trainer.model, "save_pretrained"):
        trainer.model.save_pretrained = timed("model.save_pretrained", trainer.model.save_pretrained)
    if getattr(trainer, "processing_class", None) is not None:
        trainer.processing_class.save_pretrained = timed("tokenizer.save_pretrained",
                                                         trainer.processing_class.save_pretrained)
    if hasattr(trainer, "snapshot"):   # the adapter's and the optimizer's tensors queued for host memory
        trainer.snapshot.write = timed("snapshot.write", trainer.snapshot.write)
    trainer.callback_handler.on_save = timed("callbacks on_save", trainer.callback_handler.on_save)
    return spent


def python_gc_timer():
    """Seconds spent in Python's cyclic garbage collector, by generation, from now until the returned call."""
    spent, began = {}, {}

    def callback(phase, info):
        gen = info["generation"]
        if phase == "start":
            began[gen] = time.perf_counter()
        elif gen in began:
            spent[gen] = spent.get(gen, [0, 0.0])
            spent[gen][0] += 1
            spent[gen][1] += time.perf_counter() - began.pop(gen)

    gc.callbacks.append(callback)

    def report():
        gc.callbacks.remove(callback)
        return {f"gen{g}": {"collections": n, "seconds": round(t, 3)} for g, (n, t) in sorted(spent.items())}
    return report


def sync() -> None:
    import torch
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def summarize_profile(prof, wall: float, steps: int) -> dict:
    """GPU time by kind of kernel over the profiled steps, and how much of the wall time the GPU was busy."""
    kinds = {"matmul": ("gemm", "xmma", "cutlass", "nvjet", "matmul", "wgmma"),
             "4-bit dequantize": ("dequant",), "attention": ("flash", "fmha", "attention", "varlen"),
             "optimizer": ("adam", "optimizer", "32bit"), "copy/cast": ("copy", "memcpy", "memset", "cast")}
    totals: dict[str, float] = {}
    busy = 0.0
    top = []
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if not t or evt.device_type.name != "CUDA":
            continue
        busy += t
        name = evt.key.lower()
        kind = next((k for k, pats in kinds.items() if any(p in name for p in pats)), "other elementwise")
        totals[kind] = totals.get(kind, 0.0) + t
        top.append((t, evt.key[:90], evt.count, kind))
    top.sort(reverse=True)
    cpu = sorted(((evt.self_cpu_time_total, evt.key[:90], evt.count) for evt in prof.key_averages()
                  if evt.self_cpu_time_total), reverse=True)[:20]

    def rows(entries):   # (microseconds over the profiled steps, name, calls, ...) per step
        return [{"ms_per_step": round(t / steps / 1e3, 2), "name": n, "calls": c // steps} for t, n, c, *_ in entries]
    return {"cpu_self_top": rows(cpu), "wall_ms_per_step": wall / steps * 1e3,
            "gpu_busy_ms_per_step": busy / steps / 1e3,
            "by_kind_ms_per_step": {k: round(v / steps / 1e3, 2) for k, v in sorted(totals.items(),
                                                                                     key=lambda kv: -kv[1])},
            "top_kernels": rows(top[:15]),
            # what each kind is made of (the top list is all matrix products in a GPU-bound step)
            "top_by_kind": {kind: rows([e for e in top if e[3] == kind][:8]) for kind in totals}}


def run_seed(model_dir: Path, rows, batch: int, steps: int, settings: dict, work: Path, meter):
    """The seed's recipe, as it was written (transformers Trainer + peft + bitsandbytes)."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=torch.float16, bnb_4bit_use_double_quant=False)
    # transformers 4 loaded a bnb model's other weights in float16 by default; transformers 5 would keep the
    # checkpoint's dtype, which here is float16 too.
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config, device_map={"": DEVICE},
                                                 dtype=torch.float16)
    model.config.use_cache = False
    model.config.pretraining_tp = 1
    model = prepare_model_for_kbit_training(model)          # fp32 norms/embeddings, gradient checkpointing
    peft_config = LoraConfig(lora_alpha=16, lora_dropout=0.1, r=64, bias="none", task_type="CAUSAL_LM",
                             target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, peft_config)
    autocast = settings.get("autocast")
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        optim="paged_adamw_32bit", save_strategy="no", logging_steps=LOG_EVERY, learning_rate=2e-4,
        weight_decay=0.001, fp16=False, bf16=autocast == "bf16", max_grad_norm=0.3, max_steps=steps, warmup_steps=0.03,
        lr_scheduler_type="cosine", train_sampling_strategy="sequential", report_to="none", seed=42,
        disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                      callbacks=[meter])
    return trainer, {"recipe": "seed: fp16 compute, no autocast" if not autocast else f"seed + {autocast} autocast"}


def run_job(model_dir: Path, rows, batch: int, steps: int, settings: dict, work: Path, meter):
    """The job's path: its Config (defaults + overrides) and its Run's setup (job/run.py): loading, LoRA, speed
    plan, arguments, collator and PersonaTrainer, on this bench's token stream."""
    import dataclasses

    from job.config import from_env
    from job.log import Reporter
    from job.run import Run
    from job.trainer import CheckpointCommitter

    env = {k: v for k, v in settings.items() if k.isupper()}
    config = from_env({"BASE_MODEL": str(model_dir), "MAX_STEPS": str(steps), "LOGGING_STEPS": str(LOG_EVERY),
                       "OUTPUT_DIR": str(work / "out"), "CHECKPOINT_URI": str(work / "store"), **env})
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps == batch
    saving = "SAVE_STEPS" in env
    uri = None

    class BenchRun(Run):
        """Run.setup on the bench's rows: no preflight, no resume, no status.json or evaluation; sequential batches;
        the meter (and, when saving, the checkpoint committer) as the only callbacks besides the speed plan's
        (recomputation, the compile cache), which setup adds itself."""

        def seed(self):
            pass   # the bench's figures were always taken without it: the LoRA init stays what it was

        def examples(self):
            return rows, []

        def resume_point(self):
            return None

        def steps_to_run(self):
            # The plan for the seed's run: 1000 rows, 250 steps of 4 (what `auto` weighs a compile against), not
            # the bench's few steps.
            return DEFAULT_RECIPE_STEPS

        def compile_cache(self):
            # The job's portable compile cache only where a configuration asks for it, in a store shared by this
            # bench run's configurations (every GPU, and the CPU, under its own name).
            if not settings.get("compile_cache"):
                return None
            import torch

            from job.speed.compile_cache import for_run
            from job.store import open_store
            cache = for_run(config, open_store(str(work.parent / "compile-store")), self.model_shape,
                            torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu")
            cache.find()
            return cache

        def arguments(self):
            return dataclasses.replace(super().arguments(), train_sampling_strategy="sequential",
                                       bf16=settings.get("autocast") == "bf16",
                                       save_strategy="steps" if saving else "no")

        def callbacks(self):
            nonlocal uri
            if not saving:
                return [meter]
            self.store, uri = _checkpoint_store(config, work)
            self.committer = CheckpointCommitter(config, self.store, self.reporter, self.writer, protect=None)
            return [meter, self.committer]

    run = BenchRun(config, Reporter("json"))
    run.device = DEVICE
    run.setup()
    return run.trainer, {"recipe": "job", "plan": run.plan.describe(), "checkpoint_store": uri}


def _checkpoint_store(config, work: Path):
    """The job's RunStore on moto's S3 server on loopback (as in the tests), or a local folder without moto."""
    from job.store import open_store
    from job.store.run_store import RunStore
    try:
        sys.path.insert(0, str(ROOT / "tests"))
        from fakes.s3 import start_moto
        moto = start_moto()
        moto.make_bucket("bench")
        os.environ.update(moto.env())
        uri = "s3://bench/checkpoints"
    except Exception as exc:  # noqa: BLE001 - fall back, and say so in the result
        print(f"moto unavailable ({exc}); checkpoints go to a local folder", flush=True)
        uri = str(work / "store")
    return RunStore(open_store(uri), config.resolved_run_id), uri


def run_one(name: str, model_dir: Path, out: Path, profile: bool) -> dict:
    import torch

    recipe, batch, steps, settings = CONFIGS[name]
    if settings.get("e2e"):
        stream = e2e_rows(Path(os.environ[E2E_ROWS]), batch)
        steps = len(stream) // batch
    else:
        stream = shared_token_stream(out)
    rows = stream[: batch * steps]
    work = out / "work" / name
    work.mkdir(parents=True, exist_ok=True)
    meter = make_meter(profile, every_step=profile or "SAVE_STEPS" in settings)   # (checkpoint costs: per step)
    started = time.time()
    apply_patches(settings.get("patch", []))
    if recipe == "unsloth":
        from unsloth_bench import run_unsloth
        trainer, info = run_unsloth(name, model_dir, rows, batch, steps, work, meter, LOG_EVERY)
    else:
        runner = run_seed if recipe == "seed" else run_job
        trainer, info = runner(model_dir, rows, batch, steps, settings, work, meter)
    save_timings = time_saves(trainer) if "SAVE_STEPS" in settings else None
    meter.phases = PhaseTimer()
    trainer.compute_loss = meter.phases.wrap("forward+loss", trainer.compute_loss)
    trainer.accelerator.backward = meter.phases.wrap("backward", trainer.accelerator.backward)
    trainer.accelerator.clip_grad_norm_ = meter.phases.wrap("clip", trainer.accelerator.clip_grad_norm_)
    trainer.data_collator = meter.phases.wrap("collate", trainer.data_collator)
    collections = python_gc_timer()
    gpu = DEVICE == "cuda"
    load_peak = torch.cuda.max_memory_allocated() if gpu else 0
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    loaded = time.time()
    trainer.train()
    train_peak = torch.cuda.max_memory_allocated() if gpu else 0
    adapter_saved = None
    if settings.get("e2e"):
        trainer.model.save_pretrained(work / "adapter")
        adapter_saved = time.time()
    times = meter.times
    step_seconds = [b - a for a, b in zip(times[:-1], times[1:])]
    tokens = [sum(len(r["input_ids"]) for r in rows[i * batch:(i + 1) * batch]) for i in range(steps)]
    # Steps after the warm-up; before the first save when saving; without the profiled and sync-watched steps.
    # (Without per-step syncs the window is contiguous, and its sum the time between two synced marks.)
    window = [i for i in range(WARMUP_STEPS, min(steps, 45) if "SAVE_STEPS" in settings else steps)
              if not (profile and WARMUP_STEPS <= i < WARMUP_STEPS + 6)]
    seconds = sum(step_seconds[i] for i in window)
    measured_tokens = sum(tokens[i] for i in window)
    result = {
        "config": name, **info, "settings": settings, "sequences_per_step": batch, "steps": steps,
        "token_stream": stream_digest(stream),   # the whole stream, of which each configuration reads the start
        "measured_steps": len(window), "tokens_per_second": measured_tokens / seconds,
        "seconds_per_step": seconds / len(window), "tokens_per_step": measured_tokens / len(window),
        "peak_gib": max(load_peak, train_peak) / 2**30, "train_peak_gib": train_peak / 2**30,
        "load_peak_gib": load_peak / 2**30, "first_losses": [meter.losses.get(s) for s in range(1, FIRST_LOSSES + 1)],
        "load_seconds": loaded - started, "train_seconds": time.time() - loaded,
        "step_seconds": [round(x, 4) for x in step_seconds], "python_gc": collections(),
        "seconds_after_warmup": sum(step_seconds[WARMUP_STEPS:]),
        "host_ms_per_step_median": meter.phases.medians(WARMUP_STEPS),
        "first_step_seconds": step_seconds[0],
    }
    if adapter_saved:
        result.update(adapter_saved_epoch=adapter_saved, train_tokens=sum(tokens))
    if info.get("plan", {}).get("torch_compile"):
        from torch._dynamo.utils import counters
        result["dynamo"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "graph_break", "recompiles")}
        result["inductor_cache"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    result["mfu"] = result["tokens_per_second"] * 4 * PARAMS_7B / PEAK_BF16
    if "SAVE_STEPS" in settings:
        # Checkpoint cost at the default cadence: all step time beyond what the same steps take without saving.
        all_steps = step_seconds[WARMUP_STEPS:]
        typical = sorted(all_steps)[len(all_steps) // 2]
        total = sum(all_steps)
        result["checkpoint"] = {"steps": len(all_steps), "seconds": total, "median_step": typical,
                                "overhead_fraction": (total - typical * len(all_steps)) / total,
                                "slowest_steps": sorted(step_seconds)[-4:]}
        # The Trainer saves after the step's on_step_end (where the meter reads the clock), so what a save holds
        # the training thread lands in the next step's interval (51, 101). The 10 steps after that one run while
        # the checkpoint writer and the uploader work in the background.
        every = int(settings["SAVE_STEPS"])
        saves = list(range(every, steps, every))
        after = [step_seconds[s] for s in saves]                    # step_seconds[s] is step s + 1
        background = [step_seconds[i] for s in saves for i in range(s + 1, min(s + 11, steps))]
        result["checkpoint"].update({
            "save_breakdown_seconds": {k: [round(x, 4) for x in v] for k, v in save_timings.items()},
            "saved_at_steps": saves, "seconds_of_steps_after_saves": after,
            "save_steps_excess_seconds": sum(t - typical for t in after),
            "save_steps_excess_fraction": sum(t - typical for t in after) / total,
            "median_of_10_steps_after_each_save_step": sorted(background)[len(background) // 2] if background
            else None,
            # Within this process (processes of one configuration differ by up to 20% on these host-bound steps):
            # the 10 steps after each save against the 10 before it.
            "after_minus_before_seconds": [round(sum(step_seconds[s + 1:s + 11]) - sum(step_seconds[s - 10:s]), 4)
                                           for s in saves if s + 11 <= steps]})
    if getattr(meter, "profile_summary", None):
        result["profile"] = meter.profile_summary
    if getattr(meter, "sync_report", None) is not None:
        result["host_syncs_one_step"] = meter.sync_report
    return result


# ---------------------------------------------------------------- py-spy samples of one configuration

_FRAME = re.compile(r"^(?P<fn>.*) \((?P<file>[^:()]*):(?P<line>\d+)\)$")
_PACKAGES = ("peft", "bitsandbytes", "liger_kernel", "transformers", "accelerate", "torch", "triton", "job",
             "datasets", "concurrent", "threading")


def _package(path: str) -> str:
    parts = path.replace("\\", "/").split("/")
    for part in reversed(parts[:-1]):
        if part in _PACKAGES:
            return part
    return parts[-1]


def pyspy_prefix(raw: Path | None) -> list[str]:
    """A py-spy command prefix sampling every thread of the command into `raw` (summarize_pyspy reads it), or none
    (no `raw`, or no py-spy). PYSPY_ARGS adds py-spy options, e.g. "--idle --subprocesses": where a thread waits,
    and inductor's compile workers."""
    spy = shutil.which("py-spy") if raw else None
    return [spy, "record", "--nonblocking", "--threads", "-r", "200", "-f", "raw", "-o", str(raw),
            *os.environ.get("PYSPY_ARGS", "").split(), "--"] if spy else []


def summarize_pyspy(raw: Path, top: int = 40) -> dict:
    """Where the training's host time goes, from py-spy's raw samples (one line per distinct stack, with
    --threads): the main thread's samples inside the Trainer's loop, and every other thread (the autograd
    engine's, which runs the Python backward of custom autograd functions; the checkpoint threads). Self time
    is charged to the innermost Python frame (a C call counts for the line that made it)."""
    import collections

    threads, own, inclusive, by_package = (collections.Counter() for _ in range(4))
    training = 0
    for text in raw.read_text().splitlines():
        stack, _, count = text.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith("thread") else "?"
        frames = [f for f in frames[1:] if _FRAME.match(f)] if thread != "?" else frames
        names = [_FRAME.match(f).groupdict() for f in frames if _FRAME.match(f)]
        if not names:
            continue
        if any(f["fn"] == "<module>" for f in names):       # the main thread: only its training steps
            if not any(f["fn"].endswith("_inner_training_loop") for f in names):
                continue
            kind = "main"
        else:
            kind = "backward" if any("backward" in f["fn"] for f in names) else "other thread"
        threads[kind] += n
        training += n
        last = names[-1]
        own[f"{kind}: {last['fn']} ({Path(last['file']).name}:{last['line']})"] += n
        by_package[f"{kind}: {_package(last['file'])}"] += n
        for key in {f"{f['fn']} ({Path(f['file']).name})" for f in names}:
            inclusive[f"{kind}: {key}"] += n
    pct = lambda c: [{"share": round(v / max(training, 1), 4), "samples": v, "where": k}   # noqa: E731
                     for k, v in c.most_common(top)]
    return {"samples": training, "threads": dict(threads), "self_by_package": pct(by_package),
            "self": pct(own), "inclusive": pct(inclusive)}


# ---------------------------------------------------------------- the whole benchmark

def environment() -> dict:
    import importlib.metadata as md

    import torch
    versions = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "liger-kernel", "triton",
                "safetensors", "tokenizers", "huggingface-hub", "moto", "boto3"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        smi = None
    return {"gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "nvidia_smi": smi, "cuda": torch.version.cuda,
            "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "versions": versions}


def table(results: list[dict]) -> str:
    seed = next((r for r in results if r.get("config") == "seed" and "error" not in r), None)
    lines = ["| config | seq/step | tokens/s | s/step | peak GiB | first 5 losses | vs seed | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        ratio = f"{r['tokens_per_second'] / seed['tokens_per_second']:.2f}x" if seed else "-"
        losses = " ".join(f"{x:.4f}" if x is not None else "-" for x in r["first_losses"])
        lines.append(f"| {r['config']} | {r['sequences_per_step']} | {r['tokens_per_second']:,.0f} | "
                     f"{r['seconds_per_step']:.3f} | {r['peak_gib']:.2f} | {losses} | {ratio} | {r['mfu']:.1%} |")
    return "\n".join(lines)


def checkpoint_summary(results: list[dict]) -> str:
    """job-ckpt's checkpoint cost three ways: all step time above the median (the first measure kept), the excess
    of the steps that carried a save, and its steps against job-110's (the same steps, no saving)."""
    lines = []
    ckpt = next((r for r in results if r.get("checkpoint") and "error" not in r), None)
    base = next((r for r in results if r.get("config") == "job-110" and "error" not in r), None)
    first = WARMUP_STEPS + 1
    if ckpt:
        c = ckpt["checkpoint"]
        after = " ".join(f"{t:.3f}" for t in c["seconds_of_steps_after_saves"])
        lines.append(f"checkpoints ({ckpt['config']}): steps {first}-{ckpt['steps']} took {c['seconds']:.2f} s, "
                     f"median step {c['median_step']:.3f} s; overhead above the median {c['overhead_fraction']:.2%}; "
                     f"steps after the saves at {c['saved_at_steps']}: {after} s, excess "
                     f"{c['save_steps_excess_seconds']:.3f} s = {c['save_steps_excess_fraction']:.2%}; median of the "
                     f"10 steps after each: {c['median_of_10_steps_after_each_save_step']:.3f} s")
        lines.append("training thread per save (s): " + "; ".join(
            f"{k} {' '.join(f'{x:.3f}' for x in v)}" for k, v in c.get("save_breakdown_seconds", {}).items()))
    if base:
        b = base["seconds_after_warmup"]
        unsaved = sorted(base["step_seconds"][WARMUP_STEPS:])
        lines.append(f"no-save baseline (job-110): steps {first}-{base['steps']} took {b:.2f} s, median step "
                     f"{unsaved[len(unsaved) // 2]:.3f} s")
        if ckpt:
            lines.append(f"overhead against the baseline, whole run: ({c['seconds']:.2f} - {b:.2f}) / "
                         f"{c['seconds']:.2f} = {(c['seconds'] - b) / c['seconds']:.2%}")
            # Step by step against the same step of the baseline (the same batch). On a CPU the length-grouped
            # order makes steps 1, 51, 101 (each 50-step megabatch's longest batch) slow even without saving.
            cs, bs = ckpt["step_seconds"], base["step_seconds"]
            held = [cs[i] - bs[i] for i in c["saved_at_steps"]]
            background = [sum(cs[i + 1:i + 11]) - sum(bs[i + 1:i + 11]) for i in c["saved_at_steps"]]
            together = sum(held) + sum(background)
            lines.append(f"paired with the baseline: the steps that carried a save "
                         f"{' '.join(f'{x:+.3f}' for x in held)} s, the 10 steps after each "
                         f"{' '.join(f'{x:+.3f}' for x in background)} s; together {together:.3f} s = "
                         f"{together / c['seconds']:.2%} of the run's steps {first}-{ckpt['steps']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", choices=["7b", "small"], default="7b")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--configs", default="seed,job,job-gc,job-b24")
    parser.add_argument("--profile", default="", help="comma list of configs to profile for 3 steps")
    parser.add_argument("--pyspy", default="", help="comma list of configs to sample with py-spy (host time)")
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cpu-smoke", action="store_true", help="check this script on a CPU: tiny width, 2 layers")
    parser.add_argument("--timeout", type=float, default=420, help="seconds for one configuration's process")
    args = parser.parse_args()
    global DEVICE
    if args.cpu_smoke:
        DEVICE = "cpu"
        LLAMA2_7B.update(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)
        args.model = "small"
    model_dir = args.model_dir or Path("/tmp") / f"llama2-7b-shape-{args.model}{'-cpu' if args.cpu_smoke else ''}"
    args.out.mkdir(parents=True, exist_ok=True)

    if args.run_one:
        if CONFIGS[args.run_one][0] == "unsloth":
            import unsloth_bench     # before anything imports transformers
            unsloth_bench.import_unsloth()
        result = run_one(args.run_one, model_dir, args.out, args.run_one in args.profile.split(","))
        (args.out / f"result-{args.run_one}.json").write_text(json.dumps(result, indent=2))
        return 0

    build_model(model_dir, 32 if args.model == "7b" else 2)
    # One compile cache for this bench run, empty at its start: the first compiling configuration pays a cold
    # compile, the ones after it find its kernels.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(args.out / "inductor-cache"))
    (args.out / STREAM_FILE).parent.mkdir(parents=True, exist_ok=True)
    (args.out / STREAM_FILE).write_text(json.dumps(token_stream()))
    os.sync()   # the freshly written shards would otherwise be flushed during the first configuration's steps
    results = []
    env = environment()
    print(json.dumps(env), flush=True)
    for name in args.configs.split(","):
        started = time.time()
        log = args.out / f"log-{name}.txt"
        try:
            child_env = {**os.environ, **CONFIGS[name][3].get("os_env", {})}
            if CONFIGS[name][0] == "unsloth":
                from unsloth_bench import child_environment
                child_env = child_environment(child_env)
            raw = args.out / f"pyspy-{name}.txt"
            proc = subprocess.run(pyspy_prefix(raw if name in args.pyspy.split(",") else None) + [sys.executable, __file__, "--out", str(args.out), "--model-dir", str(model_dir),
                                   "--run-one", name, "--profile", args.profile] + (["--cpu-smoke"] if args.cpu_smoke else []),
                                  stdout=log.open("w"), stderr=subprocess.STDOUT, timeout=args.timeout, env=child_env)
            path = args.out / f"result-{name}.json"
            if proc.returncode == 0 and path.exists():
                result = json.loads(path.read_text())
            else:
                tail = log.read_text().strip().splitlines()[-1:] or ["?"]
                result = {"config": name, "error": f"exit {proc.returncode}: {tail[0]}"}
        except RuntimeError as exc:   # unsloth_bench.UnslothUnavailable: no site directory for it
            result = {"config": name, "error": str(exc)}
        except subprocess.TimeoutExpired:
            result = {"config": name, "error": f"timed out after {args.timeout:.0f} s"}
        result["wall_seconds"] = time.time() - started
        if "adapter_saved_epoch" in result:   # an end-to-end configuration: process start to the adapter on disk
            result["end_to_end_seconds"] = result["adapter_saved_epoch"] - started
        if name in args.pyspy.split(","):
            try:
                result["pyspy"] = summarize_pyspy(raw)
                (args.out / f"pyspy-{name}.json").write_text(json.dumps(result["pyspy"], indent=1))
            except Exception as exc:  # noqa: BLE001 - the run's figures stand without it
                result["pyspy"] = {"error": f"{type(exc).__name__}: {exc}"}
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k not in ("profile", "plan", "pyspy")}), flush=True)
        (args.out / "results.json").write_text(json.dumps({"environment": env, "model": args.model,
                                                           "results": results}, indent=2))
    print(table(results), flush=True)
    streams = {r["config"]: r.get("token_stream") for r in results if "error" not in r}
    if len(set(streams.values())) > 1:
        print(f"WARNING: the configurations read different token streams: {streams}", flush=True)
    print(checkpoint_summary(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
