"""`python -m job COMMAND`. Environment variables are read here, once, and nowhere else."""
from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Callable

import click

from .config import BadInput, Config, ConfigError, ExitCode, env_example, from_env


def _config() -> Config:
    try:
        return from_env(os.environ)
    except ConfigError as exc:
        for line in exc.problems:
            click.echo(f"error: {line}", err=True)
        sys.exit(ExitCode.BAD_INPUT)


def _topology():
    from .distributed import Topology
    return Topology.from_env(os.environ)


def _reporter(config: Config):
    from .log import Reporter
    return Reporter(config.log_format, secrets=config.secrets() + _foreign_secrets(),
                    quiet=not _topology().is_main)


def _foreign_secrets() -> list[str]:
    # Keys that boto3 reads itself: we never print them, and mask them should a library echo one.
    return [v for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
            if (v := os.environ.get(k)) and len(v) >= 8]


def _quiet_libraries() -> None:
    # Library deprecation notices (transformers 5 renames) say nothing the user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Persona QLoRA fine-tuning job. Configured by environment variables (see .env.example).
    Without a command, runs `train`."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(train)


@cli.command()
def train() -> None:
    """Train (or resume, or publish, or nothing if done) the run of this configuration."""
    config = _config()
    from .distributed import wants_launch
    from .speed.warm import persistent_compile_cache, start_early
    # Now, before anything imports torch._inductor: its config's import sets TORCHINDUCTOR_CACHE_DIR to its /tmp
    # default, after which the compile caches would never go beside the Hub cache (a volume).
    persistent_compile_cache()
    from .toolchain import start_early_probe
    topology = _topology()
    launch = wants_launch(config, topology)
    # Started before this process's own imports: the GPU row's Triton probe (job/toolchain.py), and where the run
    # may compile, the compile's helper (job/speed/warm.py)
    early_probe = None if launch else start_early_probe(config, topology)
    warmup = None if launch else start_early(config, topology)
    _quiet_libraries()
    from .run import Run, launch_workers
    reporter = _reporter(config)
    if launch:
        sys.exit(_outcome(config, reporter, lambda: launch_workers(config, reporter, topology), lambda: "launch"))
    run = Run(config, reporter, topology, warmup=warmup, early_probe=early_probe)
    sys.exit(_outcome(config, reporter, run.main, lambda: run.phase))


def _outcome(config: Config, reporter, command: Callable[[], ExitCode | None],
             phase: Callable[[], str]) -> ExitCode:
    """The exit code of a command: 2 for bad input (one `error:` line per problem), 75 when a signal stopped it; a
    stalled checkpoint store is one line too, and 2 when the store refuses for good (UPLOAD_STALL_SECONDS); 73
    when another live process holds the run's lease.
    The one handler of everything else that escapes: one line naming the phase (`phase()`) and the error, secrets
    masked, exit 1; the traceback only at LOG_LEVEL=debug."""
    from .run import Stopped
    from .store.lease import LeaseHeld
    from .store.uploader import UploadStalled
    try:
        return command() or ExitCode.DONE
    except BadInput as exc:
        reporter.error(str(exc))
        return ExitCode.BAD_INPUT
    except UploadStalled as exc:
        reporter.error(str(exc))
        return ExitCode.BAD_INPUT if exc.permanent else ExitCode.FAILED
    except LeaseHeld as exc:
        reporter.error(str(exc))
        return ExitCode.LEASE_HELD
    except Stopped as exc:
        reporter.event("stopped", str(exc))
        return ExitCode.STOPPED
    except Exception as exc:
        reporter.crash(phase(), exc, traceback=config.log_level == "debug")
        return ExitCode.FAILED


