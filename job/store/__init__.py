"""The checkpoint store: where a run's checkpoints, final adapter and status live (DESIGN.md's layout).

- blob.py: the flat object store interface (bytes under keys) and StoreError;
- local.py, s3.py: its two kinds, a local directory and an S3 bucket;
- run_store.py: one run's layout and the commit protocol (manifests, status.json, run.json);
- uploader.py: commits in the background, from a child process.

`open_store` is the one place a CHECKPOINT_URI becomes a store.
"""
from __future__ import annotations

import os
import re
import urllib.parse

from .blob import ACCEPTED_FORMS, CheckpointStore, StoreError
from .local import LocalStore
from .run_store import RunStore
from .s3 import S3Store

__all__ = ["CheckpointStore", "StoreError", "open_store", "read_status"]


def open_store(uri: str, *, look: bool = False) -> CheckpointStore:
    """'s3://bucket/prefix' gives an S3Store; a path gives a LocalStore (created if missing). `look`: for a quick
    look rather than a job, one try per request, so a wrong or dead endpoint answers in seconds, not minutes."""
    if uri.startswith("s3://"):
        return S3Store(uri, max_attempts=2, object_attempts=1) if look else S3Store(uri)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", uri):
        scheme = uri.split("://", 1)[0]
        raise StoreError(
            f"CHECKPOINT_URI {uri}: the scheme '{scheme}://' is not supported. "
            f"Use {ACCEPTED_FORMS}."
        )
    if not uri:
        raise StoreError(f"CHECKPOINT_URI is empty. Use {ACCEPTED_FORMS}.")
    return LocalStore(uri)


def read_status(uri: str, run_id: str) -> tuple[dict | None, list[int]]:
    """A run's status.json and its committed steps, for `python -m job status`; (None, []) if there is no such run.
    StoreError (one line, no credentials) when the store can't be read."""
    import botocore.exceptions

    if "://" not in uri and not os.path.isdir(os.path.expanduser(uri)):
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
