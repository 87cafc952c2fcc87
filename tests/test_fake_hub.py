"""tests/fakes/hub.py, driven by the real huggingface_hub client: it serves what the job calls, the way the Hub
does, and refuses what the Hub refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session
from huggingface_hub.utils._runtime import is_xet_available

from fakes.hub import REGULAR_FILE_LIMIT, upload_mode

WRITE, READ, BOB = "hf_alice_write", "hf_alice_read", "hf_bob_write"
MB = 1024 * 1024


def _make_folder(root: Path, seed: int) -> dict[str, bytes]:
    rnd = __import__("random").Random(seed)
    files = {
        "README.md": f"---\nlicense: mit\n---\n# adapter {seed}\n".encode(),
        "weights/small.bin": rnd.randbytes(1 * MB),
        "big.safetensors": rnd.randbytes(12 * MB),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _status(excinfo: pytest.ExceptionInfo) -> int:
    return excinfo.value.response.status_code


def test_whoami_read_and_write_tokens(hub_server):
    server = hub_server()
    # configure_client=True also points in-process defaults at the server: no endpoint= here.
    me = HfApi(token=WRITE).whoami()
    assert me["type"] == "user" and me["name"] == "alice"
    assert [o["name"] for o in me["orgs"]] == ["acme"] and me["orgs"][0]["type"] == "org"
    assert me["auth"]["type"] == "access_token"
    assert me["auth"]["accessToken"]["role"] == "write"
    assert "fineGrained" not in me["auth"]["accessToken"]

    me_read = HfApi(endpoint=server.endpoint).whoami(token=READ)
    assert me_read["name"] == "alice" and me_read["auth"]["accessToken"]["role"] == "read"
    assert "fineGrained" not in me_read["auth"]["accessToken"]

    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(endpoint=server.endpoint, token="hf_unknown").whoami()
    assert _status(exc) == 401
    r = get_session().get(f"{server.endpoint}/api/whoami-v2")  # no token at all
    assert r.status_code == 401
    assert server.count("whoami") == 4


def test_create_repo_private_exist_ok_names_and_namespaces(hub_server):
    server = hub_server()
    api = HfApi(endpoint=server.endpoint, token=WRITE)

    url = api.create_repo("alice/adapter", private=True, exist_ok=True)
    assert url == f"{server.endpoint}/alice/adapter" and url.repo_id == "alice/adapter"
    assert api.repo_info("alice/adapter").private is True
    api.create_repo("alice/adapter", private=True, exist_ok=True)  # 409 swallowed by the client
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo("alice/adapter")
    assert _status(exc) == 409
    assert api.create_repo("acme/shared", exist_ok=True).repo_id == "acme/shared"  # org member
    assert server.count("create_repo") == 4
    assert [c["message"] for c in server.commits("alice/adapter")] == ["initial commit"]
    assert set(server.files("alice/adapter")) == {".gitattributes"}

    # The client refuses bad names itself; the server also answers 400 for them.
    with pytest.raises(HFValidationError):
        api.create_repo("alice/bad--name")
    for bad in ("bad--name", "-lead", "trail.", "x" * 97, "a..b", "repo.git", "sp ace"):
        r = get_session().post(f"{server.endpoint}/api/repos/create", json={"name": bad},
                               headers={"authorization": f"Bearer {WRITE}"})
        assert r.status_code == 400, bad

    # Read token and foreign namespace -> 403 (create_repo(exist_ok=True) re-raises it after a repo_info probe).
    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(endpoint=server.endpoint, token=READ).create_repo("alice/other", exist_ok=True)
    assert _status(exc) == 403
    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(endpoint=server.endpoint, token=BOB).create_repo("alice/bobs-attempt", exist_ok=True)
    assert _status(exc) == 403
    assert "alice/other" not in server.repos and "alice/bobs-attempt" not in server.repos


def test_upload_folder_main_and_branch_then_download(hub_server, tmp_path):
    server = hub_server()
    api = HfApi(endpoint=server.endpoint, token=WRITE)
    repo = "alice/qlora-adapter"
    api.create_repo(repo, private=True, exist_ok=True)

    v1 = _make_folder(tmp_path / "v1", seed=1)
    info = api.upload_folder(repo_id=repo, folder_path=tmp_path / "v1", commit_message="Upload adapter v1")
    assert info.oid == server.commits(repo)[0]["oid"]
    assert info.commit_url == f"{server.endpoint}/{repo}/commit/{info.oid}"
    assert server.count("commit") == 1

    api.create_branch(repo, branch="run-42", exist_ok=True)
    api.create_branch(repo, branch="run-42", exist_ok=True)  # 409 swallowed
    v2 = _make_folder(tmp_path / "v2", seed=1)  # same big file ...
    v2["weights/small.bin"] = os.urandom(MB)  # ... new small one, plus a new file
    v2["extra/log.txt"] = b"step 1 loss 0.5\n"
    for rel in ("weights/small.bin", "extra/log.txt"):
        (tmp_path / "v2" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "v2" / rel).write_bytes(v2[rel])
    info2 = api.upload_folder(repo_id=repo, folder_path=tmp_path / "v2", revision="run-42",
                              commit_message="Upload adapter v2", commit_description="from run 42")
    assert server.count("commit") == 2

    # Branches keep their own trees; main is untouched by the branch commit.
    assert server.files(repo) == {".gitattributes": server.files(repo)[".gitattributes"], **v1}
    assert {k: v for k, v in server.files(repo, "run-42").items() if k != ".gitattributes"} == v2
    assert [c["message"] for c in server.commits(repo, "run-42")] == [
        "Upload adapter v2", "Upload adapter v1", "initial commit"]
    assert server.commits(repo, "run-42")[0]["description"] == "from run 42"

    commits = api.list_repo_commits(repo, revision="run-42")
    assert [c.title for c in commits] == ["Upload adapter v2", "Upload adapter v1", "initial commit"]
    assert commits[0].commit_id == info2.oid and commits[0].message == "from run 42"
    assert commits[0].authors == ["alice"]
    assert [c.title for c in api.list_repo_commits(repo)] == ["Upload adapter v1", "initial commit"]
    assert sorted(api.list_repo_files(repo, revision="run-42")) == sorted([".gitattributes", *v2])
    mi = api.model_info(repo, revision="run-42", files_metadata=True)
    assert mi.sha == info2.oid and mi.private is True
    assert {s.rfilename: s.size for s in mi.siblings}["big.safetensors"] == 12 * MB
    assert api.repo_info(repo).sha == info.oid

    # Downloads: snapshot of each branch into an isolated cache, and a single file by revision.
    snap_main = Path(snapshot_download(repo, revision="main", cache_dir=tmp_path / "cache", token=WRITE))
    snap_branch = Path(snapshot_download(repo, revision="run-42", local_dir=tmp_path / "dl", token=WRITE))
    for snap, expected in ((snap_main, v1), (snap_branch, v2)):
        for rel, data in expected.items():
            assert (snap / rel).read_bytes() == data, rel
    one = hf_hub_download(repo, "extra/log.txt", revision="run-42", cache_dir=tmp_path / "cache2", token=WRITE)
    assert Path(one).read_bytes() == v2["extra/log.txt"]
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo, "extra/log.txt", revision="main", cache_dir=tmp_path / "cache3", token=WRITE)

    # Both binary files went up through the LFS batch API, never inline; Xet was never asked for.
    assert not is_xet_available() and server.count("xet_token") == 0 and server.count("unknown") == 0
    uploads = [r.body for r in server.request_log if r.endpoint == "lfs_upload" and r.status == 200]
    assert sorted(map(len, uploads)) == [MB, MB, 12 * MB]     # v1's two binaries, then v2's new small.bin
    assert server.count("lfs_verify") == 3
    commits = [r for r in server.request_log if r.endpoint == "commit"]
    assert all(not r.decoded_payloads() or all(b"\x00" not in p for p in r.decoded_payloads()) for r in commits)
    ops = [json.loads(line) for line in commits[-1].body.splitlines()]
    # The unchanged 12 MB file is not in the branch commit at all (preupload's oid made it a no-op).
    assert {(op["key"], op["value"]["path"]) for op in ops[1:]} == {("lfsFile", "weights/small.bin"),
                                                                     ("file", "extra/log.txt")}


def test_permissions_read_token_and_foreign_namespace(hub_server, tmp_path):
    server = hub_server()
    alice = HfApi(endpoint=server.endpoint, token=WRITE)
    alice.create_repo("alice/public-model", exist_ok=True)
    alice.create_repo("alice/private-model", private=True, exist_ok=True)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "adapter_config.json").write_text("{}")

    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(endpoint=server.endpoint, token=READ).upload_folder(
            repo_id="alice/public-model", folder_path=tmp_path / "f", commit_message="nope")
    assert _status(exc) == 403

    bob = HfApi(endpoint=server.endpoint, token=BOB)
    with pytest.raises(HfHubHTTPError) as exc:
        bob.upload_folder(repo_id="alice/public-model", folder_path=tmp_path / "f", commit_message="nope")
    assert _status(exc) == 403
    with pytest.raises(HfHubHTTPError) as exc:
        bob.create_commit("alice/public-model", [CommitOperationAdd("x.txt", b"x")], commit_message="nope")
    assert _status(exc) == 403
    with pytest.raises(HfHubHTTPError) as exc:
        bob.create_branch("alice/public-model", branch="bob")
    assert _status(exc) == 403
    # Like the Hub, a private repo you cannot read is reported as missing (404), not forbidden.
    with pytest.raises(RepositoryNotFoundError) as exc:
        bob.upload_folder(repo_id="alice/private-model", folder_path=tmp_path / "f", commit_message="nope")
    assert _status(exc) == 404
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/private-model", ".gitattributes", cache_dir=tmp_path / "c", token=False)

    assert server.count("commit") == 0  # every attempt was refused at /preupload, before any commit request
    assert [c["message"] for c in server.commits("alice/public-model")] == ["initial commit"]
    # Reads with the read token still work.
    assert HfApi(endpoint=server.endpoint, token=READ).list_repo_files("alice/private-model") == [".gitattributes"]


def test_commit_500_then_manual_retry(hub_server):
    server = hub_server()
    api = HfApi(endpoint=server.endpoint, token=WRITE)
    api.create_repo("alice/m", exist_ok=True)
    server.fail_next_commits(1, status=500)

    with pytest.raises(HfHubHTTPError) as exc:
        api.create_commit("alice/m", [CommitOperationAdd("adapter.bin", b"\x00" * 1000)], commit_message="push")
    assert _status(exc) == 500
    assert server.count("commit") == 1
    assert [c["message"] for c in server.commits("alice/m")] == ["initial commit"]

    info = api.create_commit("alice/m", [CommitOperationAdd("adapter.bin", b"\x00" * 1000)], commit_message="push")
    assert server.count("commit") == 2
    assert [c["message"] for c in server.commits("alice/m")] == ["push", "initial commit"]
    assert server.commits("alice/m")[0]["oid"] == info.oid
    assert server.files("alice/m")["adapter.bin"] == b"\x00" * 1000


def test_with_xet_the_client_retries_a_commit_and_a_lost_answer_makes_a_second_commit(hub_server, tmp_path,
                                                                                       monkeypatch):
    # With hf_xet (the job's container), upload_folder takes huggingface_hub's pipelined path, which sends each
    # commit with retries. A commit whose answer is lost is therefore committed twice, unless it names its parent.
    server = hub_server()
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    assert is_xet_available()
    api = HfApi(endpoint=server.endpoint, token=WRITE)
    api.create_repo("alice/m", exist_ok=True)
    (tmp_path / "a.txt").write_text("a")               # text only: this server does not serve Xet storage

    server.fail_next_commits(1, status=503)
    api.upload_folder(repo_id="alice/m", folder_path=tmp_path, commit_message="push")
    assert server.count("commit") == 2
    assert [c["message"] for c in server.commits("alice/m")] == ["push", "initial commit"]

    (tmp_path / "a.txt").write_text("b")
    server.lose_commit_responses(1)
    api.upload_folder(repo_id="alice/m", folder_path=tmp_path, commit_message="again")
    assert [c["message"] for c in server.commits("alice/m")] == ["again", "again", "push", "initial commit"]

    (tmp_path / "a.txt").write_text("c")
    head = server.branches("alice/m")["main"]
    server.lose_commit_responses(1)
    with pytest.raises(HfHubHTTPError) as exc:          # the retry names a parent that is no longer the head
        api.upload_folder(repo_id="alice/m", folder_path=tmp_path, commit_message="pinned", parent_commit=head)
    assert _status(exc) == 412
    assert [c["message"] for c in server.commits("alice/m")][:2] == ["pinned", "again"]


def test_a_lost_answer_reaches_create_commit_which_does_not_retry(hub_server):
    server = hub_server()
    api = HfApi(endpoint=server.endpoint, token=WRITE)
    api.create_repo("alice/m", exist_ok=True)
    server.lose_commit_responses(1)
    with pytest.raises(Exception) as exc:
        api.upload_file(path_or_fileobj=b"a", path_in_repo="a.txt", repo_id="alice/m", commit_message="landed")
    assert "disconnected" in str(exc.value).lower() or "closed" in str(exc.value).lower(), exc.value
    assert [c["message"] for c in server.commits("alice/m")] == ["landed", "initial commit"]
    assert server.count("commit") == 1


def test_fault_knobs_delay_and_lost_response(hub_server):
    server = hub_server()
    api = HfApi(endpoint=server.endpoint, token=WRITE)
    server.fail_next("whoami", 1, status=None, delay=0.3)  # slow but successful
    t0 = time.monotonic()
    assert api.whoami()["name"] == "alice"
    assert time.monotonic() - t0 >= 0.3

    api.create_repo("alice/m", exist_ok=True)
    server.fail_next("commit", 1, status=500, after_apply=True)  # commit lands, response is lost
    with pytest.raises(HfHubHTTPError):
        api.create_commit("alice/m", [CommitOperationAdd("a.txt", b"a")], commit_message="landed anyway")
    assert [c["message"] for c in server.commits("alice/m")] == ["landed anyway", "initial commit"]
    assert [r.injected for r in server.request_log if r.endpoint == "commit"] == [True]


def test_branches_tree_paths_info_and_commit_pagination(hub_server):
    server = hub_server()
    server.commits_page_size = 2
    api = HfApi(endpoint=server.endpoint, token=WRITE)
    api.create_repo("acme/m", exist_ok=True)
    for i in range(3):
        api.upload_file(path_or_fileobj=f"{i}".encode(), path_in_repo=f"dir/f{i}.txt", repo_id="acme/m",
                        commit_message=f"c{i}")
    head = server.branches("acme/m")["main"]
    api.create_branch("acme/m", branch="exp", revision=head)
    assert [c.title for c in api.list_repo_commits("acme/m")] == ["c2", "c1", "c0", "initial commit"]
    assert server.count("commits_list") == 2  # followed the Link header once
    assert server.branches("acme/m") == {"main": head, "exp": head}

    top = list(api.list_repo_tree("acme/m", expand=True))
    assert [(type(e).__name__, e.path) for e in top] == [("RepoFolder", "dir"), ("RepoFile", ".gitattributes")]
    assert top[0].last_commit.title == "c2"
    infos = api.get_paths_info("acme/m", ["dir/f0.txt", "dir", "missing"], expand=True)
    assert [e.path for e in infos] == ["dir/f0.txt", "dir"]
    assert infos[0].last_commit.title == "c0"
    assert api.list_repo_files("acme/m", revision=head) == api.list_repo_files("acme/m", revision="exp")

    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files("acme/m", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="acme/m", revision="nope")


@pytest.mark.parametrize("path, content, mode", [
    ("notes.txt", b"plain text\n", "regular"),
    ("big.txt", b"a" * (REGULAR_FILE_LIMIT + 1), "lfs"),            # above 10 MiB, even as text
    ("exactly.txt", b"a" * REGULAR_FILE_LIMIT, "regular"),
    ("loss_curve.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "lfs"),  # binary: not UTF-8, NUL bytes
    ("adapter_model.safetensors", (128).to_bytes(8, "little") + b'{"__metadata__":{}}', "lfs"),
    ("optimizer.pt", b"PK\x03\x04" + b"\x00" * 60, "lfs"),
    ("vocab.bin", b"text that .gitattributes sends to LFS", "lfs"),  # *.bin filter=lfs in the initial commit
    ("empty.safetensors", b"", "regular"),                            # an empty file cannot go to LFS
    ("unicode.md", "persona: café ☕ ".encode() * 40, "regular"),    # a character cut at byte 512 is still text
])
def test_preupload_sends_binary_and_large_files_to_lfs_as_the_hub_does(hub_server, tmp_path, path, content, mode):
    server = hub_server()
    api = HfApi(endpoint=server.endpoint, token=WRITE)
    api.create_repo("alice/m", exist_ok=True)
    api.upload_file(path_or_fileobj=content, path_in_repo=path, repo_id="alice/m", commit_message="one file")
    assert server.count("lfs_upload") == server.count("lfs_verify") == (1 if mode == "lfs" else 0)
    tree = {f.path: f for f in api.list_repo_tree("alice/m")}
    assert (tree[path].lfs is not None) == (mode == "lfs")
    assert upload_mode(path, len(content), content[:512], server.files("alice/m")[".gitattributes"]) == mode
    assert Path(hf_hub_download("alice/m", path, cache_dir=tmp_path / "c", token=WRITE)).read_bytes() == content


def commit_body(summary: str, *ops: dict) -> bytes:
    lines = [{"key": "header", "value": {"summary": summary, "description": ""}}, *ops]
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def test_a_binary_or_large_file_sent_inline_is_refused(hub_server):
    server = hub_server()
    HfApi(endpoint=server.endpoint, token=WRITE).create_repo("alice/m", exist_ok=True)
    auth = {"authorization": f"Bearer {WRITE}", "content-type": "application/x-ndjson"}
    for path, data in (("adapter_model.safetensors", b"\x08\x00\x00\x00{}"),
                       ("big.txt", b"a" * (REGULAR_FILE_LIMIT + 1))):
        op = {"key": "file", "value": {"path": path, "encoding": "base64",
                                       "content": __import__("base64").b64encode(data).decode()}}
        r = get_session().post(f"{server.endpoint}/api/models/alice/m/commit/main", headers=auth,
                               content=commit_body("inline", op))
        assert r.status_code == 400 and "Your push was rejected" in r.headers["x-error-message"], r.text
    assert [c["message"] for c in server.commits("alice/m")] == ["initial commit"]


def test_the_lfs_storage_url_takes_only_the_announced_bytes_without_a_token(hub_server):
    server = hub_server()
    HfApi(endpoint=server.endpoint, token=WRITE).create_repo("alice/m", exist_ok=True)
    data = b"\x00binary" * 100
    oid = __import__("hashlib").sha256(data).hexdigest()
    batch = get_session().post(
        f"{server.endpoint}/alice/m.git/info/lfs/objects/batch", json={
            "operation": "upload", "transfers": ["basic"], "hash_algo": "sha256",
            "objects": [{"oid": oid, "size": len(data)}]},
        headers={"authorization": f"Bearer {WRITE}", "accept": "application/vnd.git-lfs+json"})
    assert batch.status_code == 200
    href = batch.json()["objects"][0]["actions"]["upload"]["href"]
    with_token = get_session().put(href, content=data, headers={"authorization": f"Bearer {WRITE}"})
    assert with_token.status_code == 400 and b"Only one auth mechanism allowed" in with_token.content
    assert get_session().put(href.replace("Signature=", "Signature=x"), content=data).status_code == 403
    assert get_session().put(href, content=data[:-1] + b"!").status_code == 400    # not the announced oid
    assert get_session().put(href, content=data).status_code == 200
    verify = batch.json()["objects"][0]["actions"]["verify"]["href"]
    assert get_session().post(verify, json={"oid": oid, "size": len(data)}).status_code == 401   # needs a token
    assert get_session().post(verify, json={"oid": oid, "size": len(data)},
                              headers={"authorization": f"Bearer {WRITE}"}).status_code == 200
    # Once stored, a batch asks for nothing more: the client skips the upload.
    again = get_session().post(
        f"{server.endpoint}/alice/m.git/info/lfs/objects/batch", json={
            "operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(data)}]},
        headers={"authorization": f"Bearer {WRITE}", "accept": "application/vnd.git-lfs+json"})
    assert "actions" not in again.json()["objects"][0]


@pytest.mark.parametrize("base_model", ["/models/llama-2-7b", "./out/base", "https://huggingface.co/x/y",
                                        "a/b/c", "bad--name/x"])
def test_a_card_whose_base_model_is_not_a_hub_id_is_refused(hub_server, base_model):
    server = hub_server()
    api = HfApi(endpoint=server.endpoint, token=WRITE)
    api.create_repo("alice/m", exist_ok=True)
    card = f"---\nbase_model: {base_model}\nlibrary_name: peft\n---\n# card\n".encode()
    with pytest.raises(ValueError, match="Invalid metadata in README.md") as exc:   # the client checks first
        api.upload_file(path_or_fileobj=card, path_in_repo="README.md", repo_id="alice/m")
    assert '"base_model"' in str(exc.value)
    op = {"key": "file", "value": {"path": "README.md", "encoding": "base64",
                                   "content": __import__("base64").b64encode(card).decode()}}
    r = get_session().post(f"{server.endpoint}/api/models/alice/m/commit/main", content=commit_body("card", op),
                           headers={"authorization": f"Bearer {WRITE}", "content-type": "application/x-ndjson"})
    assert r.status_code == 400 and "Invalid metadata in README.md" in r.headers["x-error-message"]
    good = card.replace(base_model.encode(), b"NousResearch/Llama-2-7b-chat-hf")
    api.upload_file(path_or_fileobj=good, path_in_repo="README.md", repo_id="alice/m")
    assert server.files("alice/m")["README.md"] == good


def test_a_client_with_xet_on_is_told_this_server_takes_lfs_only(hub_server, monkeypatch):
    server = hub_server()
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    api = HfApi(endpoint=server.endpoint, token=WRITE)
    api.create_repo("alice/m", exist_ok=True)
    with pytest.raises(Exception):
        api.upload_file(path_or_fileobj=b"\x00" * 100, path_in_repo="w.bin", repo_id="alice/m")
    assert server.count("xet_token") >= 1 and server.count("commit") == 0


def test_subprocess_sees_server_through_env(hub_server, tmp_path):
    server = hub_server(configure_client=False)
    secret = "sk-THIS-IS-A-SECRET-7f3a"
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "notes.txt").write_text(f"api key {secret}\n")
    script = textwrap.dedent(
        """
        import json, os, sys
        from huggingface_hub import HfApi, constants, snapshot_download
        assert constants.ENDPOINT == os.environ["HF_ENDPOINT"]
        api = HfApi()  # endpoint and token from HF_ENDPOINT / HF_TOKEN
        me = api.whoami()
        api.create_repo(me["name"] + "/from-subprocess", private=True, exist_ok=True)
        info = api.upload_folder(repo_id="alice/from-subprocess", folder_path=sys.argv[1], commit_message="sub")
        path = snapshot_download("alice/from-subprocess", local_dir=sys.argv[2])
        print(json.dumps({"user": me["name"], "oid": info.oid, "files": sorted(os.listdir(path)),
                          "cache": constants.HF_HUB_CACHE}))
        """
    )
    env = server.subprocess_env(hf_home=tmp_path / "hf_home", token=WRITE)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "up"), str(tmp_path / "dl")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["user"] == "alice"
    assert result["oid"] == server.commits("alice/from-subprocess")[0]["oid"]
    assert result["files"] == [".cache", ".gitattributes", "notes.txt"]
    assert result["cache"].startswith(str(tmp_path / "hf_home"))
    assert (tmp_path / "dl" / "notes.txt").read_text() == f"api key {secret}\n"

    # Every request of the child reached this server; the token only ever travelled in Authorization.
    assert server.count() > 0 and server.count("unknown") == 0
    assert all(r.header("authorization") in (None, f"Bearer {WRITE}") for r in server.request_log)
    assert server.leaks(WRITE) == []
    assert server.leaks(WRITE, include_authorization=True)
    # The secret went out as (base64) file content of the commit -- leaks() sees through that.
    assert {r.endpoint for r in server.leaks(secret)} >= {"commit"}
