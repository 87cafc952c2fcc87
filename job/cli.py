"""`python -m job COMMAND`. Environment variables are read here, once, and nowhere else."""
from __future__ import annotations

import json
import os
import sys
import warnings

import click

from .config import Config, ConfigError, env_example, from_env


def _config() -> Config:
    try:
        return from_env(os.environ)
    except ConfigError as exc:
        for line in exc.problems:
            click.echo(f"error: {line}", err=True)
        sys.exit(2)


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
    _quiet_libraries()
    from .distributed import launch, wants_launch
    if wants_launch(config, _topology()):
        sys.exit(_launch_checked(config))
    from .train import main
    sys.exit(main(config, _reporter(config), _topology()))


def _launch_checked(config: Config) -> int:
    """Check what a retry can't fix before starting the workers under torchrun."""
    from .distributed import launch
    from .train import BadInput, check_machine
    reporter = _reporter(config)
    try:
        check_machine(config)
    except BadInput as exc:
        reporter.error(str(exc))
        return 2
    from .storage import RunStore, StoreError, open_store
    try:
        run_store = RunStore(open_store(config.checkpoint_uri), config.resolved_run_id)
        finished_training = run_store.final_committed()
    except StoreError as exc:
        reporter.error(str(exc))
        return 2
    if finished_training:
        # Publishing (or nothing, if done) is node 0's alone: it must not wait for peers that already left.
        if config.node_rank != 0:
            return 0
        from .train import main
        return main(config, reporter)
    return launch(config)


@cli.command()
def preflight() -> None:
    """Check configuration, GPU, storage, Hub access and data without loading the model."""
    config = _config()
    _quiet_libraries()
    from .train import BadInput, preflight as run_preflight
    reporter = _reporter(config)
    try:
        run_preflight(config, reporter)
    except BadInput as exc:
        reporter.error(str(exc))
        sys.exit(2)


@cli.command()
def publish() -> None:
    """Push this run's committed final adapter to HUB_MODEL_ID (no training); a no-op if already pushed."""
    config = _config()
    _quiet_libraries()
    from .train import publish_only
    sys.exit(publish_only(config, _reporter(config)))


@cli.command("config")
def show_config() -> None:
    """Print the resolved configuration as JSON, secrets redacted."""
    click.echo(json.dumps(_config().redacted(), indent=2))


@cli.command()
def status() -> None:
    """Print status.json of this configuration's run: phase, step, newest checkpoint, Hub commit."""
    config = _config()
    from .storage import RunStore, StoreError, open_store
    try:
        run_store = RunStore(open_store(config.checkpoint_uri), config.resolved_run_id)
        found = run_store.read_status()
        committed = run_store.committed_steps()
    except StoreError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if found is None:
        click.echo(f"no run {config.resolved_run_id!r} under {config.checkpoint_uri}", err=True)
        sys.exit(1)
    click.echo(json.dumps({**found, "committed_checkpoints": committed}, indent=2))


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
