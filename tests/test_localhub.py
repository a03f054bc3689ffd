"""The local Hub (release/localhub.py) itself: the parts of the Hub API the demo release does not
reach, and `./inv hub.serve` / `python -m release.localhub` as a user runs them: the real client
talks to it, the token is never printed, Ctrl-C stops it in one line."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

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
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, RevisionNotFoundError
from huggingface_hub.utils import _http as hf_http
from huggingface_hub.utils import validate_repo_id
from test_tasks import inv

from conftest import ROOT
from release.localhub import Fault, HubRefusal, HubServer, check_repo_id

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


# --- refusing what the Hub refuses ---------------------------------------------------------------


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local Hub holding the repo org/ok, online mode and no xet for this test only."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with HubServer(tmp_path / "a" / "b" / "c" / "hub", tokens=(TOKEN,)) as server:
        server.store.create("org/ok", private=False)
        yield server


@pytest.fixture
def backoff_sleeps(monkeypatch) -> list[float]:
    """huggingface_hub's waits between retries, recorded instead of slept: the tests stay quick and
    can say how long the client would have waited."""
    sleeps: list[float] = []
    monkeypatch.setattr(hf_http, "time", SimpleNamespace(sleep=sleeps.append))
    return sleeps


def _raw(server: HubServer, method: str, path: str, body: bytes | dict | None = None,
         headers: dict | None = None, chunked: bool = False, conn: http.client.HTTPConnection | None = None,
         timeout: float = 10) -> http.client.HTTPResponse:
    """One request as raw HTTP (the client library checks ids and paths on its own side), answer read."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    conn = conn or http.client.HTTPConnection(*server.httpd.server_address[:2], timeout=timeout)
    headers = {"Authorization": f"Bearer {TOKEN}", **(headers or {})}
    if chunked:
        conn.request(method, path, body=iter([body[:100], body[100:]]), headers=headers, encode_chunked=True)
    else:
        conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    r.data = r.read()
    return r


def _ndjson(*ops: tuple[str, dict], summary: str = "probe") -> bytes:
    items = [{"key": "header", "value": {"summary": summary}}, *({"key": k, "value": v} for k, v in ops)]
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


def _file(path: str, data: bytes = b"x") -> tuple[str, dict]:
    return "file", {"path": path, "content": base64.b64encode(data).decode(), "encoding": "base64"}


