"""One run, top to bottom: preflight -> data -> 4-bit base + LoRA -> Trainer loop -> final adapter.

The run's lifecycle is persisted in the store's status.json (training -> finalizing -> publishing -> done),
so a restart with the same RUN_ID continues from whatever phase it finds.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Config
from .distributed import BatchSplitError, Topology, barrier, split_batch
from .data import DataError, Splits, dataset_fingerprint, encode_rows, load_rows, parse_rows, sample_and_split
from .log import Reporter
from .storage import RunStore, StoreError, open_store

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 75
DDP_TIMEOUT_SECONDS = 1800
FINAL_FILES = ("adapter_model.safetensors", "adapter_config.json", "training_summary.json")


class BadInput(Exception):
    """Bad configuration or input that a retry cannot fix: exit 2. The message is one clear line."""


class Stopped(Exception):
    """Stopped by a signal; the newest checkpoint is committed (or none was due): exit 75."""


class StopSignal:
    """First SIGTERM/SIGINT: finish the step, save, exit 75. Second: exit at once."""

    def __init__(self, reporter: Reporter):
        self.reporter = reporter
        self.received: str | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received:
            self.reporter.event("stop", f"second {name}: exiting now; the last committed checkpoint stands")
            os._exit(EXIT_STOPPED)
        self.received = name
        self.reporter.event("stop", f"{name}: finishing this step, then saving and exiting")


@dataclass
class Prepared:
    """What preflight found: everything checked before any model is loaded."""
    device: str
    run_store: RunStore
    splits: Splits
    data_fingerprint: str
    topology: Topology


# ---------------------------------------------------------------- preflight

def preflight(config: Config, reporter: Reporter, topology: Topology = Topology()) -> Prepared:
    """Every check of job/preflight.py, before a byte of the model is loaded. All of them run; BadInput carries
    every failure, one line each (the reporter writes each as its own `error:` line)."""
    from .preflight import report, run_checks

    checks = run_checks(config, topology)
    problems = report(checks.results, reporter)
    if problems:
        raise BadInput("\n".join(problems))
    found = checks.found
    if topology.is_main:
        _check_same_run(config, found.run_store, found.data_fingerprint)
    reporter.event("preflight", "checks passed", device=found.device, run_id=config.resolved_run_id,
                   train_rows=len(found.splits.train), eval_rows=len(found.splits.eval))
    return Prepared(device=found.device, run_store=found.run_store, splits=found.splits,
                    data_fingerprint=found.data_fingerprint, topology=topology)


def check_machine(config: Config) -> str:
    """The GPUs the settings ask for are here, and the batch splits over them; returns "cuda" or "cpu".
    Run by the launcher before it starts workers, and by every worker."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if config.require_gpu and device != "cuda":
        raise BadInput("REQUIRE_GPU=true but no CUDA GPU is visible; run on a GPU node "
                       "(docker: --gpus all; k8s: nvidia.com/gpu) or set REQUIRE_GPU=false to train on the CPU")
    wanted = config.nproc_per_node
    if device == "cuda" and wanted > torch.cuda.device_count():
        raise BadInput(f"NPROC_PER_NODE={wanted} but this node has {torch.cuda.device_count()} GPU(s) visible; "
                       f"ask for {wanted} GPUs (k8s: nvidia.com/gpu: {wanted}) or lower NPROC_PER_NODE")
    try:
        split_batch(config, config.nproc_per_node * config.nnodes)
    except BatchSplitError as exc:
        raise BadInput(str(exc)) from None
    return device


def _prepare_rows(config: Config) -> tuple[Splits, str]:
    rows = parse_rows(load_rows(config.dataset), config.dataset)
    splits = sample_and_split(rows, config.num_samples, config.eval_fraction, config.seed)
    if not splits.train:
        raise DataError(f"DATASET={config.dataset!r}: no training rows left after the eval split; "
                        f"lower EVAL_FRACTION or add rows")
    return splits, dataset_fingerprint(splits.train + splits.eval)


