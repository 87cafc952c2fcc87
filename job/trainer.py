"""The pieces we add to transformers.Trainer: arguments from our Config, the Trainer subclass, and callbacks for
stopping, committing checkpoints to the store in the background, and reporting progress."""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .config import Config
from .distributed import any_rank, barrier, split_batch
from .log import Reporter
from .status import Phase
from .speed.kernels import eager, states_on_gpu, without_per_parameter_syncs
from .speed.plan import SpeedPlan
from .speed.recompute import checkpoint_kwargs
from .speed.snapshot import CheckpointWriter, HostSnapshot
from .store.run_store import RunStore
from .store.blob import StoreError
from .store.uploader import BackgroundUploader, UploadStalled


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
        tf32=None,                       # set by use_tf32 below, not by transformers (see there)
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
    if device == "cuda":
        use_tf32(plan.tf32)
    if device == "cuda" and world_size == 1:
        # One process on a node with several GPUs: the Trainer would wrap the model in nn.DataParallel over all
        # of them (its n_gpu is every visible GPU), which the 4-bit model does not survive intact and which logged
        # twice the loss on 2 GPUs (docs/PERFORMANCE.md). One process trains on one GPU; more is NPROC_PER_NODE.
        _ = args.device   # let TrainingArguments count the GPUs first, then keep to one
        args._n_gpu = 1
    return args


