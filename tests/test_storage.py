"""The checkpoint store and its commit protocol, on a local directory and on two real S3 servers over HTTP: moto,
and SeaweedFS, which checks every request's signature."""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import boto3
import pytest

from fakes.s3 import MOTO_KEYS, SEAWEEDFS_KEYS, SEAWEEDFS_NO_PERMISSION_KEYS, FlakyProxy, start_moto
from job.store import CheckpointStore, StoreError, open_store
from job.store.local import LocalStore
from job.store.run_store import CorruptCheckpoint, RunStore
from job.store.s3 import S3Store
from job.store.uploader import BackgroundUploader

SECRET = "s3cr3t-MARKER-never-print-me"
SECRETS = (SECRET, MOTO_KEYS[1], SEAWEEDFS_KEYS[1], SEAWEEDFS_NO_PERMISSION_KEYS[1])
RUN = "persona-1a2b3c"


# ---------------------------------------------------------------- helpers


def use_aws_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Exactly these AWS_* variables, as the container would have them; boto3 reads them itself."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def fresh_bucket() -> str:
    return f"ckpt-{uuid.uuid4().hex[:16]}"


def write_checkpoint(root: Path, step: int) -> Path:
    """What the Trainer leaves in checkpoint-N: binary tensors, JSON, a subfolder, an empty file."""
    d = root / f"checkpoint-{step}"
    rng = random.Random(step)
    files = {
        "adapter_model.safetensors": rng.randbytes(200_000),
        "empty.txt": b"",
        "optimizer.pt": rng.randbytes(400_000),
        "rng/rng_state.pth": rng.randbytes(1_000),
        "trainer_state.json": json.dumps({"global_step": step}).encode(),
    }
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return d


def tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def one_clean_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and not any(secret in text for secret in SECRETS), text
    return text


class SpyStore(CheckpointStore):
    """A real store underneath; records deletes, and can hold uploads at a gate or make one fail."""

    def __init__(self, inner: CheckpointStore, gate: threading.Event | None = None, fail_on: str | None = None):
        self.inner, self.uri, self.gate, self.fail_on = inner, inner.uri, gate, fail_on
        self.deletes: list[list[str]] = []

    def put_file(self, key, path):
        if self.gate is not None:
            assert self.gate.wait(30)
        if self.fail_on and self.fail_on in key:
            raise OSError(f"simulated crash while uploading {key}")
        self.inner.put_file(key, path)

    def put_bytes(self, key, data):
        self.inner.put_bytes(key, data)

    def get_file(self, key, path):
        self.inner.get_file(key, path)

    def get_bytes(self, key):
        return self.inner.get_bytes(key)

    def list(self, prefix):
        return self.inner.list(prefix)

    def delete(self, keys):
        keys = list(keys)
        self.deletes.append(keys)
        self.inner.delete(keys)


@pytest.fixture(params=["local", "moto", "seaweedfs"])
def store(request, tmp_path, monkeypatch) -> CheckpointStore:
    """The same story on a local directory and on each S3 server."""
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    server = request.getfixturevalue(f"{request.param}_server")
    use_aws_env(monkeypatch, server.env())
    return open_store(f"s3://{server.make_bucket(fresh_bucket())}/jobs")


# ---------------------------------------------------------------- the commit protocol


def test_a_committed_checkpoint_round_trips_byte_for_byte(store, tmp_path):
    run = RunStore(store, RUN)
    src = write_checkpoint(tmp_path / "out", 50)

    prefix = run.commit_checkpoint(50, src, "fp-1")

    assert prefix == f"{RUN}/checkpoints/step-00000050/"
    assert run.committed_steps() == [50]
    manifest = json.loads(store.get_bytes(prefix + "MANIFEST.json"))
    assert (manifest["step"], manifest["fingerprint"]) == (50, "fp-1")
    assert set(manifest["files"]) == set(tree(src))
    rng = (src / "rng/rng_state.pth").read_bytes()
    assert manifest["files"]["rng/rng_state.pth"] == {"size": 1000, "sha256": hashlib.sha256(rng).hexdigest()}
    got = run.download_checkpoint(50, tmp_path / "resume" / "step-50")
    assert tree(got) == tree(src)


