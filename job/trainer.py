"""The pieces we add to transformers.Trainer: arguments from our Config, the Trainer subclass, and callbacks for
stopping, committing checkpoints to the store in the background, and reporting progress."""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .config import Config
from .distributed import any_rank, barrier, split_batch
from .log import Reporter
from .status import Phase
from .speed.kernels import eager, without_per_parameter_syncs
from .speed.plan import SpeedPlan
from .speed.recompute import checkpoint_kwargs
from .speed.snapshot import CheckpointWriter, HostSnapshot
from .store.run_store import RunStore
from .store.uploader import BackgroundUploader


def training_arguments(config: Config, output_dir: Path, device: str, has_eval: bool,
                       plan: SpeedPlan, world_size: int = 1) -> TrainingArguments:
    gradient_checkpointing = plan.gradient_checkpointing
    batch, accumulation = split_batch(config, world_size)
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps if config.warmup_steps < 1 else int(config.warmup_steps),
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim=config.optim,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=None,           # retention is the store's job (CheckpointCommitter)
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_steps,
        seed=config.seed,
        data_seed=config.seed,
        bf16=False, fp16=False,          # compute dtype comes from the 4-bit config, as in the seed
        tf32=plan.tf32 if device == "cuda" else None,
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs=checkpoint_kwargs(plan.recompute) if gradient_checkpointing else None,
        use_cpu=device == "cpu",
        ddp_backend=("gloo" if device == "cpu" else "nccl") if world_size > 1 else None,
        ddp_find_unused_parameters=False if world_size > 1 else None,
        include_num_input_tokens_seen="non_padding",
        # Each host-side check of a GPU value waits for the GPU, and the batch-4 step is bound by the host, whose
        # lead over the GPU each wait gives up (docs/PERFORMANCE.md): the Trainer's NaN/inf filter of each step's
        # loss reads it twice a step (a NaN now shows in the logged loss instead of being averaged away), and
        # batches from pageable memory are copied to the GPU synchronously (pinned, they are queued).
        logging_nan_inf_filter=False,
        dataloader_pin_memory=device == "cuda",
        accelerator_config={"non_blocking": device == "cuda"},
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    if device == "cuda" and world_size == 1:
        # One process on a node with several GPUs: the Trainer would wrap the model in nn.DataParallel over all
        # of them (its n_gpu is every visible GPU), which the 4-bit model does not survive intact and which logged
        # twice the loss on 2 GPUs (docs/PERFORMANCE.md). One process trains on one GPU; more is NPROC_PER_NODE.
        _ = args.device   # let TrainingArguments count the GPUs first, then keep to one
        args._n_gpu = 1
    return args


def planned_steps(config: Config, rows: int, world_size: int) -> int:
    """The optimizer steps the whole run takes, as the Trainer will count them: MAX_STEPS, or the epochs over the
    batches each process reads (its share of the rows, in micro-batches, grouped by gradient accumulation). The
    speed plan needs the number before the Trainer exists (it decides how the model is loaded); a test holds the
    two to the same count."""
    if config.max_steps > 0:
        return config.max_steps
    batch, accumulation = split_batch(config, world_size)
    micro_batches = math.ceil(math.ceil(rows / world_size) / batch)
    return math.ceil(config.num_train_epochs * max(math.ceil(micro_batches / accumulation), 1))


