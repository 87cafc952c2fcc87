"""One run of this configuration, read top to bottom: `Run.main` continues it from the phase its status.json
shows, through the lifecycle check -> setup -> train -> evaluate -> finalize -> publish.

Each phase can be repeated safely: a restart with the same RUN_ID resumes training from the newest committed
checkpoint, evaluates again, publishes from the committed final/ without retraining, or does nothing if done.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from .checks import report, run_checks
from .config import BadInput, Config, ExitCode
from .data import Splits, encode_rows
from .distributed import Topology, barrier, from_rank_0, init_process_group, launch, pin_gpu
from .log import Reporter
from .status import Phase, StatusWriter
from .store import StoreError, open_store
from .store.lease import Lease, LeaseHeld, LeaseLost
from .store.run_store import CorruptCheckpoint, RunStore
from .store.uploader import UploadStalled


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
            os._exit(ExitCode.STOPPED)
        self.received = name
        self.reporter.event("stop", f"{name}: finishing this step, then saving and exiting")


def phase(method):
    """A phase of the lifecycle: while it runs, `Run.phase` names it, for the line an unexpected error gets."""
    @functools.wraps(method)
    def run_phase(self, *args, **kwargs):
        self.phase = method.__name__
        return method(self, *args, **kwargs)
    return run_phase


class Run:
    """The job's recipe. `main` is the whole run; bench/speed.py reuses `setup` and the Trainer it builds."""

    def __init__(self, config: Config, reporter: Reporter, topology: Topology = Topology(), warmup=None,
                 early_probe=None):
        self.config, self.reporter, self.topology = config, reporter, topology
        self.phase = "start"                    # the phase running now (see `phase`)
        self.stop = StopSignal(reporter)
        self.out = Path(config.output_dir)      # the finished adapter, tokenizer, summary and card
        self.work = self.out / "work"           # scratch: the Trainer's checkpoints, downloads to resume from
        # Found by check(): the device, the run's store, the rows, the base model's shape.
        self.device: str = "cpu"
        self.store: RunStore | None = None
        self.splits: Splits | None = None
        self.model_shape = None
        self.committer = None   # set up with the callbacks
        self.cache = None       # the compile cache of this run's compiled layers (job/speed/compile_cache.py)
        self.lease: Lease | None = None   # rank 0's hold on the run: the one writer (job/store/lease.py)
        self.warmup = warmup    # the helper compiling a layer while the run starts (job/speed/warm.py)
        self.early_probe = early_probe   # the GPU row's Triton probe, started with the process (job/toolchain.py)
        self.adapter_written = False     # the finished adapter already in OUTPUT_DIR (write_adapter)

    # ---------------------------------------------------------------- the whole run

    def main(self) -> None:
        """The job: continue this RUN_ID's run from the phase its status.json shows. Raises BadInput (exit 2),
        Stopped (exit 75) or LeaseHeld (exit 73). The run's lease is given up however it ends."""
        self.stop.install()
        pin_gpu(self.topology)
        try:
            self.check()
            self._continue()
        finally:
            self.let_go()

    def _continue(self) -> None:
        status = self.store.read_status() or {}
        done = status.get("phase") == Phase.DONE
        trained = done or self.store.final_committed()
        if trained and self.warmup is not None:
            self.stop_warmup("this run has no training left")
        if done:
            self.reporter.event("done", "this run is already done; nothing to do", run_id=self.config.resolved_run_id,
                                hub_commit=status.get("hub_commit_url"))
            return
        if trained:
            if not self.topology.is_main:
                return
            self.reporter.event("final", "final adapter already committed; skipping training")
            self._written_by_this_run(None)
            self.store.download_final(self.out)
        else:
            self.setup()
            self.train()
            if not self.topology.is_main:   # rank 0 alone evaluates, commits final/ and publishes
                return
            self.evaluate()
            self.finalize()
        self.publish()

    def publish_only(self) -> None:
        """`python -m job publish`: push the committed final/ of this run, without training."""
        self.phase = "publish"
        try:
            store = open_store(self.config.checkpoint_uri)
            store.probe()
        except StoreError as exc:
            raise BadInput(str(exc)) from None
        self.store = RunStore(store, self.config.resolved_run_id)
        try:
            self.hold()
            if self.config.hub_model_id:
                from .hub import HubAccessError, check_hub_access
                try:
                    check_hub_access(self.config)
                except HubAccessError as exc:
                    raise BadInput(str(exc)) from None
            if not self.store.final_committed():
                raise BadInput(f"RUN_ID={self.config.resolved_run_id!r} has no committed final adapter in "
                               f"{self.config.checkpoint_uri}; run `train` first")
            self.store.download_final(self.out)
            self.publish()
        finally:
            self.let_go()

    # ---------------------------------------------------------------- check

    @phase
    def check(self) -> None:
        """Every preflight check (job/checks.py), before a byte of the model is loaded. All of them run; BadInput
        carries every failure, one line each. What they find on the way is the run's: nothing is read twice.
        Where the run may compile, the compile's helper starts with them (unless it started with the process), and
        starts on the GPU once they pass; one started with the process where the run may not compile is stopped."""
        from .speed import warm

        if not warm.may_compile(self.config, self.topology):
            if self.warmup is not None:
                self.warmup.stop()   # started on a cheaper look (warm.start_early) that torch now overrules
                self.warmup = None
        elif self.warmup is None:
            self.warmup = warm.Warmup(self.config, self.work)
        results, found = run_checks(self.config, self.topology, early_probe=self.early_probe)
        self.early_probe = None
        problems = report(results, self.reporter)
        if problems:
            raise BadInput("\n".join(problems))
        self.device, self.store, self.splits, self.model_shape = \
            found.device, found.run_store, found.splits, found.model_shape
        if self.topology.is_main:
            first = self._same_run(found.run_record)   # read only: a refused restart touches nothing, not even the lease
            self.hold()
            if first and self._same_run(self.store.read_run()):   # again under the lease: the holder it waited for may have written it
                self.store.write_run(first)
        self.reporter.event("preflight", "checks passed", device=self.device, run_id=self.config.resolved_run_id,
                            train_rows=len(self.splits.train), eval_rows=len(self.splits.eval))
        if self.warmup is not None:
            self.cache = self.compile_cache()
            if self.cache is not None and self.cache.meta.get("bytes"):
                self.stop_warmup("the stored compile cache will be loaded instead")
            else:
                self.warmup.go()

    def hold(self) -> None:
        """Take the run's lease (rank 0): one writer per run. Waits up to LEASE_TTL_SECONDS for a live holder, then
        raises LeaseHeld; once held, it is renewed in the background and checked before every commit, delete and
        publish, and losing it ends this process at once (exit 73) with nothing more committed."""
        reporter = self.reporter
        self.lease = Lease(self.store.store, self.config.resolved_run_id, self.config.lease_ttl_seconds)
        self.lease.acquire(say=lambda message: reporter.event("lease", message))
        self.lease.on_lost = self._lost
        self.store.hold(self.lease)
        self.lease.keep_renewed(lambda message: reporter.event("lease", message))
        reporter.event("lease", "holding the run's lease", generation=self.lease.ticket.generation)
        aborted = self.store.abort_stale_uploads()
        if aborted:
            reporter.event("checkpoint", f"aborted {aborted} unfinished multipart upload(s) of an earlier attempt")

    def _lost(self, lost: LeaseLost) -> None:
        self.reporter.error(str(lost))
        os._exit(ExitCode.LEASE_HELD)   # from whichever thread found out: nothing after this may reach the store

    def let_go(self) -> None:
        if self.warmup is not None:
            self.warmup.stop()
        if self.lease is not None:
            self.lease.release()

    def _same_run(self, found: dict | None) -> dict | None:
        """A restart must train the same thing, or it would mix two runs' checkpoints. `found`: the stored run.json,
        if any (preflight's read, then a read under the lease). Returns run.json's record for the first start, to be
        written once the run is held."""
        config, data_fp = self.config, self.splits.fingerprint()
        wanted = {"settings": config.result_settings(), "data_fingerprint": data_fp,
                  "fingerprint": config.fingerprint()}
        if found is None:
            return {**wanted, "run_id": config.resolved_run_id, "created_at": time.time()}
        differ = [k for k in sorted(set(wanted["settings"]) | set(found.get("settings", {})))
                  if wanted["settings"].get(k) != found.get("settings", {}).get(k)]
        changes = [f"{k} (stored {found.get('settings', {}).get(k)!r}, now {wanted['settings'].get(k)!r})"
                   for k in differ]
        if found.get("data_fingerprint") != data_fp:
            changes.append("DATASET content (the sampled rows differ)")
        if changes:
            raise BadInput(f"RUN_ID={config.resolved_run_id!r} was started with other settings: {'; '.join(changes)}. "
                           f"Restore them, or use a new RUN_ID for a new run")
        return None

    def _written_by_this_run(self, step: int | None) -> None:
        """A checkpoint (None: final/) resumed or published must carry this run's settings fingerprint; one written
        under other settings (run.json replaced, or a store shared by mistake) is refused, never mixed in."""
        wanted, found = self.config.fingerprint(), self.store.fingerprint_of(step)
        if found != wanted:
            what = "final/" if step is None else f"checkpoint step {step}"
            raise BadInput(f"RUN_ID={self.config.resolved_run_id!r}: {what} in {self.config.checkpoint_uri} was "
                           f"written with settings fingerprint {found}, not this run's {wanted}; it belongs to another "
                           f"run. Use another RUN_ID, or delete that run's folder")

    # ---------------------------------------------------------------- setup

    @phase
    def setup(self) -> None:
        """Everything training needs, in order: the tokenized rows, the checkpoint to resume from, the speed plan
        for this device and run length (weighing the compile cache's measured first step), the 4-bit base with
        LoRA, and the Trainer with the job's callbacks and the speed plan's own."""
        from .model import add_lora, base_shape, load_base_model, load_tokenizer
        from .speed import compile_cache, recompute
        from .speed.attention import data_collator
        from .speed.snapshot import CheckpointWriter
        from .trainer import PersonaTrainer

        self.started = time.time()
        self.work.mkdir(parents=True, exist_ok=True)
        self.seed()
        self.tokenizer = load_tokenizer(self.config)
        self.train_examples, self.eval_examples = self.examples()
        self.resume = self.resume_point()
        if self.stop.received:
            raise Stopped("stopped before training started; nothing new to save")
        if self.model_shape is None:
            self.model_shape = base_shape(self.config)
        if self.cache is None:   # (check() looked it up where the compile's helper waited on it)
            self.cache = self.compile_cache()
        self.plan = self.speed_plan()
        self.reporter.event("speed", "speed settings for this device", **self.plan.describe())
        if self.plan.torch_compile and self.device == "cuda":
            compile_cache.prefetch_keys()
        loading = time.perf_counter()
        base = load_base_model(self.config, self.tokenizer, self.device, self.plan, self.model_shape)
        loaded = time.perf_counter()
        model = add_lora(self.config, base, self.tokenizer)
        lora = time.perf_counter()
        layers_seconds = 0.0
        # The plan's callbacks come first, whatever callbacks() returns: they make the model what the plan says.
        speed_callbacks = recompute.callbacks(self.plan.recompute)
        if self.plan.torch_compile:
            from .speed.kernels import compile_layers
            layers = compile_layers(model, recomputed=self.plan.recompute in ("layers", "offload"),
                                    keep_weights=self.plan.keep_weights)
            layers_seconds = time.perf_counter() - lora
            hold = self.eager_until_warm()
            speed_callbacks += [hold.callback] if hold else []
            speed_callbacks += compile_cache.attach(self.cache, self.reporter, self.topology.is_main,
                                                    compiled=lambda: hold is None or hold.compiling)
            when = "once the compile's helper is done (eagerly until then)" if hold else "on the first step"
            self.reporter.event("speed", f"torch.compile: {layers} decoder layers compile {when} (one-time)",
                                layers=layers)
        elif self.warmup is not None:
            self.stop_warmup("the run does not compile")
        self.reporter.event("model", "4-bit base with LoRA ready", base=self.config.base_model,
                            trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                            load_seconds=round(loaded - loading, 2),
                            adapter_seconds=round(time.perf_counter() - loaded, 2),
                            lora_seconds=round(lora - loaded, 2), layers_seconds=round(layers_seconds, 2))

        import datasets
        self.writer = CheckpointWriter()   # finishes checkpoint files off the training thread
        arguments = self.arguments()
        callbacks = speed_callbacks + self.callbacks()
        self.trainer = PersonaTrainer(
            model=model, args=arguments,
            train_dataset=datasets.Dataset.from_list(self.train_examples),
            eval_dataset=datasets.Dataset.from_list(self.eval_examples) if self.eval_examples else None,
            data_collator=data_collator(self.plan, self.tokenizer),
            processing_class=self.tokenizer,
            callbacks=callbacks,
            checkpoint_writer=self.writer,
            optimizer_states_on_gpu=self.plan.optimizer_states_on_gpu,
        )
        if self.committer is not None:
            self.committer.clean_leftovers()

    def eager_until_warm(self):
        """Where the compile's helper still serves this run: the callback that runs the layers eagerly until it is
        done (job/speed/warm.py); else None, the helper stopped."""
        from .speed import warm

        if self.warmup is None:
            return None
        if self.plan.gradient_checkpointing:
            return self.stop_warmup("the GPU's memory is the training's (it recomputes to fit)")
        if not warm.same_graphs(self.plan, warm.compiled_plan(self.config, self.device, self.model_shape)):
            return self.stop_warmup("it compiled for another speed plan")
        warmup = self.warmup

        def compiled(step: int) -> None:
            outcome = warmup.outcome()
            seconds = round(time.time() - (warmup.went or warmup.started), 1)
            if outcome.get("compiled"):
                self.reporter.event("speed", f"compile's helper done in {seconds} s: the layers compile from its "
                                             f"caches at step {step}", step=step,
                                    **{k: outcome.get(k) for k in ("build_seconds", "step_seconds", "peak_gib")})
            else:
                self.reporter.event("speed", f"compile's helper failed ({outcome.get('why')}): the layers compile "
                                             f"at step {step}", step=step)
        return warm.EagerUntilWarm(warmup.done, compiled)

    def stop_warmup(self, why: str) -> None:
        self.warmup.stop()
        self.warmup = None
        self.reporter.event("speed", f"compile's helper stopped: {why}")

    def seed(self) -> None:
        """One seed for the LoRA init and dropout (the Trainer seeds again before its first step)."""
        torch.manual_seed(self.config.seed)

    def examples(self) -> tuple[list[dict], list[dict]]:
        """The train and eval rows as token ids with the loss mask."""
        max_length = self.config.max_seq_length
        train, skipped = encode_rows(self.splits.train, self.tokenizer, max_length)
        held_out, _ = encode_rows(self.splits.eval, self.tokenizer, max_length)
        if not train:
            raise BadInput(f"MAX_SEQ_LENGTH={max_length}: every training row is longer than this even "
                           f"with old turns dropped; raise MAX_SEQ_LENGTH")
        if skipped:
            self.reporter.event("data", f"{skipped} rows skipped: their last exchange alone exceeds MAX_SEQ_LENGTH")
        return train, held_out

    def resume_point(self) -> tuple[int, Path] | None:
        """The newest verified checkpoint, chosen by global rank 0 alone and broadcast: every node resumes from exactly
        that step. Each node's local rank 0 downloads it for its ranks; a node that cannot fails the run (a retry
        starts over) rather than fall back to another step than the others."""
        topology, where = self.topology, self.work / "resume"
        found = None
        if topology.is_main:
            found = self.store.latest_verified_checkpoint(where, log=lambda m: self.reporter.event("resume", m))
            if found:
                self._written_by_this_run(found[0])
        if not topology.is_worker:
            return found
        init_process_group()
        step = from_rank_0(found[0] if found else None)
        if step is None:
            return None
        dest = where / f"step-{step:08d}"
        if topology.local_rank == 0 and not topology.is_main:
            try:
                self.store.download_checkpoint(step, dest)
            except (CorruptCheckpoint, FileNotFoundError) as exc:
                raise RuntimeError(f"rank {topology.rank}: cannot download checkpoint step {step}, which rank 0 "
                                   f"resumes from ({exc}); failing rather than resuming from another step") from None
        barrier()   # the node's other ranks read what its local rank 0 downloaded
        return step, dest

    def compile_cache(self):
        """This run's compile cache in its store (None off a GPU, or where the store cannot be read)."""
        from .speed import compile_cache

        return compile_cache.lookup(self.config, self.store.store, self.device, self.model_shape)

    def speed_plan(self):
        """The levers for this device, sized by the base model's shape and the run's length; a compile is weighed
        by what the compile cache's first step was measured to cost."""
        from .speed.plan import plan

        cache = self.cache
        return plan(self.config, self.device, self.model_shape, self.steps_to_run(), self.topology.world_size,
                    compile_seconds=cache.warm_compile_seconds() if cache else None,
                    cache_unmeasured=bool(cache and cache.meta.get("bytes")))

    def steps_to_run(self) -> int:
        """The optimizer steps left: the whole run's, less those of the checkpoint it resumes from."""
        from .trainer import planned_steps

        planned = planned_steps(self.config, len(self.train_examples), self.topology.world_size)
        return planned - (self.resume[0] if self.resume else 0)

    def arguments(self):
        """The Trainer's arguments: the config's, on this device, with the plan's levers."""
        from .trainer import training_arguments

        return training_arguments(self.config, self.work / "trainer", self.device, bool(self.eval_examples),
                                  self.plan, world_size=self.topology.world_size)

    def callbacks(self) -> list:
        """The job's part of the Trainer's loop: stop at a signal, commit each checkpoint in the background,
        report progress and status.json, and (EVAL_AT_CHECKPOINTS) evaluate each checkpoint."""
        from .trainer import CheckpointCommitter, EvaluationCallback, ReportCallback, StopCallback, UploadGate

        config, is_main = self.config, self.topology.is_main
        self.committer = CheckpointCommitter(config, self.store, self.reporter, self.writer,
                                             protect=self.resume[0] if self.resume else None, is_main=is_main,
                                             stop=self.stop)
        self.status = StatusWriter(config.resolved_run_id, self.store, self.reporter,
                                   newest=lambda: self.committer.last_committed, enabled=is_main)
        self.evaluator = None
        if self.eval_examples and is_main:
            from .evaluate import build_evaluator
            from .speed.attention import data_collator
            try:
                self.evaluator = build_evaluator(config, self.tokenizer, self.splits.eval, self.eval_examples,
                                                 data_collator(self.plan, self.tokenizer), self.device)
            except ValueError as exc:   # an NLI_MODEL without entailment/contradiction labels
                raise BadInput(str(exc)) from None
        callbacks = [UploadGate(self.committer), StopCallback(self.stop)]
        if self.evaluator and config.eval_at_checkpoints:
            callbacks.append(EvaluationCallback(self.evaluator, self.stop, self.reporter, self.status))
        return callbacks + [self.committer, ReportCallback(self.reporter, self.status)]

    # ---------------------------------------------------------------- train

    @phase
    def train(self) -> None:
        """Train (or resume) to the last step, on every rank, its checkpoints committed in the background (by the
        rules of CheckpointCommitter). Raises Stopped on a signal, once the checkpoint of the step in flight is
        committed (or the budget ran out), and UploadStalled when nothing was committed for UPLOAD_STALL_SECONDS."""
        if self.resume:
            self.reporter.event("resume", f"resuming from committed checkpoint step {self.resume[0]}",
                                step=self.resume[0])
        self.status.write(phase=Phase.TRAINING, step=self.resume[0] if self.resume else 0)
        try:
            self.result = self.trainer.train(resume_from_checkpoint=str(self.resume[1]) if self.resume else None)
            if not self.stop.received:
                self.committer.finish(meanwhile=self.write_adapter if self.topology.is_main else None)
        except UploadStalled as exc:
            self.status.write(phase=Phase.FAILED, error=str(exc))
            self.status.flush()
            raise
        finally:
            self.reporter.close_progress()
            if self.cache is not None:
                self.cache.wait(10)   # its one write, after the first step: long done unless the run was that short
        if self.stop.received:
            committed = self.committer.wait(self.config.shutdown_budget_seconds)
            self.status.write(phase=Phase.TRAINING, stopped_by=self.stop.received)
            self.status.flush()
            barrier()
            raise Stopped(f"stopped by {self.stop.received} at step {self.trainer.state.global_step}; "
                          f"checkpoint {'committed' if committed else 'not committed in time'}; "
                          f"newest committed step {self.committer.last_committed}")
        self.final_eval = self._final_eval_loss() if self.eval_examples else {}

    def write_adapter(self) -> None:
        """The finished adapter and tokenizer into OUTPUT_DIR, and the loss curve's plotting library imported: what
        final/ needs that the evaluation does not change, done while the last checkpoint is uploaded by its own
        process (the run waits for that upload before its evaluation, so that a stop there costs no training).
        Where the write fails, finalize writes them again (and reports a failure there)."""
        from .plot import prepare

        try:
            self.trainer.model.save_pretrained(self.out, save_embedding_layers=False)
            self.tokenizer.save_pretrained(self.out)
        except OSError:
            return
        self.adapter_written = True
        prepare()

    def _final_eval_loss(self) -> dict[str, float]:
        """The Trainer's eval loss at the last step: the one it logged there (EVAL_STEPS dividing the steps), else a
        pass now. Every rank sees the same log history, so all of them take the same branch."""
        state = self.trainer.state
        last = next((h for h in reversed(state.log_history) if "eval_loss" in h), None)
        if last is not None and last.get("step") == state.global_step:
            return {"eval_loss": last["eval_loss"]}
        return self.trainer.evaluate()

    # ---------------------------------------------------------------- evaluate

    @phase
    def evaluate(self) -> None:
        """The persona evaluation of the finished adapter against the base (job/evaluate.py). A stop signal here
        means exit 75: the last step is committed, so the restart only evaluates again."""
        step = self.trainer.state.global_step
        self.status.write(phase=Phase.EVALUATING, step=step)
        self.evaluation = None
        if self.evaluator is None:
            return
        from .evaluate import EvaluationStopped, brief

        self.reporter.event("evaluation", f"evaluating base and tuned model on {len(self.evaluator.examples)} "
                                          f"held-out rows ({len(self.evaluator.cases)} answered greedily)")
        started = time.time()
        try:
            self.evaluation = self.evaluator.run(self.trainer.model, should_stop=lambda: self.stop.received)
        except EvaluationStopped:
            self.status.write(stopped_by=self.stop.received)
            self.status.flush()
            raise Stopped(f"stopped by {self.stop.received} during the final evaluation; step {step} is "
                          f"committed") from None
        self.reporter.event("evaluation", "persona evaluation of the final adapter", step=step,
                            seconds=round(time.time() - started, 2), **brief(self.evaluation))
        self.status.write(evaluation={"step": step, **brief(self.evaluation)})

    # ---------------------------------------------------------------- finalize

    @phase
    def finalize(self) -> None:
        """The finished adapter and tokenizer (unless `write_adapter` wrote them), training_summary.json, the loss
        curve and the model card in OUTPUT_DIR, committed to the store's final/."""
        from .card import model_card

        started = time.perf_counter()
        summary = {**self.summary(), "evaluation": self.evaluation}
        self.status.write(phase=Phase.FINALIZING, step=self.trainer.state.global_step)
        self.status.flush()
        if not self.adapter_written:
            self.trainer.model.save_pretrained(self.out, save_embedding_layers=False)
            self.tokenizer.save_pretrained(self.out)
        (self.out / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        self._plot(summary)
        (self.out / "README.md").write_text(model_card(self.config, self.out))  # ours, in place of peft's template
        self.committer.close()
        # The finished files only, not the scratch under work/.
        files = sorted(p.name for p in self.out.iterdir() if p.is_file())
        self.store.commit_final(self.out, self.config.fingerprint(), files=files)
        self.reporter.event("final", "final adapter committed", steps=summary["steps"],
                            final_eval_loss=summary["final_eval_loss"],
                            seconds=round(time.perf_counter() - started, 2))

    def summary(self) -> dict[str, Any]:
        state, config = self.trainer.state, self.config
        history = state.log_history
        seconds = time.time() - self.started
        tokens = state.num_input_tokens_seen
        train_seconds = self.result.metrics.get("train_runtime") or seconds
        return {
            "run_id": config.resolved_run_id,
            "config": config.redacted(),
            "device": torch.cuda.get_device_name(0) if self.device == "cuda" else "cpu",
            "steps": state.global_step,
            "train_rows": len(self.train_examples),
            "eval_rows": len(self.eval_examples),
            "train_loss": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
            "eval_loss": [{"step": h["step"], "loss": h["eval_loss"]} for h in history if "eval_loss" in h],
            "final_eval_loss": self.final_eval.get("eval_loss"),
            "wall_time_seconds": round(seconds, 2),
            "train_tokens": tokens,
            "tokens_per_second": round(tokens / train_seconds, 2) if train_seconds else None,
            "data_fingerprint": self.splits.fingerprint(),
        }

    def _plot(self, summary: dict[str, Any]) -> None:
        from .plot import LOSS_CURVE, loss_curve
        try:
            loss_curve(summary, self.out / LOSS_CURVE)
        except ImportError as exc:   # a cosmetic file is not worth failing a finished run for
            self.reporter.event("plot", f"no loss curve: {exc}")

    # ---------------------------------------------------------------- publish

    @phase
    def publish(self) -> None:
        """After final/ is committed: push it if HUB_MODEL_ID is set (unless the publish gate refuses), then mark
        the run done."""
        config, store = self.config, self.store
        status = {k: v for k, v in (store.read_status() or {}).items() if k != "error"}   # a refusal before
        if config.hub_model_id and config.publish_only_if_improved:
            refusal = _not_improved(self.out)
            if refusal:
                store.write_status({**status, "phase": Phase.FAILED, "error": refusal})
                raise BadInput(refusal)
        if config.hub_model_id:
            from .hub import publish
            store.check_lease()
            status = {**status, "phase": Phase.PUBLISHING}
            store.write_status(status)
            url = publish(config, self.reporter, self.out)
            status = {**status, "hub_commit_url": url, "hub_model_id": config.hub_model_id,
                      "hub_revision": config.hub_revision}
        store.write_status({**status, "phase": Phase.DONE})
        self.reporter.event("done", "run complete", run_id=config.resolved_run_id, output_dir=config.output_dir,
                            hub_commit_url=status.get("hub_commit_url"))


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


def launch_workers(config: Config, reporter: Reporter, topology: Topology) -> ExitCode:
    """Several GPUs: run the preflight checks once, here, and show their table, so that what a retry can't fix
    fails once, not once per worker; then start the workers under torchrun (job/distributed.py). The workers check
    again only their own GPU. A finished training is published by node 0 alone, without workers."""
    def stopped(signum, frame):
        # A preemption during the checks (dataset download, Hub calls) has nothing to save: retryable, exit 75.
        reporter.event("stopped", f"{signal.Signals(signum).name} during the preflight checks; nothing to save")
        raise SystemExit(ExitCode.STOPPED)

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        results, found = run_checks(config, topology, launcher=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    problems = report(results, reporter)
    if problems:
        raise BadInput("\n".join(problems))
    try:
        finished_training = found.run_store.final_committed()
    except StoreError as exc:
        raise BadInput(str(exc)) from None
    if finished_training:
        # Publishing (or nothing, if done) is node 0's alone: it must not wait for peers that already left.
        if config.node_rank == 0:
            Run(config, reporter, Topology(launcher_checked=True)).main()
        return ExitCode.DONE
    return launch(config)