def _check_same_run(config: Config, run_store: RunStore, data_fp: str) -> None:
    """A restart must train the same thing, or it would mix two runs' checkpoints."""
    wanted = {"settings": config.result_settings(), "data_fingerprint": data_fp,
              "fingerprint": config.fingerprint()}
    found = run_store.read_run()
    if found is None:
        run_store.write_run({**wanted, "run_id": config.resolved_run_id, "created_at": time.time()})
        return
    differ = [k for k in sorted(set(wanted["settings"]) | set(found.get("settings", {})))
              if wanted["settings"].get(k) != found.get("settings", {}).get(k)]
    changes = [f"{k} (stored {found.get('settings', {}).get(k)!r}, now {wanted['settings'].get(k)!r})"
               for k in differ]
    if found.get("data_fingerprint") != data_fp:
        changes.append("DATASET content (the sampled rows differ)")
    if changes:
        raise BadInput(f"RUN_ID={config.resolved_run_id!r} was started with other settings: {'; '.join(changes)}. "
                       f"Restore them, or use a new RUN_ID for a new run")


# ---------------------------------------------------------------- training

@dataclass
class Trained:
    summary: dict[str, Any]
    model: Any          # the PeftModel as it ended training
    tokenizer: Any


def run_training(config: Config, reporter: Reporter, prepared: Prepared, stop: StopSignal) -> Trained:
    """Train (or resume) to the end and write the adapter to OUTPUT_DIR. Raises Stopped on a signal."""
    from .model import add_lora, load_base_model, load_tokenizer, speed_plan
    from .speed import data_collator
    from .trainer import (CheckpointCommitter, EvaluationCallback, PersonaTrainer, ReportCallback, StopCallback,
                          training_arguments)

    started = time.time()
    out = Path(config.output_dir)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)

    tokenizer = load_tokenizer(config)
    train_examples, skipped = encode_rows(prepared.splits.train, tokenizer, config.max_seq_length)
    eval_examples, _ = encode_rows(prepared.splits.eval, tokenizer, config.max_seq_length)
    if not train_examples:
        raise BadInput(f"MAX_SEQ_LENGTH={config.max_seq_length}: every training row is longer than this even "
                       f"with old turns dropped; raise MAX_SEQ_LENGTH")
    if skipped:
        reporter.event("data", f"{skipped} rows skipped: their last exchange alone exceeds MAX_SEQ_LENGTH")

    run_store = prepared.run_store
    topology = prepared.topology
    resume = _resume_point(run_store, work, reporter, topology)
    if stop.received:
        raise Stopped("stopped before training started; nothing new to save")

    steps_left = planned_steps(config, len(train_examples), topology.world_size) - (resume[0] if resume else 0)
    from . import compile_cache
    cache = compile_cache.lookup(config, run_store.store, prepared.device)
    plan = speed_plan(config, prepared.device, steps=steps_left, world_size=topology.world_size,
                      compile_seconds=cache.warm_compile_seconds() if cache else None,
                      cache_unmeasured=bool(cache and cache.meta.get("bytes")))
    reporter.event("speed", "speed settings for this device", **plan.describe())
    model = load_base_model(config, tokenizer, prepared.device, plan)
    model = add_lora(config, model, tokenizer)
    if plan.torch_compile:
        from .speed import compile_layers
        layers = compile_layers(model)
        cache_callbacks = compile_cache.attach(cache, reporter, topology.is_main)
        reporter.event("speed", f"torch.compile: {layers} decoder layers compile on the first step (one-time)",
                       layers=layers)
    reporter.event("model", "4-bit base with LoRA ready", base=config.base_model,
                   trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))

    import datasets
    args = training_arguments(config, work / "trainer", prepared.device, bool(eval_examples), plan,
                              world_size=topology.world_size)
    committer = CheckpointCommitter(config, run_store, reporter, protect=resume[0] if resume else None,
                                    is_main=topology.is_main)
    status = _StatusWriter(config, run_store, committer, enabled=topology.is_main)
    evaluator = None
    if eval_examples and topology.is_main:
        from .evaluate import build_evaluator
        try:
            evaluator = build_evaluator(config, tokenizer, prepared.splits.eval, eval_examples,
                                        data_collator(plan, tokenizer), prepared.device)
        except ValueError as exc:   # an NLI_MODEL without entailment/contradiction labels
            raise BadInput(str(exc)) from None
    from .recompute import callbacks as recompute_callbacks
    callbacks = [StopCallback(stop), *recompute_callbacks(plan.recompute)]
    if plan.torch_compile:
        callbacks += cache_callbacks
    if evaluator and config.eval_at_checkpoints:
        callbacks.append(EvaluationCallback(evaluator, stop, reporter, status))
    trainer = PersonaTrainer(
        model=model, args=args,
        train_dataset=datasets.Dataset.from_list(train_examples),
        eval_dataset=datasets.Dataset.from_list(eval_examples) if eval_examples else None,
        data_collator=data_collator(plan, tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks + [committer, ReportCallback(reporter, status)],
    )
    committer.clean_leftovers()
    if resume:
        reporter.event("resume", f"resuming from committed checkpoint step {resume[0]}", step=resume[0])
    status.write(phase="training", step=resume[0] if resume else 0)
    try:
        result = trainer.train(resume_from_checkpoint=str(resume[1]) if resume else None)
    finally:
        reporter.close_progress()
        if cache is not None:
            cache.wait(10)   # its one write, after the first step: long done unless the run was that short

    if stop.received:
        committed = committer.wait(config.shutdown_budget_seconds)
        status.write(phase="training", stopped_by=stop.received)
        status.flush()
        barrier()
        raise Stopped(f"stopped by {stop.received} at step {trainer.state.global_step}; "
                      f"checkpoint {'committed' if committed else 'not committed in time'}; "
                      f"newest committed step {committer.last_committed}")
    if not committer.wait(None):
        raise RuntimeError(f"checkpoint upload failed: {committer.errors()}")

    final_eval = _final_eval_loss(trainer) if eval_examples else {}
    if not topology.is_main:
        return Trained(summary={}, model=trainer.model, tokenizer=tokenizer)
    status.write(phase="evaluating", step=trainer.state.global_step)
    evaluation = _evaluate(evaluator, trainer.model, reporter, stop, status, trainer.state.global_step)
    summary = _summary(config, trainer, result, final_eval, started, len(train_examples), len(eval_examples),
                       prepared)
    summary["evaluation"] = evaluation
    status.write(phase="finalizing", step=trainer.state.global_step)
    status.flush()
    trainer.model.save_pretrained(out, save_embedding_layers=False)
    tokenizer.save_pretrained(out)
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _plot(summary, out, reporter)
    from .card import model_card
    (out / "README.md").write_text(model_card(config, out))  # ours, in place of peft's template
    committer.close()
    return Trained(summary=summary, model=trainer.model, tokenizer=tokenizer)


def _final_eval_loss(trainer) -> dict[str, float]:
    """The Trainer's eval loss at the last step: the one it logged there (EVAL_STEPS dividing the steps), else a
    pass now. Every rank sees the same log history, so all of them take the same branch."""
    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return {"eval_loss": last["eval_loss"]}
    return trainer.evaluate()


def _evaluate(evaluator, model, reporter: Reporter, stop: StopSignal, status, step: int) -> dict[str, Any] | None:
    """The persona evaluation of the finished adapter against the base; a stop signal here means exit 75 (the
    last step is committed, so the restart only evaluates again)."""
    if evaluator is None:
        return None
    from .evaluate import EvaluationStopped, brief

    reporter.event("evaluation", f"evaluating base and tuned model on {len(evaluator.examples)} held-out rows "
                                 f"({len(evaluator.cases)} answered greedily)")
    try:
        evaluation = evaluator.run(model, should_stop=lambda: stop.received)
    except EvaluationStopped:
        status.write(stopped_by=stop.received)
        status.flush()
        raise Stopped(f"stopped by {stop.received} during the final evaluation; step {step} is committed") from None
    reporter.event("evaluation", "persona evaluation of the final adapter", step=step, **brief(evaluation))
    status.write(evaluation={"step": step, **brief(evaluation)})
    return evaluation


def _plot(summary: dict[str, Any], out: Path, reporter: Reporter) -> None:
    from .plot import LOSS_CURVE, loss_curve
    try:
        loss_curve(summary, out / LOSS_CURVE)
    except ImportError as exc:   # a cosmetic file is not worth failing a finished run for
        reporter.event("plot", f"no loss curve: {exc}")


def planned_steps(config: Config, rows: int, world_size: int) -> int:
    """The optimizer steps the whole run takes, as the Trainer counts them: MAX_STEPS, or the epochs over the
    batches each process reads (its share of the rows, in micro-batches, grouped by gradient accumulation)."""
    if config.max_steps > 0:
        return config.max_steps
    batch, accumulation = split_batch(config, world_size)
    micro_batches = math.ceil(math.ceil(rows / world_size) / batch)
    return math.ceil(config.num_train_epochs * max(math.ceil(micro_batches / accumulation), 1))


def _resume_point(run_store: RunStore, work: Path, reporter: Reporter,
                  topology: Topology) -> tuple[int, Path] | None:
    """The newest verified checkpoint, downloaded once per node (by its local rank 0) for all its ranks."""
    choice = work / "resume" / "chosen.json"
    if topology.local_rank == 0:
        choice.unlink(missing_ok=True)
        found = run_store.latest_verified_checkpoint(work / "resume", log=lambda m: reporter.event("resume", m))
        if topology.is_worker:
            choice.parent.mkdir(parents=True, exist_ok=True)
            choice.write_text(json.dumps([found[0], str(found[1])] if found else None))
    if topology.is_worker:
        import torch.distributed as dist
        if not dist.is_initialized():
            # The Trainer's ddp_timeout (30 min), not NCCL's 10: the other ranks wait in a barrier while rank 0
            # evaluates a checkpoint (EVAL_AT_CHECKPOINTS) or uploads.
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo",
                                    timeout=datetime.timedelta(seconds=DDP_TIMEOUT_SECONDS))
        barrier()
        chosen = json.loads(choice.read_text())
        found = (chosen[0], Path(chosen[1])) if chosen else None
    return found