class PersonaTrainer(Trainer):
    """Trainer whose checkpoints hold only the adapter (with the persona token rows), not the resized
    embedding matrices that peft would otherwise add to every checkpoint. `checkpoint_writer` finishes their
    files off the training thread; the CheckpointCommitter that uploads them must be given the same one."""

    def __init__(self, *args, checkpoint_writer: CheckpointWriter | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)
        self._flops_per_token: int | None = None
        self._in_checkpoint = False
        self.checkpoint_writer = checkpoint_writer or CheckpointWriter()
        self.snapshot = HostSnapshot(self.checkpoint_writer)

    def train(self, *args, **kwargs):
        # The loaded model is millions of long-lived Python objects; every full pass of the cyclic garbage
        # collector over them stalled training (docs/PERFORMANCE.md, "The levers"). Frozen, they are skipped.
        gc.collect()
        gc.freeze()
        try:
            return super().train(*args, **kwargs)
        finally:
            gc.unfreeze()

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        without_per_parameter_syncs(optimizer)
        return optimizer

    def evaluate(self, *args, **kwargs):
        with eager():   # compiled layers would compile again for no-grad evaluation batches
            return super().evaluate(*args, **kwargs)

    def _track_num_input_tokens(self, inputs):
        # The Trainer counts a batch's non-padding tokens on the GPU and reads the count back (.item()): a wait for
        # the GPU every step. A padding-free batch has no padding, so its count is its length, known on the host.
        ids = inputs.get("input_ids")
        if (self.args.include_num_input_tokens_seen == "non_padding" and self.args.world_size == 1
                and "cu_seq_lens_q" in inputs and "attention_mask" not in inputs and ids is not None):
            self.state.num_input_tokens_seen += ids.numel()
            return
        super()._track_num_input_tokens(inputs)

    def floating_point_ops(self, inputs) -> int:
        # The Trainer asks every micro-step, and transformers walks every module and parameter to answer; the
        # count never changes, so count once.
        if self._flops_per_token is None:
            self._flops_per_token = 6 * self.model.num_parameters(exclude_embeddings=True)
        return self._flops_per_token * inputs["input_ids"].numel()

    def _save_checkpoint(self, *args, **kwargs):
        self._in_checkpoint = True
        try:
            return super()._save_checkpoint(*args, **kwargs)
        finally:
            self._in_checkpoint = False
            self.snapshot.submit()   # the adapter and optimizer files, written once both snapshots are taken

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # torch.save of the optimizer state was most of what a checkpoint cost the training thread. Snapshot it
        # now, since the next step changes it, and write it from the checkpoint writer, which hands the folder to
        # the uploader only once the file is complete.
        if not self.args.should_save or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        self.snapshot.write("optimizer", self.optimizer.state_dict(), torch.save,
                            os.path.join(output_dir, OPTIMIZER_NAME))
        torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # The adapter's tensors, like the optimizer's, are snapshotted here and written by the checkpoint writer;
        # its config (what peft's save_pretrained writes beside them) and the tokenizer are small and written now.
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        output_dir = output_dir or self.args.output_dir
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.snapshot.write("adapter", get_peft_model_state_dict(self.model, save_embedding_layers=False),
                            save_file, os.path.join(output_dir, "adapter_model.safetensors"), {"format": "pt"})
        if not self._in_checkpoint:
            self.snapshot.submit()
        adapter_config = copy.copy(self.model.peft_config["default"])
        adapter_config.inference_mode = True
        adapter_config.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)


class StopCallback(TrainerCallback):
    """On a signal, end after the optimizer step in flight, with a checkpoint of it."""

    def __init__(self, stop):
        self.stop = stop

    def on_step_end(self, args, state, control, **kwargs):
        if any_rank(bool(self.stop.received)):   # every rank stops at the same step
            self.stop.received = self.stop.received or "a signal to another rank"
            control.should_save = True
            control.should_training_stop = True
        if state.global_step >= state.max_steps:
            # The last step is always committed: a stop during the final evaluation costs no training.
            control.should_save = True
        return control


class EvaluationCallback(TrainerCallback):
    """EVAL_AT_CHECKPOINTS: the persona evaluation of each checkpoint (rank 0's alone, which holds the evaluator),
    stored in it as evaluation.json. Skipped for the checkpoint a stop signal asks for: that one must be committed
    within the budget."""

    def __init__(self, evaluator, stop, reporter: Reporter, status):
        self.evaluator, self.stop, self.reporter, self.status = evaluator, stop, reporter, status

    def on_save(self, args, state, control, model=None, **kwargs):
        from .evaluate import EvaluationStopped, brief

        if self.stop.received:
            return control
        try:
            result = self.evaluator.run(model, should_stop=lambda: self.stop.received)
        except EvaluationStopped:
            return control
        step = state.global_step
        local = Path(args.output_dir) / f"checkpoint-{step}"
        (local / "evaluation.json").write_text(json.dumps({"step": step, **result}, indent=2))
        self.reporter.event("evaluation", f"persona evaluation at step {step}", step=step, **brief(result))
        self.status.write(evaluation={"step": step, **brief(result)})
        return control


