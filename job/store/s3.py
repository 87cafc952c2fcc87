"""A bucket and key prefix on S3 or an S3-compatible store (MinIO, R2, Ceph...) as the checkpoint store."""
from __future__ import annotations

import logging
import os
import random
import re
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import boto3
import boto3.exceptions
import boto3.s3.transfer
import botocore.config
import botocore.exceptions
import botocore.session

from .blob import ACCEPTED_FORMS, CheckpointStore, StoreError, check_key, check_prefix

log = logging.getLogger(__name__)

# Codes a retry cannot fix: the text says what to check. Messages are built here, never copied from
# the service, so neither credentials nor signed URLs can leak into them.
_PERMANENT_CODES = {
    "NoSuchBucket": "bucket '{bucket}' does not exist ({code}). Create it or fix CHECKPOINT_URI.",
    "InvalidBucketName": "'{bucket}' is not a valid bucket name ({code}). Fix CHECKPOINT_URI.",
    "AccessDenied": "access denied ({code}). Check that the credentials may list, read, write and "
    "delete objects under {uri}.",
    "AllAccessDisabled": "access to bucket '{bucket}' is disabled ({code}). Use another bucket.",
    "403": "access denied (HTTP 403). Check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and their "
    "permissions on {uri}.",
    "InvalidAccessKeyId": "the endpoint does not know this access key ({code}). Check "
    "AWS_ACCESS_KEY_ID and, for MinIO and others, AWS_ENDPOINT_URL_S3.",
    "SignatureDoesNotMatch": "the request signature was rejected ({code}). Check "
    "AWS_SECRET_ACCESS_KEY.",
    "ExpiredToken": "the session token has expired ({code}). Refresh AWS_SESSION_TOKEN.",
    "InvalidToken": "the session token was rejected ({code}). Check AWS_SESSION_TOKEN.",
    "TokenRefreshRequired": "the session token was rejected ({code}). Refresh AWS_SESSION_TOKEN.",
    "PermanentRedirect": "bucket '{bucket}' is in another region ({code}). Set AWS_REGION to "
    "the bucket's region.",
    "AuthorizationHeaderMalformed": "the request was signed for the wrong region ({code}). Set "
    "AWS_REGION to the bucket's region.",
}
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
    "InternalError", "ServiceUnavailable", "OperationAborted",
}
_TRANSIENT_EXCEPTIONS = (
    botocore.exceptions.ConnectionError,  # refused, unresolved, connect timeout (outside the probe)
    botocore.exceptions.HTTPClientError,  # reset, read timeout, body stream cut
    botocore.exceptions.IncompleteReadError,
    boto3.exceptions.RetriesExceededError,  # download_file gave up re-reading a body
)
_UNREACHABLE = (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError)


def _error_code(e: botocore.exceptions.ClientError) -> tuple[str, int]:
    return (
        str(e.response.get("Error", {}).get("Code", "")),
        int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0),
    )


def _redact_url(url: str | None) -> str:
    parts = urllib.parse.urlsplit(url or "")
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _checksums_when_required(session: botocore.session.Session) -> botocore.config.Config:
    """Checksums only where S3 requires one (DeleteObjects), unless the user's AWS settings choose otherwise.

    boto3 1.36 and later add CRC checksums to every upload and validate them on every download, which older
    Ceph and MinIO releases and other S3-compatible stores refuse. An explicit client Config outranks the AWS_*
    variables and the profile, so it is set only where neither AWS_REQUEST_CHECKSUM_CALCULATION /
    AWS_RESPONSE_CHECKSUM_VALIDATION nor the profile's request_checksum_calculation /
    response_checksum_validation says anything."""
    chosen = {}
    for name in ("request_checksum_calculation", "response_checksum_validation"):
        if not os.environ.get(f"AWS_{name.upper()}") and name not in session.get_scoped_config():
            chosen[name] = "when_required"
    return botocore.config.Config(**chosen)


