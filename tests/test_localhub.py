"""The local Hub (release/localhub.py) itself: the parts of the Hub API the demo release does not
reach, and `./inv hub.serve` / `python -m release.localhub` as a user runs them: the real client
talks to it, the token is never printed, Ctrl-C stops it in one line."""

from __future__ import annotations

import hashlib
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
)
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RevisionNotFoundError
from test_tasks import inv

from conftest import ROOT
from release.localhub import HubServer

TOKEN = "hf_" + secrets.token_hex(16)  # made per run, recognisable: scanned for in the output


def test_local_hub_multipart_pagination_and_write_auth(tmp_path, monkeypatch):
    """The parts of the server the demo release does not reach: multipart LFS transfers,
    paginated trees, nested folders, writes without a token."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the local Hub has no xet
    data = os.urandom(2_500_000)
    with HubServer(tmp_path / "hub", tokens=(TOKEN,), page_size=2, multipart_threshold=1_000_000,
                   multipart_chunk=1_000_000) as server:
        api = HfApi(endpoint=server.url, token=TOKEN)
        api.create_repo("org/m")
        api.upload_file(path_or_fileobj=data, path_in_repo="w/x.safetensors", repo_id="org/m")
        api.upload_file(path_or_fileobj=b"{}", path_in_repo="w/c.json", repo_id="org/m")
        assert server.stats["requests"]["PUT lfs_part"] == 3 and server.stats["requests"]["POST lfs_complete"] == 1
        tree = list(api.list_repo_tree("org/m", recursive=True))  # 4 entries, 2 per page
        assert server.stats["requests"]["GET tree"] == 2
        assert sorted(f.path for f in tree) == [".gitattributes", "w", "w/c.json", "w/x.safetensors"]
        path = hf_hub_download("org/m", "w/x.safetensors", endpoint=server.url, cache_dir=tmp_path / "c")
        assert Path(path).read_bytes() == data
        anonymous = HfApi(endpoint=server.url, token=False)
        with pytest.raises(HfHubHTTPError) as e:
            anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="y.txt", repo_id="org/m")
        assert e.value.response.status_code == 401 and server.stats["unauthorized"] >= 1
        assert [f.path for f in api.list_repo_tree("org/m")] == [".gitattributes", "w"]


def test_local_hub_without_lfs_copies_checks_hashes_and_keeps_sizes(tmp_path, monkeypatch):
    """keep_lfs=False (the release benchmark's Hub, whose disk cannot hold a second copy of the
    release): uploads are still read in full and checked against their sha256, the repo lists them
    with their sizes, and the objects take no disk (sparse files)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    data, big = os.urandom(8_000_000), os.urandom(12_500_000)  # big: a multipart upload
    with HubServer(tmp_path / "hub", tokens=(TOKEN,), keep_lfs=False, multipart_threshold=10_000_000,
                   multipart_chunk=5_000_000) as server:
        api = HfApi(endpoint=server.url, token=TOKEN)
        api.create_repo("org/m")
        api.upload_file(path_or_fileobj=data, path_in_repo="x.safetensors", repo_id="org/m")
        api.upload_file(path_or_fileobj=big, path_in_repo="y.safetensors", repo_id="org/m")
        assert server.stats["requests"]["PUT lfs_part"] == 3
        assert server.stats["lfs_bytes"] == len(data) + len(big) and len(server.stats["lfs_completed"]) == 2
        tree = {f.path: f for f in api.list_repo_tree("org/m")}
        for name, blob in (("x.safetensors", data), ("y.safetensors", big)):
            assert tree[name].size == len(blob) and tree[name].lfs.sha256 == hashlib.sha256(blob).hexdigest()
            objects = [p for p in (tmp_path / "hub").rglob("*") if p.is_file() and p.stat().st_size == len(blob)]
            assert len(objects) == 1 and objects[0].stat().st_blocks * 512 < 1 << 20  # sparse: < 1 MB on disk
        # a body whose hash is not the announced oid is refused, as with keep_lfs=True
        oid = hashlib.sha256(b"something else").hexdigest()
        r = httpx.put(f"{server.url}/__lfs/org/m/{oid}", content=b"not it",
                      headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 400 and "sha256 mismatch" in r.text


def test_local_hub_commits_tags_and_refusals(tmp_path, monkeypatch):
    """Commits that add and delete, tags, HEAD requests (served by the GET routes) and the Hub's
    refusals as the client reads them: status, X-Error-Code, message."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with HubServer(tmp_path / "hub", tokens=(TOKEN,)) as server:
        api = HfApi(endpoint=server.url, token=TOKEN)
        api.create_repo("org/m")
        api.create_commit("org/m", [CommitOperationAdd("a.txt", b"a"), CommitOperationAdd("b.txt", b"b")],
                          commit_message="two")
        api.create_commit("org/m", [CommitOperationDelete("a.txt")], commit_message="one gone")
        assert api.list_repo_files("org/m") == [".gitattributes", "b.txt"]
        assert [c[1:] for c in server.stats["commits"]] == [("two", ["a.txt", "b.txt"], []),
                                                             ("one gone", [], ["a.txt"])]
        api.create_tag("org/m", tag="v1")
        with pytest.raises(HfHubHTTPError) as e:
            api.create_tag("org/m", tag="v1")
        assert e.value.response.status_code == 409
        meta = get_hf_file_metadata(hf_hub_url("org/m", "b.txt", revision="v1", endpoint=server.url), token=TOKEN)
        assert meta.size == 1 and meta.commit_hash == api.list_repo_refs("org/m").tags[0].target_commit
        assert server.stats["requests"]["HEAD resolve"] >= 1
        api.delete_tag("org/m", tag="v1")
        assert api.list_repo_refs("org/m").tags == []
        with pytest.raises(RevisionNotFoundError):
            api.model_info("org/m", revision="v1")
        with pytest.raises(EntryNotFoundError):
            hf_hub_download("org/m", "a.txt", endpoint=server.url, token=TOKEN, cache_dir=tmp_path / "c")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        missing = hashlib.sha256(b"never sent").hexdigest()
        r = httpx.post(f"{server.url}/api/models/org/m/commit/main", headers=auth,
                       content=b'{"key": "header", "value": {"summary": "s"}}\n'
                               b'{"key": "lfsFile", "value": {"path": "w.bin", "oid": "%s"}}' % missing.encode())
        assert r.status_code == 422 and r.json()["error"] == f"LFS object {missing} for w.bin was never uploaded"
        r = httpx.get(f"{server.url}/api/models/org/none", headers=auth)
        assert (r.status_code, r.headers["X-Error-Code"]) == (404, "RepoNotFound")
        r = httpx.head(f"{server.url}/api/nothing")
        assert (r.status_code, r.headers["X-Error-Message"], r.content) == (404, "no route HEAD /api/nothing", b"")


# --- run as a tool ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ctrl_c_reaches() -> None:
    """In the child: take SIGINT even where this run ignores it (a background job of a script)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _first_line(proc: subprocess.Popen, timeout: float = 120) -> str:
    """The server's first line (its URL), or a failure with what it printed."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        pytest.fail(f"the local Hub printed nothing: {proc.communicate()}")
    return line


@pytest.mark.parametrize("form", ["task", "module"])
def test_serve_answers_the_client_and_stops_on_ctrl_c(form, tmp_path, monkeypatch):
    """`./inv hub.serve` with the token from $HF_TOKEN, `python -m release.localhub` with --token."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    port, root = _free_port(), tmp_path / "hub"
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    if form == "task":
        cmd = [sys.executable, "-m", "invoke", "--search-root", str(ROOT), "hub.serve", "--port", str(port),
               "--root", str(root)]
        env["HF_TOKEN"] = TOKEN
    else:
        cmd = [sys.executable, "-m", "release.localhub", "--port", str(port), "--root", str(root), "--token", TOKEN]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ctrl_c_reaches)
    first = ""
    try:
        first = _first_line(proc)
        url = f"http://127.0.0.1:{port}"
        assert first.rstrip("\n") == (f"local Hub at {url} (repos in {root}; writes need a given token); "
                                      f"set HF_ENDPOINT={url}")
        api = HfApi(endpoint=url, token=TOKEN)
        api.create_repo("org/m")
        info = api.model_info("org/m")
        assert info.id == "org/m" and [s.rfilename for s in info.siblings] == [".gitattributes"]
        with pytest.raises(HfHubHTTPError) as e:
            HfApi(endpoint=url, token="hf_not_the_token").create_repo("org/n")
        assert e.value.response.status_code == 401
        if form == "task":  # a taken port is one line, no traceback
            taken = inv("hub.serve", "--port", str(port), "--root", str(tmp_path / "other"))
            assert taken.returncode == 2 and taken.stderr.splitlines() == [
                f"error: 127.0.0.1:{port}: cannot listen (Address already in use); choose another --port"]
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == ""
    assert out.splitlines() == [f"local Hub stopped (repos kept in {root})"]
    assert TOKEN not in first + out + err
    assert (root / "repos" / "org" / "m" / "repo.json").is_file()