def _summary(config, trainer, result, final_eval, started, n_train, n_eval, prepared) -> dict[str, Any]:
    history = trainer.state.log_history
    seconds = time.time() - started
    tokens = trainer.state.num_input_tokens_seen
    train_seconds = result.metrics.get("train_runtime") or seconds
    return {
        "run_id": config.resolved_run_id,
        "config": config.redacted(),
        "device": torch.cuda.get_device_name(0) if prepared.device == "cuda" else "cpu",
        "steps": trainer.state.global_step,
        "train_rows": n_train,
        "eval_rows": n_eval,
        "train_loss": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        "eval_loss": [{"step": h["step"], "loss": h["eval_loss"]} for h in history if "eval_loss" in h],
        "final_eval_loss": final_eval.get("eval_loss"),
        "wall_time_seconds": round(seconds, 2),
        "train_tokens": tokens,
        "tokens_per_second": round(tokens / train_seconds, 2) if train_seconds else None,
        "data_fingerprint": prepared.data_fingerprint,
    }


class _StatusWriter:
    """status.json, kept current from a background thread (a PUT per logging step must not stall training; the
    newest fields win). A failed write is reported, never fatal: status is advisory, the manifests are the truth."""

    def __init__(self, config: Config, run_store: RunStore, committer, enabled: bool = True):
        self.config, self.run_store, self.committer, self.enabled = config, run_store, committer, enabled
        self.fields: dict[str, Any] = {"run_id": config.resolved_run_id}
        previous = run_store.read_status() or {}
        self.fields["attempt"] = int(previous.get("attempt", 0)) + 1
        self._pending: dict[str, Any] | None = None
        self._changed = threading.Condition()
        self._writing = False
        if enabled:
            threading.Thread(target=self._work, name="status-writer", daemon=True).start()

    def write(self, **fields: Any) -> None:
        if not self.enabled:
            return
        with self._changed:
            self.fields.update(fields)
            if self.fields.get("phase") != "training":
                self.fields.pop("eta_seconds", None)   # an estimate of the training left; none is left
            self.fields["newest_checkpoint"] = self.committer.last_committed
            self._pending = dict(self.fields)
            self._changed.notify_all()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until the newest fields are written (bounded: a hung store must not hold up an exit)."""
        with self._changed:
            self._changed.wait_for(lambda: self._pending is None and not self._writing, timeout)

    def _work(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending is not None)
                snapshot, self._pending, self._writing = self._pending, None, True
            try:
                self.run_store.write_status(snapshot)
            except Exception as exc:
                self.committer.reporter.event("status", f"could not write status.json: {type(exc).__name__}")
            with self._changed:
                self._writing = False
                self._changed.notify_all()


# ---------------------------------------------------------------- the whole run

def main(config: Config, reporter: Reporter, topology: Topology = Topology()) -> int:
    """The job: continue the run of this RUN_ID from whatever phase its status.json shows."""
    stop = StopSignal(reporter)
    stop.install()
    if topology.is_worker and torch.cuda.is_available():
        torch.cuda.set_device(topology.local_rank)
    try:
        prepared = preflight(config, reporter, topology)
        run_store = prepared.run_store
        status = run_store.read_status() or {}
        if status.get("phase") == "done":
            reporter.event("done", "this run is already done; nothing to do", run_id=config.resolved_run_id,
                           hub_commit=status.get("hub_commit_url"))
            return EXIT_OK
        if run_store.final_committed():
            if not topology.is_main:
                return EXIT_OK
            reporter.event("final", "final adapter already committed; skipping training")
            run_store.download_final(Path(config.output_dir))
        else:
            summary = run_training(config, reporter, prepared, stop).summary
            if not topology.is_main:
                return EXIT_OK
            run_store.commit_final(Path(config.output_dir), config.fingerprint(), files=final_files(config))
            reporter.event("final", "final adapter committed", steps=summary["steps"],
                           final_eval_loss=summary["final_eval_loss"])
        return finish(config, reporter, run_store)
    except BadInput as exc:
        reporter.error(str(exc))
        return EXIT_BAD_INPUT
    except Stopped as exc:
        reporter.event("stopped", str(exc))
        return EXIT_STOPPED


def final_files(config: Config) -> list[str]:
    """The finished adapter, tokenizer and summary in OUTPUT_DIR (not the scratch under work/)."""
    out = Path(config.output_dir)
    return sorted(p.name for p in out.iterdir() if p.is_file())


def finish(config: Config, reporter: Reporter, run_store: RunStore) -> int:
    """After final/ is committed: publish if asked, then mark the run done."""
    status = {k: v for k, v in (run_store.read_status() or {}).items() if k != "error"}   # a refusal before
    if config.hub_model_id and config.publish_only_if_improved:
        refusal = _not_improved(Path(config.output_dir))
        if refusal:
            run_store.write_status({**status, "phase": "failed", "error": refusal})
            reporter.error(refusal)
            return EXIT_BAD_INPUT
    if config.hub_model_id:
        from .publish import publish
        status = {**status, "phase": "publishing"}
        run_store.write_status(status)
        url = publish(config, reporter, Path(config.output_dir))
        status = {**status, "hub_commit_url": url, "hub_model_id": config.hub_model_id,
                  "hub_revision": config.hub_revision}
    run_store.write_status({**status, "phase": "done"})
    reporter.event("done", "run complete", run_id=config.resolved_run_id, output_dir=config.output_dir,
                   hub_commit_url=status.get("hub_commit_url"))
    return EXIT_OK


def _not_improved(final_dir: Path) -> str | None:
    """PUBLISH_ONLY_IF_IMPROVED: why the adapter may not be pushed, or None."""
    evaluation = json.loads((final_dir / "training_summary.json").read_text()).get("evaluation")
    if not evaluation:
        return ("PUBLISH_ONLY_IF_IMPROVED=true but this run has no held-out evaluation; not pushing "
                "(set EVAL_FRACTION > 0 for a new run, or PUBLISH_ONLY_IF_IMPROVED=false)")
    base, tuned = evaluation["base"]["loss"], evaluation["tuned"]["loss"]
    if tuned < base:
        return None
    return (f"PUBLISH_ONLY_IF_IMPROVED=true: the tuned adapter's held-out reply loss {tuned:.4f} is not below the "
            f"base model's {base:.4f}; not pushing. The adapter is committed in final/ of the run; push it anyway "
            f"with PUBLISH_ONLY_IF_IMPROVED=false python -m job publish")


def publish_only(config: Config, reporter: Reporter) -> int:
    """`python -m job publish`: push the committed final/ of this run, without training."""
    try:
        prepared_store = _open_run_store(config)
        if config.hub_model_id:
            from .publish import HubAccessError, check_hub_access
            try:
                check_hub_access(config)
            except HubAccessError as exc:
                raise BadInput(str(exc)) from None
        if not prepared_store.final_committed():
            raise BadInput(f"RUN_ID={config.resolved_run_id!r} has no committed final adapter in "
                           f"{config.checkpoint_uri}; run `train` first")
        prepared_store.download_final(Path(config.output_dir))
        return finish(config, reporter, prepared_store)
    except BadInput as exc:
        reporter.error(str(exc))
        return EXIT_BAD_INPUT


def _open_run_store(config: Config) -> RunStore:
    try:
        store = open_store(config.checkpoint_uri)
        store.probe()
    except StoreError as exc:
        raise BadInput(str(exc)) from None
    return RunStore(store, config.resolved_run_id)