class S3Store(CheckpointStore):
    """A bucket and key prefix on S3 or an S3-compatible store (MinIO, R2, Ceph...).

    Credentials, region and endpoint come only from boto3's own configuration (AWS_* environment
    variables, including AWS_ENDPOINT_URL_S3 and AWS_ENDPOINT_URL, which botocore reads itself).
    """

    def __init__(self, uri: str, *, max_attempts: int = 10, object_attempts: int = 4, backoff_s: float = 1.0,
                 multipart_threshold: int = 64 << 20):
        parts = urllib.parse.urlsplit(uri)
        self.bucket = parts.netloc
        prefix = parts.path.strip("/")
        self.uri = f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"
        if parts.scheme != "s3" or not re.fullmatch(r"[A-Za-z0-9.\-_]{1,255}", self.bucket):
            raise StoreError(f"CHECKPOINT_URI {uri}: no valid bucket name. Use {ACCEPTED_FORMS}.")
        if prefix:
            try:
                check_key(prefix)
            except ValueError:
                raise StoreError(f"CHECKPOINT_URI {uri}: the key prefix '{prefix}' has empty, '.' or "
                                 f"'..' parts. Use {ACCEPTED_FORMS}.") from None
        self._base = f"{prefix}/" if prefix else ""
        self._object_attempts = object_attempts
        self._backoff_s = backoff_s
        # botocore retries single requests (5xx, SlowDown, resets, timeouts) with exponential backoff
        # and full jitter. A custom endpoint already gets path-style addressing, which MinIO needs,
        # unless s3.addressing_style says 'virtual', so nothing is set for it here.
        config = botocore.config.Config(
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=10,
            read_timeout=120,
            max_pool_connections=16,
        )
        # The probe is the first contact: a refused connection or unknown host there is a wrong
        # endpoint, not a blip, so it gets few attempts and a short connect timeout.
        probe_config = config.merge(
            botocore.config.Config(retries={"mode": "standard", "total_max_attempts": 3}, connect_timeout=5)
        )
        try:
            botocore_session = botocore.session.Session()
            config = config.merge(_checksums_when_required(botocore_session))
            probe_config = probe_config.merge(_checksums_when_required(botocore_session))
            session = boto3.session.Session(botocore_session=botocore_session)  # not thread-safe; clients are
            self._client = session.client("s3", config=config)
            self._probe_client = session.client("s3", config=probe_config)
        except ValueError as e:
            raise StoreError(
                f"CHECKPOINT_URI {self.uri}: the S3 endpoint URL is not valid. Check "
                "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL."
            ) from e
        except botocore.exceptions.BotoCoreError as e:
            raise StoreError(f"CHECKPOINT_URI {self.uri}: cannot set up the S3 client "
                             f"({type(e).__name__}). Check the AWS_* settings.") from e
        self._transfer = boto3.s3.transfer.TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_threshold, max_concurrency=8
        )

    def _key(self, key: str) -> str:
        return self._base + check_key(key)

    def _permanent(self, text: str) -> StoreError:
        return StoreError(f"CHECKPOINT_URI {self.uri}: {text}")

    def _call(self, what: str, fn: Callable[[], object], *, probe: bool = False):
        """Run one whole-object operation, retrying transient failures that botocore gave up on.

        botocore retries each HTTP request; this loop also covers what it cannot: a body stream
        cut mid-read, a managed transfer that failed, and a retry budget spent during an outage.
        """
        for attempt in range(1, self._object_attempts + 1):
            try:
                return fn()
            except (botocore.exceptions.ClientError, boto3.exceptions.S3UploadFailedError) as e:
                # upload_file wraps the ClientError in S3UploadFailedError without chaining it explicitly.
                cause = e if isinstance(e, botocore.exceptions.ClientError) else e.__context__
                if not isinstance(cause, botocore.exceptions.ClientError):
                    raise
                code, status = _error_code(cause)
                if code in _PERMANENT_CODES:
                    raise self._permanent(
                        _PERMANENT_CODES[code].format(code=code, bucket=self.bucket, uri=self.uri)
                    ) from e
                if not (code in _TRANSIENT_CODES or status >= 500 or status == 429):
                    if probe:
                        raise self._permanent(
                            f"{what} failed ({code or 'HTTP'} {status}). Check the bucket, the "
                            "credentials and AWS_ENDPOINT_URL_S3."
                        ) from e
                    raise
                error, failure = e, f"{code} (HTTP {status})"
            except (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError) as e:
                raise self._permanent(
                    "no complete AWS credentials found. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."
                ) from e
            except botocore.exceptions.SSLError as e:
                if probe:
                    raise self._permanent(
                        f"TLS with {_redact_url(self._probe_client.meta.endpoint_url)} failed. Check "
                        "the endpoint URL's scheme and AWS_CA_BUNDLE."
                    ) from e
                error, failure = e, type(e).__name__
            except _UNREACHABLE as e:
                if probe:
                    raise self._permanent(
                        f"cannot connect to the S3 endpoint {_redact_url(self._probe_client.meta.endpoint_url)} "
                        f"({self._why_unreachable(e)}). Check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL "
                        "and that the server is up."
                    ) from e
                error, failure = e, type(e).__name__
            except _TRANSIENT_EXCEPTIONS as e:
                error, failure = e, type(e).__name__
            if attempt == self._object_attempts:
                raise error  # the last transient error, unchanged: a later retry may still work
            delay = random.uniform(0, min(30.0, self._backoff_s * 2 ** (attempt - 1)))
            log.warning("%s: %s failed (%s); attempt %d of %d in %.1fs", self.uri, what, failure,
                        attempt + 1, self._object_attempts, delay)
            time.sleep(delay)

    @staticmethod
    def _why_unreachable(e: Exception) -> str:
        if isinstance(e, botocore.exceptions.ConnectTimeoutError):
            return "connect timed out"
        detail = str(getattr(e, "kwargs", {}).get("error", "")).lower()
        if "refused" in detail:
            return "connection refused"
        if any(s in detail for s in ("name or service not known", "nodename nor servname", "name resolution")):
            return "host name not found"
        return "connection failed"

    def put_file(self, key: str, path: Path) -> None:
        k = self._key(key)
        self._call(f"upload {key}", lambda: self._client.upload_file(
            str(path), self.bucket, k, Config=self._transfer))
        return None   # (the upload's own checksums are S3's; the manifest's sha256 is hashed apart)

    def copy(self, source: str, key: str) -> bool:
        k, src = self._key(key), {"Bucket": self.bucket, "Key": self._key(source)}

        def copy():
            try:   # the managed copy: one CopyObject, or a multipart copy for an object over its threshold
                self._client.copy(src, self.bucket, k, Config=self._transfer)
            except botocore.exceptions.ClientError as e:
                if _error_code(e)[1] == 404:
                    raise FileNotFoundError(f"{self.uri}/{source}") from None
                raise

        self._call(f"copy {source} to {key}", copy)
        return True

    def put_bytes(self, key: str, data: bytes) -> None:
        k = self._key(key)
        self._call(f"put {key}", lambda: self._client.put_object(Bucket=self.bucket, Key=k, Body=data))

    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        k = self._key(key)

        def get():
            try:
                reply = self._client.get_object(Bucket=self.bucket, Key=k)
            except botocore.exceptions.ClientError as e:
                if _error_code(e)[0] == "NoSuchKey":
                    return None
                raise
            return reply["Body"].read(), reply["ETag"]

        return self._call(f"get {key}", get)

    def put_if(self, key: str, data: bytes, tag: str | None) -> bool:
        k = self._key(key)
        condition = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}

        def put():
            try:
                self._client.put_object(Bucket=self.bucket, Key=k, Body=data, **condition)
                return True
            except botocore.exceptions.ClientError as e:
                code, status = _error_code(e)
                # 412: not as last seen. 409 ConditionalRequestConflict: a concurrent conditional write won (AWS).
                # NoSuchKey: If-Match on an object that is gone (moto).
                if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                    return False
                raise

        # A retried write whose first try landed reads as False; the lease compares what it finds (lease.py).
        return self._call(f"conditional put {key}", put)

    def get_file(self, key: str, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        k = self._key(key)

        def download():
            try:
                self._client.download_file(self.bucket, k, str(path), Config=self._transfer)
            except botocore.exceptions.ClientError as e:
                if _error_code(e)[0] in ("404", "NoSuchKey"):
                    raise FileNotFoundError(f"{self.uri}/{key}") from None
                raise

        self._call(f"download {key}", download)

    def get_bytes(self, key: str) -> bytes | None:
        k = self._key(key)

        def get():
            try:
                return self._client.get_object(Bucket=self.bucket, Key=k)["Body"].read()
            except botocore.exceptions.ClientError as e:
                if _error_code(e)[0] == "NoSuchKey":
                    return None
                raise

        return self._call(f"get {key}", get)

    def list(self, prefix: str) -> list[str]:
        full = self._base + check_prefix(prefix)

        def scan():
            keys = []
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):  # "folder" markers some consoles create
                        keys.append(obj["Key"][len(self._base):])
            return keys

        return sorted(self._call(f"list {prefix or '/'}", scan))

    def delete(self, keys: Iterable[str]) -> None:
        full = [self._key(k) for k in keys]
        for start in range(0, len(full), 1000):  # the most one DeleteObjects call takes
            batch = full[start:start + 1000]

            def delete_batch():
                reply = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
                errors = reply.get("Errors", [])
                if errors:  # per-key failures arrive in a 200 reply; raise them like request errors
                    raise botocore.exceptions.ClientError(
                        {"Error": {"Code": errors[0].get("Code", ""), "Message": ""},
                         "ResponseMetadata": {"HTTPStatusCode": 500 if errors[0].get("Code") in
                                              _TRANSIENT_CODES else 400}},
                        "DeleteObjects",
                    )

            self._call(f"delete {len(batch)} objects", delete_batch)

    def abort_uploads(self, prefix: str) -> int:
        full = self._base + check_prefix(prefix)

        def abort_all() -> int:
            aborted = 0
            for page in self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                     Prefix=full):
                for upload in page.get("Uploads", []):
                    try:
                        self._client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                            UploadId=upload["UploadId"])
                        aborted += 1
                    except botocore.exceptions.ClientError as e:
                        if _error_code(e)[0] != "NoSuchUpload":   # gone meanwhile: fine
                            raise
            return aborted

        return self._call(f"abort unfinished uploads under {prefix}", abort_all)

    def probe(self) -> None:
        key = f"_probe/{uuid.uuid4().hex}"
        k = self._key(key)
        payload = f"probe {key}".encode()
        c = self._probe_client
        self._call("probe write", lambda: c.put_object(Bucket=self.bucket, Key=k, Body=payload), probe=True)
        got = self._call("probe read", lambda: c.get_object(Bucket=self.bucket, Key=k)["Body"].read(), probe=True)
        self._call("probe delete", lambda: c.delete_object(Bucket=self.bucket, Key=k), probe=True)
        if got != payload:
            raise self._permanent("an object written under _probe/ did not read back the same. "
                                  "Check the endpoint is an S3-compatible store.")