def use_tf32(enabled: bool) -> None:
    """TF32 tensor cores for float32 matmuls (the LoRA products) and cuDNN, through torch's per-backend flags.
    TrainingArguments(tf32=True) sets torch.backends.fp32_precision instead, after which torch refuses to answer
    torch.get_float32_matmul_precision() and the allow_tf32 flags ("you have used mix of the legacy and new APIs"):
    inductor's GEMM autotuning (TORCHINDUCTOR_MAX_AUTOTUNE_GEMM) asks, and failed on an H100 (docs/PERFORMANCE.md)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


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

    def __init__(self, *args, checkpoint_writer: CheckpointWriter | None = None,
                 optimizer_states_on_gpu: bool = False, **kwargs):
        self.optimizer_states_on_gpu = optimizer_states_on_gpu   # the speed plan's (kernels.states_on_gpu)
        super().__init__(*args, **kwargs)
        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)
        self._flops_per_token: int | None = None
        self._trainable: list[torch.nn.Parameter] | None = None
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
        if self.optimizer_states_on_gpu:
            states_on_gpu(optimizer)
        without_per_parameter_syncs(optimizer)
        return optimizer

    def _clip_grad_norm(self, model):
        # The Trainer hands accelerate model.parameters(), so every step walked every module and frozen 4-bit weight
        # to find the LoRA ones with gradients. The trainable ones, listed once, give the same norm and the same
        # clipping (a frozen weight has no gradient). One process or DDP only: the other setups keep their own way.
        from accelerate import DistributedType

        if (self.accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU)
                or self._has_mixed_mesh_grads(model)):
            return super()._clip_grad_norm(model)
        if self._trainable is None:
            self._trainable = [p for p in model.parameters() if p.requires_grad]
        return self.accelerator.clip_grad_norm_(self._trainable, self.args.max_grad_norm)

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

    def _save_checkpoint(self, model, trial):
        # A write that fails here (a full disk) skips this checkpoint, not the run: its folder is never committed
        # (CheckpointWriter.seal raises the failure), and the next save tries again.
        self._in_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        except OSError as e:
            self.snapshot.discard()
            self.checkpoint_writer.failed(
                os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}"), e)
        finally:
            self._in_checkpoint = False
            self.snapshot.submit()   # the adapter and optimizer files, written once both snapshots are taken

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # torch.save of the optimizer state was most of what a checkpoint cost the training thread. Snapshot it
        # now, since the next step changes it, and write it from the checkpoint writer, which hands the folder to
        # the uploader only once the file is complete.
        if not self.args.should_save or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        self.snapshot.write("optimizer", self.optimizer.state_dict(), self.checkpoint_writer.write,
                            os.path.join(output_dir, OPTIMIZER_NAME), _torch_save)
        self.checkpoint_writer.write(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME),
                                     _torch_save)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # The adapter's tensors, like the optimizer's, are snapshotted here and written by the checkpoint writer;
        # its config (what peft's save_pretrained writes beside them) and the tokenizer are small and written now.
        from peft.utils import get_peft_model_state_dict

        output_dir = output_dir or self.args.output_dir
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.snapshot.write("adapter", get_peft_model_state_dict(self.model, save_embedding_layers=False),
                            self.checkpoint_writer.write, os.path.join(output_dir, "adapter_model.safetensors"),
                            _safetensors_save)
        if not self._in_checkpoint:
            self.snapshot.submit()
        adapter_config = copy.copy(self.model.peft_config["default"])
        adapter_config.inference_mode = True
        adapter_config.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)


def _torch_save(tree, f) -> None:
    torch.save(tree, f)


def _safetensors_save(tensors, f) -> None:
    from safetensors.torch import save

    f.write(save(tensors, {"format": "pt"}))   # the bytes safetensors' save_file writes, as peft's save_pretrained


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
    finished and sealed its files; prunes after each commit.

    What a full disk or a slow, refusing or absent store does (README, "What can go wrong"):
    - a checkpoint whose files could not all be written is skipped, with an event; the next save tries again;
    - a save waits until the previous checkpoint's upload has ended (`before_save`), so at most one checkpoint waits
      for upload and one is on the local disk; the save of a stop or of the last step does not wait, and queues
      behind it (two on the disk);
    - a failed upload is reported and its local copy deleted: the next save uploads a newer checkpoint;
    - when no save has been committed for UPLOAD_STALL_SECONDS the job stops (UploadStalled), rather than train on
      with nothing durable."""

    def __init__(self, config: Config, run_store: RunStore, reporter: Reporter, writer: CheckpointWriter,
                 protect: int | None, is_main: bool = True, stop=None):
        self.config, self.run_store, self.reporter, self.protect = config, run_store, reporter, protect
        self.writer, self.stop = writer, stop
        # Only rank 0 commits; the other ranks' part of a checkpoint (their RNG state) is in the same folder.
        self.uploader = (BackgroundUploader(run_store, on_committed=self._committed, isolate=True,
                                            on_failed=self._upload_failed) if is_main else None)
        self.local_dirs: dict[int, Path] = {}
        self.newest_saved: int | None = None
        self.last_error: BaseException | None = None
        self._lock = threading.Lock()
        self._uncommitted: dict[int, float] = {}   # saves since the last commit: step -> when (monotonic)
        self._store_leftovers = False              # a failed upload may have left files in the store

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

    # ---------------------------------------------------------------- the training thread

    def before_save(self, state, control) -> None:
        """At a save step's end (UploadGate, before StopCallback): wait until the previous checkpoint's upload has
        ended, at most until the stall limit, or until a stop signal; then stop every rank if nothing has been
        committed for UPLOAD_STALL_SECONDS."""
        if not control.should_save or state.global_step >= state.max_steps:
            return
        stalled = False
        if self.uploader is not None:
            while not (self.stop is not None and self.stop.received) and not self._stalled():
                if self._idle(1.0):
                    break
            stalled = self._stalled()
        if any_rank(stalled):
            raise self._stall_error()

    def on_save(self, args, state, control, **kwargs):
        barrier()   # every rank has written its share of the checkpoint
        if self.uploader is None:
            return control
        step = state.global_step
        local = Path(args.output_dir) / f"checkpoint-{step}"
        self.local_dirs[step] = local
        self.newest_saved = step
        with self._lock:
            self._uncommitted.setdefault(step, time.monotonic())
        # After the writer has finished this checkpoint's files.
        self.writer.submit(self._hand_over, step, local, self.config.fingerprint())
        return control

    def finish(self, meanwhile: Callable[[], None] | None = None) -> None:
        """At the end of training: wait for the uploads to end, at most until the stall limit. A last checkpoint
        that failed is reported, and the final adapter is committed all the same. `meanwhile` runs once the
        checkpoint writer is done and before the wait for the upload process: work of this process's that would
        otherwise compete with the writer's for the interpreter, while the upload, in a process of its own, does
        not."""
        if self.uploader is None:
            if meanwhile is not None:
                meanwhile()
            return
        while not self.writer.idle(1.0):
            if self._stalled():
                raise self._stall_error()
        if meanwhile is not None:
            meanwhile()
        while not self._idle(1.0):
            if self._stalled():
                raise self._stall_error()
        if self.newest_saved is not None and self.uploader.last_committed() != self.newest_saved:
            self.reporter.event("checkpoint", f"the last checkpoint (step {self.newest_saved}) was not committed; "
                                              f"committing the final adapter all the same")

    def wait(self, timeout: float | None) -> bool:
        """True once the newest checkpoint saved is committed; False if it failed or `timeout` ran out."""
        if self.uploader is None:
            return self.writer.idle(timeout)
        return self._idle(timeout) and self.uploader.last_committed() == self.newest_saved

    def close(self) -> None:
        self.writer.close()
        if self.uploader:
            self.uploader.close()

    def _idle(self, timeout: float | None) -> bool:
        """The writer and the uploader have nothing left to do."""
        started = time.monotonic()
        if not self.writer.idle(timeout):
            return False
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        return self.uploader.idle(left)

    def _stalled(self) -> bool:
        with self._lock:
            oldest = min(self._uncommitted.values(), default=None)
        return oldest is not None and time.monotonic() - oldest >= self.config.upload_stall_seconds

    def _stall_error(self) -> UploadStalled:
        limit = f"UPLOAD_STALL_SECONDS={self.config.upload_stall_seconds:g}"
        if self.uploader is None:
            return UploadStalled(f"rank 0 found no checkpoint committed for {limit}; stopping", permanent=False)
        with self._lock:
            since = min(self._uncommitted, default=None)
        error = self.last_error
        why = f"the last failure: {_one_line(error)}" if error else "the upload has not ended"
        return UploadStalled(
            f"no checkpoint committed since step {since} was saved, {limit} ago ({why}); stopping rather than "
            f"training on with nothing durable. The newest committed checkpoint is step {self.last_committed}",
            permanent=isinstance(error, StoreError))

    # ---------------------------------------------------------------- the writer and uploader threads

    def _hand_over(self, step: int, local: Path, fingerprint: str) -> None:
        try:
            written = self.writer.seal(local)
        except Exception as e:
            self.last_error = e
            self._forget(step)
            self.reporter.event("checkpoint_skipped", f"checkpoint step {step} not saved ({_one_line(e)}); the "
                                                      f"next save tries again", step=step)
            return
        self.uploader.submit(step, local, fingerprint, written)

    def _upload_failed(self, step: int, error: BaseException) -> None:
        self.last_error = error
        self._store_leftovers = True
        self._forget(step)
        self.reporter.event("upload_failed", f"checkpoint step {step} not committed ({_one_line(error)}); the "
                                             f"next save uploads a newer one", step=step)

    def _committed(self, step: int) -> None:
        with self._lock:
            self._uncommitted = {s: t for s, t in self._uncommitted.items() if s > step}
        self.last_error = None
        self.reporter.event("checkpoint", f"committed step {step}", step=step)
        deleted = self.run_store.prune(self.config.save_total_limit,
                                       protect=[self.protect] if self.protect else [])
        if deleted:
            self.reporter.event("checkpoint", f"retention removed steps {deleted}")
        if self._store_leftovers:   # what failed uploads left in the store
            self._store_leftovers = False
            self.run_store.clean_uncommitted(older_than_step=step)
        for old in [s for s in list(self.local_dirs) if s <= step]:
            self._forget(old)

    def _forget(self, step: int) -> None:
        """Delete a checkpoint's local copy: committed, or not to be committed."""
        local = self.local_dirs.pop(step, None)
        if local is not None:
            shutil.rmtree(local, ignore_errors=True)


class UploadGate(TrainerCallback):
    """CheckpointCommitter.before_save, at each step's end before StopCallback: a stop signal that ends its wait
    then makes this step's save the stop's."""

    def __init__(self, committer: CheckpointCommitter):
        self.committer = committer

    def on_step_end(self, args, state, control, **kwargs):
        self.committer.before_save(state, control)
        return control


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


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
                self.reporter.event("eval", "eval loss", step=state.global_step, eval_loss=logs["eval_loss"],
                                    seconds=logs.get("eval_runtime"))
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
