"""`python -m job COMMAND`. Environment variables are read here, once, and nowhere else."""
from __future__ import annotations

import json
import os
import signal
import sys
import urllib.parse
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
    from .distributed import wants_launch
    if wants_launch(config, _topology()):
        sys.exit(_launch_checked(config))
    from .train import main
    sys.exit(main(config, _reporter(config), _topology()))


def _launch_checked(config: Config) -> int:
    """Run the preflight checks once, before starting the workers under torchrun, and show their table: what a
    retry can't fix fails here, not once per worker. The workers check again only their own GPU."""
    from .distributed import Topology, launch
    from .preflight import report, run_checks
    from .storage import StoreError
    reporter = _reporter(config)

    def stopped(signum, frame):
        # A preemption during the checks (dataset download, Hub calls) has nothing to save: retryable, exit 75.
        reporter.event("stopped", f"{signal.Signals(signum).name} during the preflight checks; nothing to save")
        sys.exit(75)

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        checks = run_checks(config, _topology(), launcher=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    problems = report(checks.results, reporter)
    for problem in problems:
        reporter.error(problem)
    if problems:
        return 2
    try:
        finished_training = checks.found.run_store.final_committed()
    except StoreError as exc:
        reporter.error(str(exc))
        return 2
    if finished_training:
        # Publishing (or nothing, if done) is node 0's alone: it must not wait for peers that already left.
        if config.node_rank != 0:
            return 0
        from .train import main
        return main(config, reporter, Topology(launcher_checked=True))
    return launch(config)


@cli.command()
def preflight() -> None:
    """Check the settings, GPU and 4-bit kernels, model and dataset access, the checkpoint store, Hub push
    access, disk space and the memory estimate, in seconds and without loading the model. Prints a table (JSON
    events in a pod's log) and one `error:` line per failure; exit 2 if any check fails."""
    from .log import Reporter
    from .preflight import config_failed, report, run_checks
    try:
        config = from_env(os.environ)
    except ConfigError as exc:   # no Config, so no LOG_FORMAT or secrets from it: take what the environment says
        mode = os.environ.get("LOG_FORMAT", "auto")
        reporter = Reporter(mode if mode in ("auto", "bar", "json") else "auto",
                            secrets=[os.environ.get("HF_TOKEN", "")] + _foreign_secrets())
        results = config_failed(exc.problems)
    else:
        _quiet_libraries()
        reporter = _reporter(config)
        results = run_checks(config, _topology()).results
    problems = report(results, reporter)
    for problem in problems:
        reporter.error(problem)
    sys.exit(2 if problems else 0)


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
@click.option("--json", "as_json", is_flag=True, help="Print status.json as stored, plus committed_checkpoints.")
def status(as_json: bool) -> None:
    """Where this configuration's run stands: phase, step, loss, speed, ETA, checkpoints, Hub commit.

    Exit 0 if the run exists, 1 if it has no status.json, 2 if the store can't be read or the settings are bad."""
    from .status import render_status
    config = _config()
    found, committed = _read_status(config)
    if found is None:
        click.echo(f"no run {config.resolved_run_id!r} under {config.checkpoint_uri}", err=True)
        sys.exit(1)
    if as_json:
        text = json.dumps({**found, "committed_checkpoints": committed}, indent=2)
    else:
        text = render_status(found, committed)
    for secret in config.secrets() + _foreign_secrets():  # status.json holds none; a stray error text might
        text = text.replace(secret, "***")
    click.echo(text)


def _read_status(config: Config) -> tuple[dict | None, list[int]]:
    """status.json and the committed steps; exit 2 with one line if the store can't be read."""
    import botocore.exceptions
    from .storage import RunStore, S3Store, StoreError, open_store
    uri = config.checkpoint_uri
    if "://" not in uri and not os.path.isdir(os.path.expanduser(uri)):
        return None, []   # a look must not create the store directory, as opening a LocalStore would
    try:
        # A look, not a job: one try per request, so a wrong or dead endpoint answers in seconds, not minutes.
        store = S3Store(uri, max_attempts=2, object_attempts=1) if uri.startswith("s3://") else open_store(uri)
        run_store = RunStore(store, config.resolved_run_id)
        found = run_store.read_status()
        return found, run_store.committed_steps() if found is not None else []
    except StoreError as exc:
        problem = str(exc)
    except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError) as exc:
        where = urllib.parse.urlsplit(exc.kwargs.get("endpoint_url", ""))   # host only: no key, no user info
        problem = (f"CHECKPOINT_URI {uri}: cannot connect to the S3 endpoint {where.scheme}://{where.hostname}"
                   f"{f':{where.port}' if where.port else ''} ({type(exc).__name__}). Check AWS_ENDPOINT_URL_S3 / "
                   "AWS_ENDPOINT_URL and that the server is up.")
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        # Our own words: botocore's text may carry a signed URL.
        problem = (f"CHECKPOINT_URI {uri}: cannot read the run's status.json ({type(exc).__name__}). Check "
                   "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, the credentials, and that the server is up.")
    except OSError as exc:
        problem = f"CHECKPOINT_URI {uri}: cannot read the run's status.json ({exc.strerror or type(exc).__name__})."
    click.echo(f"error: {problem}", err=True)
    sys.exit(2)


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
    sys.exit(0 if all(passed for _, passed, _ in results) else 1)


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