class CheckpointCommitter(TrainerCallback):
    """Hands each checkpoint the Trainer writes to the background uploader, once `writer` (PersonaTrainer's) has
    finished its files; prunes after each commit."""

    def __init__(self, config: Config, run_store: RunStore, reporter: Reporter, writer: CheckpointWriter,
                 protect: int | None, is_main: bool = True):
        self.config, self.run_store, self.reporter, self.protect = config, run_store, reporter, protect
        self.writer = writer
        # Only rank 0 commits; the other ranks' part of a checkpoint (their RNG state) is in the same folder.
        self.uploader = (BackgroundUploader(run_store, on_committed=self._committed, isolate=True)
                         if is_main else None)
        self.local_dirs: dict[int, Path] = {}

    @property
    def last_committed(self) -> int | None:
        committed = self.uploader.last_committed() if self.uploader else None
        return committed or (self.protect if self.protect else None)

    def clean_leftovers(self) -> None:
        if self.uploader is None:
            return
        removed = self.run_store.clean_uncommitted()
        if removed:
            self.reporter.event("checkpoint", f"removed {len(removed)} uncommitted checkpoint leftover(s)")

    def on_save(self, args, state, control, **kwargs):
        barrier()   # every rank has written its share of the checkpoint
        if self.uploader is None:
            return control
        step = state.global_step
        local = Path(args.output_dir) / f"checkpoint-{step}"
        self.local_dirs[step] = local
        # After the writer has finished this checkpoint's files.
        self.writer.submit(self.uploader.submit, step, local, self.config.fingerprint())
        return control

    def _committed(self, step: int) -> None:
        self.reporter.event("checkpoint", f"committed step {step}", step=step)
        deleted = self.run_store.prune(self.config.save_total_limit,
                                       protect=[self.protect] if self.protect else [])
        if deleted:
            self.reporter.event("checkpoint", f"retention removed steps {deleted}")
        for old in [s for s in self.local_dirs if s <= step]:
            shutil.rmtree(self.local_dirs.pop(old), ignore_errors=True)

    def wait(self, timeout: float | None) -> bool:
        started = time.monotonic()
        if not self.writer.wait(timeout):
            return False
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        return self.uploader.wait(left) if self.uploader else True

    def errors(self):
        return self.writer.errors() + (self.uploader.errors() if self.uploader else [])

    def close(self) -> None:
        self.writer.close()
        if self.uploader:
            self.uploader.close()


class ReportCallback(TrainerCallback):
    """Progress: a bar on a terminal, a JSON line per logging step otherwise; status.json as we go."""

    def __init__(self, reporter: Reporter, status):
        self.reporter, self.status = reporter, status
        self.last_time = self.last_tokens = None
        self.start_time = self.start_step = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_time, self.start_step = time.time(), state.global_step
        self.last_time, self.last_tokens = time.time(), state.num_input_tokens_seen
        self.reporter.start_progress(state.max_steps, initial=state.global_step)
        self.status.write(phase=Phase.TRAINING, step=state.global_step, max_steps=state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        self.reporter.advance(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            if "eval_loss" in logs:
                self.reporter.event("eval", "eval loss", step=state.global_step, eval_loss=logs["eval_loss"])
                self.status.write(eval_loss=round(float(logs["eval_loss"]), 5))
            return
        now = time.time()
        tokens = state.num_input_tokens_seen
        tokens_per_second = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, tokens
        done = state.global_step - self.start_step
        eta = (now - self.start_time) / done * (state.max_steps - state.global_step) if done else None
        fields = {"loss": round(float(logs["loss"]), 5), "learning_rate": float(logs.get("learning_rate", 0.0)),
                  "tokens_per_second": round(tokens_per_second, 1),
                  "eta_seconds": round(eta, 1) if eta is not None else None}
        self.reporter.progress(state.global_step, state.max_steps, **fields)
        self.status.write(phase=Phase.TRAINING, step=state.global_step, max_steps=state.max_steps,
                          last_loss=fields["loss"], tokens_per_second=fields["tokens_per_second"],
                          eta_seconds=fields["eta_seconds"])