@cli.command()
def preflight() -> None:
    """Check the settings, GPU and 4-bit kernels, model and dataset access, the checkpoint store, Hub push
    access, disk space and the memory estimate, in seconds and without loading the model. Prints a table (JSON
    events in a pod's log) and one `error:` line per failure; exit 2 if any check fails."""
    from .checks import config_failed, run_checks
    from .log import Reporter
    try:
        config = from_env(os.environ)
    except ConfigError as exc:   # no Config, so no LOG_FORMAT or secrets from it: take what the environment says
        mode = os.environ.get("LOG_FORMAT", "auto")
        reporter = Reporter(mode if mode in ("auto", "bar", "json") else "auto",
                            secrets=[os.environ.get("HF_TOKEN", "").strip()] + _foreign_secrets())
        results = config_failed(exc.problems)
        sys.exit(_shown(results, reporter))
    from .toolchain import start_early_probe
    topology = _topology()
    early_probe = start_early_probe(config, topology)
    _quiet_libraries()
    reporter = _reporter(config)
    sys.exit(_outcome(config, reporter, lambda: _shown(run_checks(config, topology, early_probe=early_probe)[0],
                                                       reporter), lambda: "preflight"))


def _shown(results, reporter) -> ExitCode:
    """The preflight table (or events), then one `error:` line per failure: exit 2 if any."""
    from .checks import report
    problems = report(results, reporter)
    for problem in problems:
        reporter.error(problem)
    return ExitCode.BAD_INPUT if problems else ExitCode.DONE


@cli.command()
def publish() -> None:
    """Push this run's committed final adapter to HUB_MODEL_ID (no training); a no-op if already pushed."""
    config = _config()
    _quiet_libraries()
    from .run import Run
    reporter = _reporter(config)
    run = Run(config, reporter)
    sys.exit(_outcome(config, reporter, run.publish_only, lambda: run.phase))


@cli.command("config")
def show_config() -> None:
    """Print the resolved configuration as JSON, secrets redacted."""
    click.echo(json.dumps(_config().redacted(), indent=2))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print status.json as stored, plus committed_checkpoints.")
def status(as_json: bool) -> None:
    """Where this configuration's run stands: phase, step, loss, speed, ETA, checkpoints, Hub commit.

    Exit 0 if the run exists, 1 if it has no status.json, 2 if the store can't be read or the settings are bad."""
    from .status import render_status
    from .store import StoreError, read_status
    config = _config()
    try:
        found, committed = read_status(config.checkpoint_uri, config.resolved_run_id)
    except StoreError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.BAD_INPUT)
    if found is None:
        click.echo(f"no run {config.resolved_run_id!r} under {config.checkpoint_uri}", err=True)
        sys.exit(ExitCode.FAILED)
    if as_json:
        text = json.dumps({**found, "committed_checkpoints": committed}, indent=2)
    else:
        text = render_status(found, committed)
    for secret in config.secrets() + _foreign_secrets():  # status.json holds none; a stray error text might
        text = text.replace(secret, "***")
    click.echo(text)


@cli.command()
@click.option("--torch", "torch_version", help="Fail unless torch reports this version (the image's pin).")
@click.option("--cuda", help="Fail unless torch is built for this CUDA version.")
def toolchain(torch_version: str | None, cuda: str | None) -> None:
    """The image's GPU-parity check, on a CPU: Triton's launcher compiled and loaded, a Triton kernel compiled for
    a GPU, inductor compiling CPU code, liger-kernel and bitsandbytes importing, the torch build. Exit 1 if any
    step fails."""
    from .toolchain import parity, render
    results = parity(torch_version, cuda)
    click.echo(render(results))
    sys.exit(ExitCode.DONE if all(passed for _, passed, _ in results) else ExitCode.FAILED)


@cli.command("env-example")
def show_env_example() -> None:
    """Print .env.example, generated from the config definition."""
    click.echo(env_example(), nl=False)


@cli.command("tiny-model")
@click.argument("directory")
def tiny_model(directory: str) -> None:
    """Build a tiny random Llama and tokenizer in DIRECTORY (for the CPU demo and tests)."""
    from .tiny import build_tiny_model
    build_tiny_model(directory)
    click.echo(directory)