def _everything(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


_COMMIT = "/api/models/org/ok/commit/main"
_OID = hashlib.sha256(b"x").hexdigest()
PROBES = [  # (what, method, path, body): each is refused with a 400 and writes nothing
    ("repo name ../..", "POST", "/api/repos/create", {"name": "../..", "type": "model"}),
    ("organisation ../../../x", "POST", "/api/repos/create", {"name": "m", "organization": "../../../x"}),
    ("repo name with a slash", "POST", "/api/repos/create", {"name": "m/../../x"}),
    ("repo name with --", "POST", "/api/repos/create", {"name": "a--b"}),
    ("repo name starting with -", "POST", "/api/repos/create", {"name": "-m"}),
    ("repo name ending in .git", "POST", "/api/repos/create", {"name": "m.git"}),
    ("repo name of 97 characters", "POST", "/api/repos/create", {"name": "m" * 97}),
    ("repo name not ASCII", "POST", "/api/repos/create", {"name": "café"}),
    ("repo ../.. in the URL", "GET", "/api/models/../..", None),
    ("commit to repo ../..", "POST", "/api/models/../../commit/main", _ndjson(_file("f.txt"))),
    ("preupload to repo org/%2E%2E", "POST", "/api/models/org/%2E%2E/preupload/main", {"files": []}),
    ("LFS batch of repo ../x", "POST", "/../x.git/info/lfs/objects/batch", {"objects": []}),
    ("LFS upload to repo ../x", "PUT", f"/__lfs/../x/{_OID}", b"x"),
    ("commit path ../../../../f.txt", "POST", _COMMIT, _ndjson(_file("../../../../f.txt"))),
    ("commit path /abs/f.txt", "POST", _COMMIT, _ndjson(_file("/abs/f.txt"))),
    ("commit path .git/config", "POST", _COMMIT, _ndjson(_file(".git/config"))),
    ("commit path sub/.GIT/x", "POST", _COMMIT, _ndjson(_file("sub/.GIT/x"))),
    ("commit path with NUL", "POST", _COMMIT, _ndjson(_file("a\0b.txt"))),
    ("commit path with a control character", "POST", _COMMIT, _ndjson(_file("a\x1bb.txt"))),
    ("commit path with a backslash", "POST", _COMMIT, _ndjson(_file("..\\..\\f.txt"))),
    ("commit path with an empty segment", "POST", _COMMIT, _ndjson(_file("a//b.txt"))),
    ("commit path with a . segment", "POST", _COMMIT, _ndjson(_file("a/./b.txt"))),
    ("commit path empty", "POST", _COMMIT, _ndjson(_file(""))),
    ("commit of an LFS file at ../x.bin", "POST", _COMMIT,
     _ndjson(("lfsFile", {"path": "../x.bin", "algo": "sha256", "oid": _OID}))),
    ("deletion of ../repo.json", "POST", _COMMIT, _ndjson(("deletedFile", {"path": "../repo.json"}))),
    ("deletion of the folder ../", "POST", _COMMIT, _ndjson(("deletedFolder", {"path": "../"}))),
    ("preupload of .git/config", "POST", "/api/models/org/ok/preupload/main",
     {"files": [{"path": ".git/config", "size": 1, "sample": ""}]}),
    ("download of ../../repo.json", "GET", "/org/ok/resolve/main/..%2F..%2Frepo.json", None),
    ("download of /etc/passwd", "GET", "/org/ok/resolve/main//etc/passwd", None),
    ("tree of ../..", "GET", "/api/models/org/ok/tree/main/..%2F..", None),
]


@pytest.mark.parametrize("what, method, path, body", PROBES, ids=[p[0] for p in PROBES])
def test_refuses_what_the_hub_refuses(what, method, path, body, hub, tmp_path):
    """Repo ids and file paths the Hub refuses (the client refuses them on its side too, so these
    are raw requests): a 400 with the Hub's error body, and not one file more anywhere."""
    before, head = _everything(tmp_path), hub.store.meta("org/ok")["branches"]["main"]
    r = _raw(hub, method, path, body)
    assert r.status == 400, (r.status, r.data)
    assert r.getheader("X-Error-Message") == json.loads(r.data)["error"] and "Invalid" in r.getheader("X-Error-Message")
    assert _everything(tmp_path) == before and hub.store.meta("org/ok")["branches"]["main"] == head
    repo = hub.store.root / "repos" / "org" / "ok"
    assert all(p.is_relative_to(repo) for p in _everything(tmp_path) if p.is_file())


def test_paths_resolving_outside_the_root_are_refused(hub, tmp_path):
    """The second line of defence: a valid repo id whose folder is a link out of the root is
    neither read nor written."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (hub.store.root / "repos" / "org" / "evil").symlink_to(outside, target_is_directory=True)
    for method, path, body in (("POST", "/api/repos/create", {"name": "evil", "organization": "org"}),
                               ("GET", "/api/models/org/evil", None),
                               ("POST", "/api/models/org/evil/commit/main", _ndjson(_file("f.txt")))):
        r = _raw(hub, method, path, body)
        assert (r.status, json.loads(r.data)["error"]) == (400, "Invalid path: outside the repos")
    assert not list(outside.iterdir())


def test_a_refusal_keeps_the_connection_for_the_next_request(hub):
    """A refused small body is read whole: the same connection carries the next request."""
    conn = http.client.HTTPConnection(*hub.httpd.server_address[:2], timeout=10)
    assert _raw(hub, "POST", _COMMIT, _ndjson(_file(".git/config")), conn=conn).status == 400
    assert _raw(hub, "GET", "/api/models/org/ok", conn=conn).status == 200
    conn.close()


@pytest.mark.parametrize("repo_id", ["org/m", "a/b", "_x/y_", "A-1/b.c_d", "o" * 96 + "/m", "org/" + "m" * 97,
                                     "org/../..", "../x", "org/a--b", "org/a..b", "org/-m", "org/m-", "org/.m",
                                     "org/m.", "org/m.git", "org/café", "org/a b", "org", "a/b/c", "/m", "org/"])
def test_repo_ids_are_checked_as_huggingface_hub_checks_them(repo_id):
    """The server's rule and the client's (``validate_repo_id``) agree, namespace required."""
    try:
        validate_repo_id(repo_id)
        client_ok = repo_id.count("/") == 1
    except HFValidationError:
        client_ok = False
    try:
        server_ok = check_repo_id(repo_id) == repo_id
    except HubRefusal as e:
        server_ok = e.status != 400
    assert server_ok == client_ok


def test_nested_and_unicode_paths_still_commit(hub, tmp_path):
    """What the Hub allows stays allowed: nested folders, Unicode names, dotted names that are no
    '.' or '..' segment, an update of .gitattributes; through the client and as a chunked body."""
    api = HfApi(endpoint=hub.url, token=TOKEN)
    names = {"a/b/c/d.txt": b"deep", "اردو/نمونہ.txt": "سلام".encode(), "données/été.json": b"{}",
             "a/..b/.c.txt": b"dots", ".gitattributes": b"*.bin filter=lfs diff=lfs merge=lfs -text\n"}
    api.create_commit("org/ok", [CommitOperationAdd(p, d) for p, d in names.items()], commit_message="paths")
    r = _raw(hub, "POST", _COMMIT, _ndjson(_file("x/ü ñ/file name.md", b"raw")), chunked=True)
    assert r.status == 200, r.data
    assert set(api.list_repo_files("org/ok")) == set(names) | {"x/ü ñ/file name.md"}
    path = hf_hub_download("org/ok", "اردو/نمونہ.txt", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "c")
    assert Path(path).read_text() == "سلام"
    r = _raw(hub, "GET", "/org/ok/resolve/main/" + quote("x/ü ñ/file name.md"))
    assert (r.status, r.data) == (200, b"raw")


def test_oversize_bodies_are_refused_with_413(tmp_path):
    """JSON and NDJSON bodies over ``max_body`` (by Content-Length, before they are read, or as a
    chunked body passes it), an LFS upload larger than its batch request announced, and a part
    larger than the chunk size: 413, the connection closed, the server still serving."""
    with HubServer(tmp_path / "hub", tokens=(TOKEN,), max_body=1024, multipart_chunk=100) as server:
        server.store.create("org/ok", private=False)
        big = _ndjson(_file("f.txt", os.urandom(1500)))
        for chunked in (False, True):
            r = _raw(server, "POST", _COMMIT, big, chunked=chunked)
            assert (r.status, r.getheader("Connection")) == (413, "close") and b"Payload Too Large" in r.data
        conn = http.client.HTTPConnection(*server.httpd.server_address[:2], timeout=10)
        conn.putrequest("POST", "/api/repos/create")  # 10 GiB announced, none sent: refused at once
        conn.putheader("Content-Length", str(10 << 30))
        conn.endheaders()
        assert conn.getresponse().status == 413
        conn.close()
        data = b"0123456789"
        oid = hashlib.sha256(data).hexdigest()
        batch = {"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]}
        assert _raw(server, "POST", "/org/ok.git/info/lfs/objects/batch", batch).status == 200
        assert _raw(server, "PUT", f"/__lfs/org/ok/{oid}", data + b"!").status == 413
        assert server.store.lfs_size("org/ok", oid) is None
        assert _raw(server, "PUT", f"/__lfs/org/ok/{oid}/part/1", os.urandom(101)).status == 413
        assert _raw(server, "PUT", f"/__lfs/org/ok/{oid}", data).status == 200
        assert server.store.lfs_size("org/ok", oid) == len(data)
        assert not list((tmp_path / "hub").rglob("*.tmp"))


@pytest.mark.parametrize("head, body", [("Content-Length: -1", b""), ("Content-Length: 1e3", b""),
                                        ("Transfer-Encoding: gzip", b""),
                                        ("Transfer-Encoding: chunked", b"zz\r\n{}\r\n0\r\n\r\n")],
                         ids=["negative length", "length not a number", "unknown encoding", "bad chunk size"])
def test_unreadable_bodies_are_refused_with_400(head, body, hub):
    """A body the headers do not say how to read is refused, and the connection closes."""
    with socket.create_connection(hub.httpd.server_address[:2], timeout=10) as s:
        s.sendall(f"POST {_COMMIT} HTTP/1.1\r\nHost: hub\r\n{head}\r\n\r\n".encode() + body)
        answer = b""
        while chunk := s.recv(1 << 16):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in answer


def test_concurrent_commits_all_land_and_readers_never_see_half_of_one(hub):
    """Commits from many threads at once: each lands (none lost), every read in between answers a
    whole repo, and no temporary file is left."""
    n, start, failures = 8, threading.Barrier(9), []

    def write(i: int) -> None:
        start.wait()
        r = _raw(hub, "POST", _COMMIT, _ndjson(_file(f"f{i}.txt", b"%d" % i), summary=f"c{i}"))
        if r.status != 200:
            failures.append(r.data)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    seen = 0
    while any(t.is_alive() for t in threads) or seen == 0:
        r = _raw(hub, "GET", "/api/models/org/ok")
        assert r.status == 200, r.data
        seen = len(json.loads(r.data)["siblings"])
    for t in threads:
        t.join()
    assert failures == []
    files = json.loads(_raw(hub, "GET", "/api/models/org/ok").data)["siblings"]
    assert sorted(f["rfilename"] for f in files) == [".gitattributes"] + [f"f{i}.txt" for i in range(n)]
    chain, sha = [], hub.store.meta("org/ok")["branches"]["main"]
    while sha:
        chain.append(sha)
        sha = json.loads((hub.store.path("org/ok") / "commits" / f"{sha}.json").read_text())["parent"]
    assert len(chain) == n + 1 and not list(hub.store.root.rglob("*.tmp"))


# --- fault injection ------------------------------------------------------------------------------


def _repo_files(server: HubServer) -> dict[str, bytes]:
    folder = server.store.path("org/ok")
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_fault_status_on_a_commit_changes_nothing(hub):
    """A 500 on the commit: the client (create_commit, which huggingface_hub 1.33 does not retry)
    sees it, the repo is as before, and the next commit lands once."""
    api = HfApi(endpoint=hub.url, token=TOKEN)
    before = _repo_files(hub)
    hub.inject(Fault("commit", status=500))
    with pytest.raises(HfHubHTTPError) as e:
        api.create_commit("org/ok", [CommitOperationAdd("a.txt", b"a")], commit_message="one")
    assert e.value.response.status_code == 500 and "fault" in e.value.response.headers["X-Error-Message"]
    assert _repo_files(hub) == before and hub.stats["commits"] == []
    api.create_commit("org/ok", [CommitOperationAdd("a.txt", b"a")], commit_message="one")
    assert [c[1] for c in hub.stats["commits"]] == ["one"] and hub.stats["faults"] == [("commit", "500")]
    assert hub.stats["requests"]["POST commit"] == 2


def test_fault_503_on_preupload_is_retried_by_the_client(hub, backoff_sleeps):
    """http_backoff retries a 503 after its first wait (1 s) and the upload lands once."""
    api = HfApi(endpoint=hub.url, token=TOKEN)
    hub.inject(Fault("preupload", status=503))
    api.upload_file(path_or_fileobj=b"hello", path_in_repo="h.txt", repo_id="org/ok")
    assert backoff_sleeps == [1] and hub.stats["faults"] == [("preupload", "503")]
    assert hub.stats["requests"]["POST preupload"] == 2 and len(hub.stats["commits"]) == 1


def test_fault_429_with_retry_after_is_honoured(hub, backoff_sleeps):
    """A 429 with Retry-After: the header is on the answer, and the client waits by it (its wait is
    Retry-After + 1 s, where a plain retry waits 1 s)."""
    hub.inject(Fault("repo_info", status=429, retry_after=1))
    r = _raw(hub, "GET", "/api/models/org/ok")
    assert (r.status, r.getheader("Retry-After")) == (429, "1")
    api = HfApi(endpoint=hub.url, token=TOKEN)
    hub.inject(Fault("lfs_batch", status=429, retry_after=1))
    data = os.urandom(100_000)
    api.upload_file(path_or_fileobj=data, path_in_repo="w.bin", repo_id="org/ok")
    assert backoff_sleeps == [2] and hub.stats["faults"] == [("repo_info", "429"), ("lfs_batch", "429")]
    assert hub.stats["lfs_completed"] == [hashlib.sha256(data).hexdigest()]


def test_fault_drop_resets_the_connection_mid_body(hub):
    """drop_after: the server reads that much of the body, then resets the TCP connection without
    answering; nothing is stored, and the next connection is served."""
    hub.inject(Fault("lfs_put", drop_after=1000))
    with socket.create_connection(hub.httpd.server_address[:2], timeout=10) as s:
        s.sendall(f"PUT /__lfs/org/ok/{_OID} HTTP/1.1\r\nHost: hub\r\nContent-Length: 100000\r\n\r\n".encode()
                  + b"x" * 5000)
        with pytest.raises(ConnectionResetError):
            while s.recv(1 << 16):
                pass
    assert hub.stats["faults"] == [("lfs_put", "drop")] and hub.stats["lfs_bytes"] == 0
    assert not list((hub.store.path("org/ok") / "lfs").iterdir())
    assert _raw(hub, "GET", "/api/models/org/ok").status == 200


def test_fault_drop_on_an_lfs_upload_is_retried_by_the_client(hub, backoff_sleeps):
    """The client meets the reset as a network error, retries the PUT, and the object lands whole."""
    api = HfApi(endpoint=hub.url, token=TOKEN)
    data = os.urandom(300_000)
    hub.inject(Fault("lfs_put", drop_after=1000))
    api.upload_file(path_or_fileobj=data, path_in_repo="w.bin", repo_id="org/ok")
    oid = hashlib.sha256(data).hexdigest()
    assert backoff_sleeps == [1] and hub.stats["requests"]["PUT lfs_put"] == 2
    assert hub.stats["lfs_completed"] == [oid] and hub.stats["lfs_uploads"][oid] == len(data)
    assert hub.store.lfs_size("org/ok", oid) == len(data)


def test_fault_status_reads_the_body_so_the_client_gets_the_answer(hub, tmp_path):
    """A status fault on a request with a body: a small body is read first (the connection then
    carries the next request); past ``max_body`` the answer still arrives, and the connection closes."""
    conn = http.client.HTTPConnection(*hub.httpd.server_address[:2], timeout=10)
    hub.inject(Fault("lfs_put", status=503))
    r = _raw(hub, "PUT", f"/__lfs/org/ok/{_OID}", os.urandom(2_000_000), conn=conn)
    assert (r.status, r.getheader("Connection")) == (503, None)
    assert _raw(hub, "GET", "/api/models/org/ok", conn=conn).status == 200
    conn.close()
    with HubServer(tmp_path / "small", tokens=(TOKEN,), max_body=1024) as server:
        server.store.create("org/ok", private=False)
        server.inject(Fault("commit", status=503))
        r = _raw(server, "POST", _COMMIT, _ndjson(_file("f.txt", os.urandom(200_000))))
        assert (r.status, r.getheader("Connection")) == (503, "close")


def test_fault_delay_outlasts_the_clients_timeout(hub):
    """delay: a client with a shorter timeout gives up, and the server still handles the request
    (here a commit whose answer the client never reads: it lands)."""
    hub.inject(Fault("commit", delay=0.6))
    with pytest.raises(TimeoutError):
        _raw(hub, "POST", _COMMIT, _ndjson(_file("late.txt")), timeout=0.2)
    deadline = time.monotonic() + 5
    while not hub.stats["commits"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [c[2] for c in hub.stats["commits"]] == [["late.txt"]] and hub.stats["faults"] == [("commit", "delay")]


def test_faults_count_matching_requests_from_injection(hub):
    """nth and times count the requests to the fault's route only, from when it was injected; a
    fault without a route meets the next request of any kind; clear_faults drops what is left."""
    hub.inject(Fault("repo_info", nth=2, times=2, status=503))
    statuses = []
    for _ in range(5):
        statuses.append(_raw(hub, "GET", "/api/models/org/ok").status)
        assert _raw(hub, "GET", "/api/models/org/ok/refs").status == 200  # another route: not counted
    assert statuses == [200, 503, 503, 200, 200] and hub.stats["faults"] == [("repo_info", "503")] * 2
    hub.inject(Fault(status=502))
    assert _raw(hub, "GET", "/api/models/org/ok/refs").status == 502
    hub.inject(Fault(status=500), Fault("repo_info", drop_after=0))
    hub.clear_faults()
    assert _raw(hub, "GET", "/api/models/org/ok").status == 200


@pytest.mark.parametrize("kwargs", [{"route": "comit", "status": 500}, {"nth": 0, "status": 500},
                                    {"status": 200}, {"status": 500, "drop_after": 10}, {"retry_after": 1},
                                    {}, {"delay": -1}])
def test_a_fault_that_cannot_play_is_refused(kwargs):
    with pytest.raises(ValueError):
        Fault(**kwargs)


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