def test_both_stores_answer_the_basic_moves_alike(store, tmp_path):
    store.put_bytes("r/checkpoints/step-00000010/a", b"1")
    store.put_bytes("r/checkpoints/step-00000010/sub/b", b"2")
    store.put_bytes("r/checkpoints/step-00000100/a", b"3")
    store.put_bytes("r/status.json", b"{}")

    assert store.list("r/checkpoints/") == [
        "r/checkpoints/step-00000010/a", "r/checkpoints/step-00000010/sub/b", "r/checkpoints/step-00000100/a"]
    assert store.list("r/checkpoints/step-0000001") == [
        "r/checkpoints/step-00000010/a", "r/checkpoints/step-00000010/sub/b"]
    assert store.list("nothing/here/") == []
    assert store.get_bytes("r/missing") is None
    with pytest.raises(FileNotFoundError):
        store.get_file("r/missing", tmp_path / "x")
    store.delete(["r/checkpoints/step-00000010/a", "r/never-existed"])
    assert store.list("r/checkpoints/step-00000010/") == ["r/checkpoints/step-00000010/sub/b"]
    with pytest.raises(ValueError):
        store.put_bytes("../escape", b"no")


def test_run_and_status_records_round_trip(store):
    run = RunStore(store, RUN)
    assert run.read_run() is None and run.read_status() is None

    run.write_run({"fingerprint": "fp-1", "settings": {"LORA_R": 64}})
    run.write_status({"phase": "training", "step": 7})

    assert run.read_run() == {"fingerprint": "fp-1", "settings": {"LORA_R": 64}}
    status = run.read_status()
    assert status["phase"] == "training" and status["step"] == 7
    assert datetime.fromisoformat(status["updated_at"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0


def test_the_final_adapter_round_trips_and_leaves_the_rest_of_output_dir_alone(store, tmp_path):
    run = RunStore(store, RUN)
    out = tmp_path / "output"
    (out / "work" / "checkpoint-5").mkdir(parents=True)
    (out / "work" / "checkpoint-5" / "scratch.bin").write_bytes(b"scratch")
    (out / "adapter_model.safetensors").write_bytes(os.urandom(50_000))
    (out / "adapter_config.json").write_text('{"r": 64}')
    assert not run.final_committed()

    run.commit_final(out, "fp-1", files=["adapter_model.safetensors", "adapter_config.json"])

    assert run.final_committed()
    assert store.list(f"{RUN}/final/") == [
        f"{RUN}/final/MANIFEST.json", f"{RUN}/final/adapter_config.json", f"{RUN}/final/adapter_model.safetensors"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    run.download_final(elsewhere)
    assert tree(elsewhere) == {"keep.txt": b"mine", "adapter_config.json": b'{"r": 64}',
                               "adapter_model.safetensors": (out / "adapter_model.safetensors").read_bytes()}


def test_final_files_the_last_checkpoint_holds_are_copied_in_the_store_not_uploaded_again(store, tmp_path,
                                                                                            monkeypatch):
    """The adapter final/ commits is the last step's, which its checkpoint already holds: the store copies those
    bytes (S3's server-side copy, a local hard link) instead of taking them from OUTPUT_DIR again. A file that
    differs, or a checkpoint of other settings, is uploaded as before; final/ survives the checkpoint's pruning."""
    run = RunStore(store, RUN)
    checkpoint = write_checkpoint(tmp_path / "work", 50)
    run.commit_checkpoint(50, checkpoint, "fp-1")
    out = tmp_path / "output"
    out.mkdir()
    adapter = (checkpoint / "adapter_model.safetensors").read_bytes()
    (out / "adapter_model.safetensors").write_bytes(adapter)
    (out / "trainer_state.json").write_text("not the checkpoint's")
    (out / "README.md").write_text("card")
    uploaded = []
    put_file = type(store).put_file
    monkeypatch.setattr(type(store), "put_file", lambda self, key, path: (uploaded.append(key.rsplit("/", 1)[1]),
                                                                        put_file(self, key, path))[1])

    run.commit_final(out, "fp-1", files=iter(["adapter_model.safetensors", "trainer_state.json", "README.md"]))

    assert sorted(uploaded) == ["README.md", "trainer_state.json"]
    if isinstance(store, LocalStore):
        stored = store.root / RUN / "final" / "adapter_model.safetensors"
        assert stored.stat().st_nlink == 2
    run.commit_checkpoint(51, write_checkpoint(tmp_path / "work", 51), "fp-1")
    assert run.prune(keep=1) == [50]
    got = run.download_final(tmp_path / "elsewhere")
    assert tree(got) == tree(out)

    run.commit_checkpoint(60, checkpoint, "fp-2")   # other settings' checkpoint: nothing is taken from it
    uploaded.clear()
    run.commit_final(out, "fp-1", files=["adapter_model.safetensors"])
    assert uploaded == ["adapter_model.safetensors"]
    assert tree(run.download_final(tmp_path / "again")) == {"adapter_model.safetensors": adapter}


def test_a_local_store_without_hard_links_copies(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    store.put_bytes("a/x", b"bytes")

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    assert store.copy("a/x", "b/x") is False
    with pytest.raises(FileNotFoundError):
        store.copy("a/missing", "b/y")
    run = RunStore(store, RUN)
    checkpoint = write_checkpoint(tmp_path / "work", 5)
    run.commit_checkpoint(5, checkpoint, "fp")
    run.commit_final(checkpoint, "fp", files=["adapter_model.safetensors"])
    stored = store.root / RUN / "final" / "adapter_model.safetensors"
    assert stored.stat().st_nlink == 1 and stored.read_bytes() == (checkpoint / "adapter_model.safetensors").read_bytes()


def test_s3_copy_of_a_missing_object_is_file_not_found(s3_server, monkeypatch):
    use_aws_env(monkeypatch, s3_server.env())
    store = open_store(f"s3://{s3_server.make_bucket(fresh_bucket())}/jobs")
    with pytest.raises(FileNotFoundError):
        store.copy("nothing/here", "b/x")
    store.put_bytes("a/x", b"bytes")
    assert store.copy("a/x", "b/x") and store.get_bytes("b/x") == b"bytes"


def test_an_upload_that_died_before_its_manifest_does_not_exist_and_its_leftovers_are_cleaned(store, tmp_path):
    run = RunStore(store, RUN)
    run.commit_checkpoint(10, write_checkpoint(tmp_path, 10), "fp")
    crashing = RunStore(SpyStore(store, fail_on="step-00000020/optimizer.pt"), RUN)
    with pytest.raises(OSError, match="simulated crash"):
        crashing.commit_checkpoint(20, write_checkpoint(tmp_path, 20), "fp")
    # step 30 is uploading right now: some files are there, its manifest is not yet
    in_flight = run.checkpoint_prefix(30) + "adapter_model.safetensors"
    store.put_file(in_flight, write_checkpoint(tmp_path, 30) / "adapter_model.safetensors")
    assert store.list(run.checkpoint_prefix(20)), "the crash left files behind"

    assert run.committed_steps() == [10]
    assert run.latest_verified_checkpoint(tmp_path / "resume", log=pytest.fail)[0] == 10

    assert run.clean_uncommitted(older_than_step=30) == [run.checkpoint_prefix(20)]
    assert store.list(run.checkpoint_prefix(20)) == []
    assert store.list(run.checkpoint_prefix(30)) == [in_flight]
    assert run.committed_steps() == [10]


@pytest.mark.parametrize("damage", ["flip one byte", "truncate", "delete"])
def test_a_damaged_checkpoint_is_rejected_and_resume_falls_back_to_the_older_one(store, tmp_path, damage):
    run = RunStore(store, RUN)
    older = write_checkpoint(tmp_path / "out", 10)
    run.commit_checkpoint(10, older, "fp")
    run.commit_checkpoint(20, write_checkpoint(tmp_path / "out", 20), "fp")
    key = run.checkpoint_prefix(20) + "optimizer.pt"
    data = bytearray(store.get_bytes(key))
    if damage == "flip one byte":
        data[123_456] ^= 0x01
        store.put_bytes(key, bytes(data))
    elif damage == "truncate":
        store.put_bytes(key, bytes(data[:1000]))
    else:
        store.delete([key])

    with pytest.raises(CorruptCheckpoint, match="step-00000020/optimizer.pt") as caught:
        run.download_checkpoint(20, tmp_path / "resume" / "step-20")
    one_clean_line(caught.value)
    assert not (tmp_path / "resume" / "step-20").exists(), "nothing unverified is left to resume from"

    said = []
    step, path = run.latest_verified_checkpoint(tmp_path / "resume", log=said.append)
    assert step == 10 and tree(path) == tree(older)
    assert len(said) == 1 and "step 20" in said[0] and "optimizer.pt" in said[0] and "\n" not in said[0]


def _valid(m: bytes) -> dict:
    return json.loads(m)


@pytest.mark.parametrize("spoil", [
    pytest.param(lambda m: m[: len(m) // 2], id="truncated"),
    pytest.param(lambda m: b"\x00\xff garbage", id="garbage"),
    pytest.param(lambda m: b"", id="empty"),
    pytest.param(lambda m: b"[]", id="not-an-object"),
    pytest.param(lambda m: json.dumps({**_valid(m), "step": 10}).encode(), id="another-step"),
    pytest.param(lambda m: json.dumps({**_valid(m), "files": {}}).encode(), id="no-files"),
    pytest.param(lambda m: json.dumps({**_valid(m), "files": {
        k: {"size": v["size"]} for k, v in _valid(m)["files"].items()}}).encode(), id="no-hashes"),
])
def test_a_checkpoint_with_a_spoiled_manifest_is_not_committed(store, tmp_path, spoil):
    run = RunStore(store, RUN)
    run.commit_checkpoint(10, write_checkpoint(tmp_path, 10), "fp")
    run.commit_checkpoint(20, write_checkpoint(tmp_path, 20), "fp")
    manifest = run.checkpoint_prefix(20) + "MANIFEST.json"
    store.put_bytes(manifest, spoil(store.get_bytes(manifest)))

    assert run.committed_steps() == [10]
    assert run.latest_verified_checkpoint(tmp_path / "resume", log=pytest.fail)[0] == 10
    assert run.clean_uncommitted() == [run.checkpoint_prefix(20)]


def test_a_step_committed_again_replaces_the_old_copy(store, tmp_path):
    run = RunStore(store, RUN)
    first = write_checkpoint(tmp_path / "a", 10)
    (first / "stale.bin").write_bytes(b"only in the first copy")
    run.commit_checkpoint(10, first, "fp")
    second = write_checkpoint(tmp_path / "b", 11)  # other content, same step

    run.commit_checkpoint(10, second, "fp")

    assert tree(run.download_checkpoint(10, tmp_path / "resume")) == tree(second)
    assert run.checkpoint_prefix(10) + "stale.bin" not in store.list(run.checkpoint_prefix(10))


def test_retention_keeps_the_newest_and_the_resumed_one_and_deletes_manifests_first(store, tmp_path):
    spy = SpyStore(store)
    run = RunStore(spy, RUN)
    src = write_checkpoint(tmp_path, 1)
    for step in (10, 20, 30, 40, 50):
        run.commit_checkpoint(step, src, "fp")
    spy.deletes.clear()

    assert run.prune(keep=2, protect=[20]) == [10, 30]

    assert run.committed_steps() == [20, 40, 50]
    for step in (10, 30):
        prefix = run.checkpoint_prefix(step)
        assert store.list(prefix) == []
        touching = [d for d in spy.deletes if any(k.startswith(prefix) for k in d)]
        assert touching[0] == [prefix + "MANIFEST.json"], "the manifest must go before any file"
    assert run.prune(keep=3, protect=[20]) == []


# ---------------------------------------------------------------- background uploads


def test_the_uploader_commits_in_order_while_training_goes_on(store, tmp_path):
    gate = threading.Event()
    committed = []
    uploader = BackgroundUploader(RunStore(SpyStore(store, gate=gate), RUN), on_committed=committed.append)
    dirs = {step: write_checkpoint(tmp_path, step) for step in (10, 20, 30)}

    started = time.monotonic()
    for step, d in dirs.items():
        uploader.submit(step, d, "fp")
    assert time.monotonic() - started < 1.0 and committed == [], "submit must not wait for the upload"
    gate.set()  # the store answers again

    assert uploader.wait(timeout=30)
    assert committed == [10, 20, 30] and uploader.last_committed() == 30 and uploader.errors() == []
    assert RunStore(store, RUN).committed_steps() == [10, 20, 30]
    uploader.close()


def test_waiting_for_an_upload_that_cannot_finish_gives_up_at_the_deadline(tmp_path):
    gate = threading.Event()
    uploader = BackgroundUploader(RunStore(SpyStore(open_store(str(tmp_path / "s")), gate=gate), RUN))
    uploader.submit(10, write_checkpoint(tmp_path, 10), "fp")

    started = time.monotonic()
    assert uploader.wait(timeout=0.3) is False
    assert 0.25 < time.monotonic() - started < 2
    assert uploader.last_committed() is None

    gate.set()
    assert uploader.wait(timeout=30) is True
    uploader.close()
    with pytest.raises(RuntimeError):
        uploader.submit(20, tmp_path, "fp")


def test_a_failed_upload_is_reported_and_does_not_poison_the_later_ones(tmp_path):
    store = open_store(str(tmp_path / "s"))
    committed, failed = [], []
    uploader = BackgroundUploader(RunStore(SpyStore(store, fail_on="step-00000020/"), RUN), committed.append,
                                  on_failed=lambda step, e: failed.append(step))
    for step in (10, 20):
        uploader.submit(step, write_checkpoint(tmp_path, step), "fp")
    assert uploader.wait(timeout=30) is False, "the newest checkpoint submitted failed"
    assert failed == [20] and uploader.last_committed() == 10

    uploader.submit(30, write_checkpoint(tmp_path, 30), "fp")
    assert uploader.wait(timeout=30) is True, "a later commit makes up for the failure"
    assert committed == [10, 30] and uploader.last_committed() == 30
    assert [str(e) for e in uploader.errors()] == [
        f"simulated crash while uploading {RUN}/checkpoints/step-00000020/adapter_model.safetensors"]
    uploader.close()


@pytest.mark.parametrize("hashes_what_it_stores", [True, False])
def test_a_file_that_changed_since_it_was_written_is_not_committed(tmp_path, hashes_what_it_stores):
    # A local store reports the hash of what it stored; a store that does not (S3, here the spy over a local one)
    # has the file hashed apart. Either way the change is caught and nothing is committed.
    from job.store.run_store import hash_file
    store = open_store(str(tmp_path / "s"))
    store = store if hashes_what_it_stores else SpyStore(store)
    d = write_checkpoint(tmp_path, 10)
    written = {p.relative_to(d).as_posix(): hash_file(p) for p in d.rglob("*") if p.is_file()}
    (d / "optimizer.pt").write_bytes(b"half of it")   # what a later write left on the disk
    with pytest.raises(CorruptCheckpoint, match="changed since it was written"):
        RunStore(store, RUN).commit_checkpoint(10, d, "fp", written)
    assert RunStore(store, RUN).committed_steps() == []


@pytest.mark.parametrize("permanent, code", [(True, 2), (False, 1)])
def test_a_stalled_store_ends_the_job_with_one_line_and_an_exit_code_by_its_last_failure(permanent, code, capsys):
    # A store that refused for good (AccessDenied: a StoreError) fails the Job at once (exit 2); one that is down or
    # failing may work again, so the orchestrator retries it (exit 1). test_resume runs the first end to end.
    from job.cli import _outcome
    from job.config import from_env
    from job.log import Reporter
    from job.store.uploader import UploadStalled

    def stalled():
        raise UploadStalled("no checkpoint committed since step 4 was saved", permanent=permanent)

    assert _outcome(from_env({}), Reporter("json"), stalled, lambda: "train") == code
    assert capsys.readouterr().err == "error: no checkpoint committed since step 4 was saved\n"


def test_an_isolated_uploader_commits_from_its_own_process_and_outlives_a_sigterm(store, tmp_path):
    """isolate=True (what the job uses): the hashing and uploading happen in a child process, which a SIGTERM to
    the process group does not stop; failures come back as errors, and close() ends the child."""
    import signal

    committed = []
    uploader = BackgroundUploader(RunStore(store, RUN), on_committed=committed.append, isolate=True)
    child = uploader.worker_pid
    assert child != os.getpid() and os.kill(child, 0) is None
    os.kill(child, signal.SIGTERM)            # as a stop signal to the whole process group would
    uploader.submit(10, write_checkpoint(tmp_path, 10), "fp")
    uploader.submit(20, tmp_path / "no-such-checkpoint", "fp")
    uploader.submit(30, write_checkpoint(tmp_path, 30), "fp")
    assert uploader.wait(timeout=60) is True, "step 30, the newest, is committed though step 20 could not be"
    assert committed == [10, 30] and uploader.last_committed() == 30
    assert len(uploader.errors()) == 1 and "no-such-checkpoint" in str(uploader.errors()[0])
    run = RunStore(store, RUN)
    assert run.committed_steps() == [10, 30]
    assert run.download_checkpoint(30, tmp_path / "back") is not None
    assert (tmp_path / "back" / "optimizer.pt").read_bytes() == \
        (tmp_path / "checkpoint-30" / "optimizer.pt").read_bytes()
    uploader.close()
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(child, 0)
            time.sleep(0.1)


# ---------------------------------------------------------------- probing: clear lines for permanent problems


def test_probe_passes_on_a_working_store_and_leaves_nothing_behind(store):
    store.probe()
    assert store.list("_probe/") == []


@pytest.mark.parametrize("uri", ["http://minio:9000/bucket", "hf://user/repo", "relative/ckpt"])
def test_an_unsupported_uri_is_refused_naming_the_accepted_forms(uri):
    with pytest.raises(StoreError) as caught:
        open_store(uri)
    text = one_clean_line(caught.value)
    assert uri in text and "s3://" in text and "./" in text


def test_a_local_path_that_cannot_be_a_directory_is_refused(tmp_path):
    (tmp_path / "a-file").write_text("in the way")
    with pytest.raises(StoreError) as caught:
        open_store(str(tmp_path / "a-file" / "ckpt"))
    assert str(tmp_path / "a-file" / "ckpt") in one_clean_line(caught.value)


def test_probe_names_a_bucket_that_does_not_exist(s3_server, monkeypatch):
    use_aws_env(monkeypatch, s3_server.env())
    with pytest.raises(StoreError) as caught:
        open_store("s3://nope-no-such-bucket/x").probe()
    assert one_clean_line(caught.value) == (
        "CHECKPOINT_URI s3://nope-no-such-bucket/x: bucket 'nope-no-such-bucket' does not exist "
        "(NoSuchBucket). Create it or fix CHECKPOINT_URI.")


def test_probe_names_an_endpoint_that_refuses_connections(moto_server, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    use_aws_env(monkeypatch, {**moto_server.env(), "AWS_SECRET_ACCESS_KEY": SECRET,
                              "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{closed}"})
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        open_store("s3://bucket/x").probe()
    assert time.monotonic() - started < 5, "a wrong endpoint must not be retried for minutes"
    text = one_clean_line(caught.value)
    assert f"127.0.0.1:{closed}" in text and "connection refused" in text and "AWS_ENDPOINT_URL_S3" in text


@pytest.fixture(scope="module")
def strict_s3():
    """A moto server that checks credentials, with one known user who has no permissions."""
    server = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "2"})  # the two IAM calls below
    iam = boto3.session.Session(aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1").client(
        "iam", endpoint_url=server.endpoint)
    iam.create_user(UserName="trainer")
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    yield server, key["AccessKeyId"], key["SecretAccessKey"]
    server.stop()


@pytest.fixture(params=["moto", "seaweedfs"])
def checked_s3(request):
    """(server, key id, secret of a known user with no permissions) on a server that checks credentials."""
    if request.param == "moto":
        return request.getfixturevalue("strict_s3")
    return (request.getfixturevalue("seaweedfs_server"), *SEAWEEDFS_NO_PERMISSION_KEYS)


@pytest.mark.parametrize("case, says", [
    ("unknown key", "(InvalidAccessKeyId). Check AWS_ACCESS_KEY_ID"),
    ("wrong secret", "(SignatureDoesNotMatch). Check AWS_SECRET_ACCESS_KEY"),
    ("no permission", "access denied (AccessDenied)"),
])
def test_probe_names_rejected_credentials_without_printing_them(checked_s3, monkeypatch, case, says):
    server, key_id, secret = checked_s3
    key_id, secret = {"unknown key": ("AKIAUNKNOWNUNKNOWN00", SECRET),
                      "wrong secret": (key_id, SECRET),
                      "no permission": (key_id, secret)}[case]
    use_aws_env(monkeypatch, {**server.env(), "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret})
    with pytest.raises(StoreError) as caught:
        open_store("s3://ckpt/runs").probe()
    text = one_clean_line(caught.value)
    assert text.startswith("CHECKPOINT_URI s3://ckpt/runs: ") and says in text
    assert secret not in text and key_id not in text


# ---------------------------------------------------------------- transient failures over real HTTP


@pytest.fixture
def flaky(s3_server, monkeypatch):
    """(proxy, uri): each S3 server reached through a proxy that fails when told to."""
    bucket = s3_server.make_bucket(fresh_bucket())
    with FlakyProxy(s3_server.endpoint) as proxy:
        use_aws_env(monkeypatch, {**s3_server.env(),
                                  "AWS_ENDPOINT_URL_S3": proxy.endpoint})
        yield proxy, f"s3://{bucket}/jobs"


@pytest.mark.parametrize("how, times", [("503", 2), ("500", 2), ("reset", 1)])
def test_transient_failures_are_retried_until_the_write_and_read_succeed(flaky, how, times):
    proxy, uri = flaky
    store = open_store(uri)

    proxy.fail_next(times, how)
    store.put_bytes("run/status.json", b'{"phase": "training"}')
    proxy.fail_next(times, how)
    assert store.get_bytes("run/status.json") == b'{"phase": "training"}'

    assert proxy.outcomes("PUT") == [how] * times + ["forwarded"]
    assert proxy.outcomes("GET") == [how] * times + ["forwarded"]


def test_a_checkpoint_commit_survives_a_connection_reset(flaky, tmp_path):
    proxy, uri = flaky
    run = RunStore(open_store(uri), RUN)
    src = write_checkpoint(tmp_path, 10)

    proxy.fail_next(1, "reset")
    run.commit_checkpoint(10, src, "fp")
    proxy.fail_next(1, "reset")
    assert tree(run.download_checkpoint(10, tmp_path / "resume")) == tree(src)
    assert proxy.outcomes().count("reset") == 2


def test_resets_that_outlast_botocore_are_retried_as_whole_operations(flaky):
    proxy, uri = flaky
    store = S3Store(uri, max_attempts=1, backoff_s=0.01)  # botocore itself gives up at once

    proxy.fail_next(2, "reset")
    store.put_bytes("run/status.json", b"{}")

    assert proxy.outcomes("PUT") == ["reset", "reset", "forwarded"]
    assert store.get_bytes("run/status.json") == b"{}"


def test_a_permanent_error_is_not_retried(flaky):
    proxy, _ = flaky
    store = open_store("s3://nope-not-here/x")
    with pytest.raises(StoreError, match="NoSuchBucket"):
        store.put_bytes("a", b"1")
    assert proxy.outcomes("PUT") == ["forwarded"]


# ---------------------------------------------------------------- S3-compatible by default


CHECKSUM_HEADERS = ("x-amz-checksum-", "x-amz-sdk-checksum-algorithm", "x-amz-trailer")


def checksummed(record) -> bool:
    return any(name.startswith(CHECKSUM_HEADERS) for name in record.headers)


def test_checksums_are_sent_only_where_s3_requires_them(flaky, tmp_path):
    # boto3 >= 1.36 adds CRC checksums to every upload and asks for them on every download, which older Ceph and
    # MinIO and other S3-compatible stores refuse; the store asks for them only where S3 requires one.
    proxy, uri = flaky
    store = open_store(uri)
    (tmp_path / "f.bin").write_bytes(os.urandom(1000))
    store.put_file("run/f.bin", tmp_path / "f.bin")
    store.put_bytes("run/status.json", b"{}")
    assert store.get_bytes("run/status.json") == b"{}"
    store.get_file("run/f.bin", tmp_path / "back.bin")
    store.delete(["run/f.bin"])
    puts = [r for r in proxy.records if r.method == "PUT"]
    gets = [r for r in proxy.records if r.method == "GET" and "list-type" not in r.path]
    deletes = [r for r in proxy.records if r.method == "POST" and "delete" in r.path]
    assert len(puts) == 2 and not any(checksummed(r) for r in puts), [r.headers for r in puts]
    assert gets and not any("x-amz-checksum-mode" in r.headers for r in gets)
    assert deletes and all(checksummed(r) for r in deletes)   # DeleteObjects requires one: S3 answers 400 without
    assert (tmp_path / "back.bin").read_bytes() == (tmp_path / "f.bin").read_bytes()


def test_the_users_aws_checksum_settings_win(flaky, monkeypatch):
    proxy, uri = flaky
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")
    monkeypatch.setenv("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_supported")
    store = open_store(uri)
    store.put_bytes("run/status.json", b"{}")
    assert store.get_bytes("run/status.json") == b"{}"
    (put,) = [r for r in proxy.records if r.method == "PUT"]
    (get,) = [r for r in proxy.records if r.method == "GET"]
    assert checksummed(put) and get.headers.get("x-amz-checksum-mode") == "ENABLED"
