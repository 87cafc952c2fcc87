"""The checkpoint store: where a run's checkpoints, final adapter and status live (DESIGN.md's layout).

- blob.py: the flat object store interface (bytes under keys) and StoreError;
- local.py, s3.py: its two kinds, a local directory and an S3 bucket;
- run_store.py: one run's layout and the commit protocol (manifests, status.json, run.json);
- uploader.py: commits in the background, from a child process.

`open_store` is the one place a CHECKPOINT_URI becomes a store.
"""
from __future__ import annotations

import os
import urllib.parse

from ..config import checkpoint_uri_problem, local_store_path, without_credentials
from .blob import CheckpointStore, StoreError
from .local import LocalStore
from .run_store import RunStore
from .s3 import S3Store

__all__ = ["CheckpointStore", "StoreError", "open_store", "read_status"]


def open_store(uri: str, *, look: bool = False) -> CheckpointStore:
    """'s3://bucket/prefix' gives an S3Store; an absolute or ./ path, or file:///path, a LocalStore (created if
    missing); anything else is refused (config.checkpoint_uri_problem). `look`: for a quick look rather than a job,
    one try per request, so a wrong or dead endpoint answers in seconds, not minutes."""
    problem = checkpoint_uri_problem(uri)
    if problem:
        raise StoreError(f"CHECKPOINT_URI {without_credentials(uri)}: {problem}")
    if uri.startswith("s3://"):
        return S3Store(uri, max_attempts=2, object_attempts=1) if look else S3Store(uri)
    return LocalStore(local_store_path(uri))


def read_status(uri: str, run_id: str) -> tuple[dict | None, list[int]]:
    """A run's status.json and its committed steps, for `python -m job status`; (None, []) if there is no such run.
    StoreError (one line, no credentials) when the store can't be read."""
    import botocore.exceptions

    local = local_store_path(uri)
    if local is not None and not checkpoint_uri_problem(uri) and not os.path.isdir(os.path.expanduser(local)):
        return None, []   # a look must not create the store directory, as opening a LocalStore would
    try:
        run_store = RunStore(open_store(uri, look=True), run_id)
        found = run_store.read_status()
        return found, run_store.committed_steps() if found is not None else []
    except StoreError:
        raise
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
    raise StoreError(problem)
