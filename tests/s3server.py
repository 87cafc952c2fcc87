"""S3 for tests: moto in server mode on a loopback port, reached over real HTTP.

moto runs as a subprocess so that a job under test, itself a subprocess, reaches it exactly as it
would reach MinIO: through AWS_ENDPOINT_URL_S3. ``FlakyProxy`` sits in front of it and misbehaves on
request (503 SlowDown, 500, connection reset) to prove retries over the wire.

Use the fixture with ``from tests.s3server import s3_server`` in a test module or conftest (or
``pytest_plugins = ["tests.s3server"]``).
"""

from __future__ import annotations

import http.client
import http.server
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

import boto3
import pytest

__all__ = ["FlakyProxy", "MotoServer", "s3_server", "start_moto"]

REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MotoServer:
    """A running ``python -m moto.server``. ``env()`` is what boto3 (in or out of process) needs."""

    endpoint: str
    process: subprocess.Popen
    access_key: str = "testing"
    secret_key: str = "testing"

    def env(self) -> dict[str, str]:
        """AWS_* variables for a subprocess (drop any other AWS_* it would inherit)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            # Keep a developer's ~/.aws and the EC2 metadata service out of the tests.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, **credentials):
        """A boto3 client configured by arguments only, so tests can set up state whatever the env says."""
        return boto3.session.Session(
            aws_access_key_id=credentials.get("aws_access_key_id", self.access_key),
            aws_secret_access_key=credentials.get("aws_secret_access_key", self.secret_key),
            region_name=REGION,
        ).client("s3", endpoint_url=self.endpoint)

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_moto(extra_env: dict[str, str] | None = None, timeout: float = 30.0) -> MotoServer:
    """Start moto's server on a free loopback port and wait until it answers.

    extra_env reaches moto itself, e.g. {"INITIAL_NO_AUTH_ACTION_COUNT": "2"} to make it check
    credentials after the first two requests.
    """
    for _ in range(3):  # the free port can be taken between choosing it and moto binding it
        port = _free_port()
        env = {**os.environ, **(extra_env or {})}
        # A file, not a pipe: moto logs every request, and a pipe nobody reads fills up and stalls it.
        output = tempfile.TemporaryFile()
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env=env, stdout=output, stderr=subprocess.STDOUT,
        )
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return MotoServer(endpoint, proc)
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            raise RuntimeError(f"moto server did not answer on {endpoint} within {timeout}s")
        output.seek(0)
        err = output.read().decode(errors="replace")[-2000:]
        if "address already in use" not in err.lower():
            raise RuntimeError(f"moto server exited with {proc.returncode}: {err}")
    raise RuntimeError("moto server found no free port")


@pytest.fixture(scope="session")
def s3_server():
    """One moto server for the session (credentials not checked). Use a fresh bucket per test."""
    server = start_moto()
    yield server
    server.stop()


# ---------------------------------------------------------------- fault injection


_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
}


@dataclass
class ProxyRecord:
    method: str
    path: str
    outcome: str  # "forwarded", "503", "500" or "reset"


@dataclass
class FlakyProxy:
    """A threaded HTTP reverse proxy in front of ``upstream`` that fails on request.

    ``fail_next(n, "503" | "500" | "reset")`` makes the next n requests fail that way; ``records``
    lists every request with its outcome. Use as a context manager or call ``close()``.
    """

    upstream: str
    records: list[ProxyRecord] = field(default_factory=list)

    def __post_init__(self):
        up = urllib.parse.urlsplit(self.upstream)
        self._upstream = (up.hostname, up.port)
        self._faults: list[str] = []
        self._holds: list[tuple[str, threading.Event]] = []
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="flaky-proxy",
                                        daemon=True)
        self._thread.start()

    def hold(self, path_part: str) -> threading.Event:
        """Stall every request whose path contains path_part, as a slow upload would, until release();
        then drop it unanswered. Returns an event that is set once such a request has arrived."""
        seen = threading.Event()
        with self._lock:
            self._holds.append((path_part, seen))
        return seen

    def release(self) -> None:
        with self._lock:
            self._holds.clear()
        self._released.set()

    def _held(self, path: str) -> bool:
        with self._lock:
            matches = [seen for part, seen in self._holds if part in path]
        for seen in matches:
            seen.set()
        if matches:
            self._released.wait(120)
        return bool(matches)

    def fail_next(self, n: int, how: str = "503") -> None:
        if how not in (*_ERRORS, "reset"):
            raise ValueError(f"how must be one of {[*_ERRORS, 'reset']}, got {how!r}")
        with self._lock:
            self._faults.extend([how] * n)

    def outcomes(self, method: str | None = None) -> list[str]:
        with self._lock:
            return [r.outcome for r in self.records if method in (None, r.method)]

    def _take(self, method: str, path: str) -> str | None:
        with self._lock:
            how = self._faults.pop(0) if self._faults else None
            self.records.append(ProxyRecord(method, path, how or "forwarded"))
            return how

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FlakyProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _handler_for(proxy: FlakyProxy):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b""):  # trailers
                    pass
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _handle(self) -> None:
            body = self._body()
            if proxy._held(self.path):
                self.close_connection = True
                return
            how = proxy._take(self.command, self.path)
            if how == "reset":
                # SO_LINGER 0 makes close() send RST: the client sees "connection reset by peer".
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
                return
            if how in _ERRORS:
                status, code, message = _ERRORS[how]
                xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                       f"<Message>{message}</Message><RequestId>flaky-proxy</RequestId></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
            headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(*proxy._upstream, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status, reply.reason)
                for k, v in reply.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                # A HEAD reply carries the object's length but no body.
                length = reply.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            finally:
                conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        def finish(self) -> None:
            try:
                super().finish()
            except OSError:
                pass  # the socket we reset on purpose

        def log_message(self, format, *args) -> None:
            pass

    return Handler
