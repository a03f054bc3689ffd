"""A local Hugging Face Hub: the part of the Hub's HTTP API that ``huggingface_hub`` 1.33 uses to
create a repo, upload (preupload, LFS batch, basic and multipart transfers), commit, tag, list and
download. Repos live on disk under ``--root``; LFS objects are checked against their sha256.

It exists so that the publishing code runs the real client end to end without the network: the
demo release is pushed to it, and the tests drive it in a background thread (``HubServer``). It
counts requests and uploaded bytes (``stats``) so tests can say "nothing was sent the second
time", and it can stall an upload after some bytes (``faults``) to interrupt a push mid-file.

The xet protocol is not served (``/xet-write-token`` answers 404), as on a Hub without xet:
clients upload through the LFS batch API. Writes need ``Authorization: Bearer <token>`` with a
known token. Run it with ``./inv hub.serve`` (token from ``$HF_TOKEN``) or as a module::

    HF_TOKEN=hf_local ./inv hub.serve --port 8999 --root /tmp/hub
    HF_ENDPOINT=http://127.0.0.1:8999 HF_TOKEN=hf_local ./inv publish --spec specs/demo.toml --push

    python -m release.localhub --port 8999 --root /tmp/hub --token hf_local
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from release.errors import LocalHubError

GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in (
    "*.bin", "*.gguf", "*.h5", "*.model", "*.msgpack", "*.onnx", "*.pt", "*.pth", "*.safetensors", "*.zip"))
LFS_SUFFIXES = tuple(line.split()[0][1:] for line in GITATTRIBUTES.splitlines())
REGULAR_MAX = 10 * 1024 * 1024  # the Hub stores larger files in LFS whatever their name
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"  # route patterns' parts
OID = r"(?P<oid>[0-9a-f]{64})"
_FAULT_WAIT_S = 30.0
_F = TypeVar("_F", bound=Callable[..., None])


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubRefusal(Exception):
    """The server's refusal of one request, answered as the Hub does: an HTTP status, a message
    (body and ``X-Error-Message``) and the Hub's ``X-Error-Code``. Not a user error of ours
    (that is ``release.errors.LocalHubError``): it never leaves the request it refuses."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.body = body or {}


@dataclass(frozen=True)
class Commit:
    """A commit made from the Hub's NDJSON payload: what the server's ``stats`` record of it."""

    sha: str
    summary: str
    added: list[str]
    deleted: list[str]


def _is_lfs(path: str, size: int, sample: bytes) -> bool:
    """Where the Hub puts a file: LFS for its LFS suffixes, large files and binary samples."""
    return path.endswith(LFS_SUFFIXES) or size > REGULAR_MAX or b"\0" in sample


def _lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


class Store:
    """Repos on disk: ``repos/<ns>/<name>/{repo.json, commits/<sha>.json, blobs/<sha1>, lfs/<sha256>}``,
    and multipart uploads in progress under ``parts/<sha256>/``. Everything a request changes in a
    repo (blobs, LFS objects, commits, tags) goes through here; it knows nothing of HTTP but the
    refusals (``HubRefusal``) the Hub answers for a missing repo, revision or object.

    ``keep_lfs=False``: an LFS upload is read and its sha256 checked as always, but stored as a
    sparse file of its size (downloads read zeros). For benchmarks whose disk cannot hold a second
    copy of what they push."""

    def __init__(self, root: Path, keep_lfs: bool = True):
        self.root = Path(root)
        self.keep_lfs = keep_lfs
        self.lock = threading.RLock()

    # --- repos and revisions ----------------------------------------------------------------
    def path(self, repo: str) -> Path:
        return self.root / "repos" / repo

    def meta(self, repo: str) -> dict:
        f = self.path(repo) / "repo.json"
        if not f.is_file():
            raise HubRefusal(404, f"Repository {repo} not found", "RepoNotFound")
        return json.loads(f.read_text())

    def save_meta(self, repo: str, meta: dict) -> None:
        f = self.path(repo) / "repo.json"
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, f)

    def create(self, repo: str, private: bool) -> bool:
        """Make ``repo`` with the Hub's first commit (its ``.gitattributes``); False if it exists."""
        with self.lock:
            if (self.path(repo) / "repo.json").is_file():
                return False
            for sub in ("commits", "blobs", "lfs", "parts"):
                (self.path(repo) / sub).mkdir(parents=True, exist_ok=True)
            self.save_meta(repo, {"id": repo, "private": private, "branches": {}, "tags": {}})
            data = GITATTRIBUTES.encode()
            self.put_blob(repo, data)
            self.commit(repo, "main", "initial commit", "", {".gitattributes": self.regular_entry(data)}, [], None)
            return True

    def resolve(self, repo: str, rev: str) -> str:
        """A branch, tag or commit sha -> commit sha."""
        meta = self.meta(repo)
        rev = unquote(rev)
        if rev in meta["branches"]:
            return meta["branches"][rev]
        if rev in meta["tags"]:
            return meta["tags"][rev]
        if re.fullmatch(r"[0-9a-f]{40}", rev) and (self.path(repo) / "commits" / f"{rev}.json").is_file():
            return rev
        raise HubRefusal(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def files(self, repo: str, sha: str) -> dict[str, dict]:
        return json.loads((self.path(repo) / "commits" / f"{sha}.json").read_text())["files"]

    def files_at(self, repo: str, rev: str) -> dict[str, dict]:
        """The files at ``rev``, none where it does not exist yet (a client preuploads to a branch
        it is about to create)."""
        try:
            return self.files(repo, self.resolve(repo, rev))
        except HubRefusal as e:
            if e.code != "RevisionNotFound":
                raise
            return {}

    # --- blobs and LFS objects ----------------------------------------------------------------
    def put_blob(self, repo: str, data: bytes) -> str:
        sha1 = git_blob_sha1(data)
        (self.path(repo) / "blobs" / sha1).write_bytes(data)
        return sha1

    def blob(self, repo: str, sha1: str) -> bytes:
        return (self.path(repo) / "blobs" / sha1).read_bytes()

    @staticmethod
    def regular_entry(data: bytes) -> dict:
        return {"size": len(data), "oid": git_blob_sha1(data), "lfs": None}

    def lfs_path(self, repo: str, oid: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", oid):
            raise HubRefusal(400, f"invalid oid {oid!r}")
        return self.path(repo) / "lfs" / oid

    def lfs_size(self, repo: str, oid: str) -> int | None:
        """The size of the LFS object ``oid``, None until it is uploaded whole."""
        f = self.lfs_path(repo, oid)
        return f.stat().st_size if f.is_file() else None

    @staticmethod
    def _write(dest: Path, blocks: Iterable[bytes], keep: bool) -> tuple[int, str]:
        """Write ``blocks`` into ``dest`` (only its size, as a sparse file, unless ``keep``),
        streaming: an upload is never held whole. -> (size, sha256)."""
        h, got = hashlib.sha256(), 0
        with open(dest, "wb") as f:
            for block in blocks:
                if keep:
                    f.write(block)
                h.update(block)
                got += len(block)
            if not keep:
                f.truncate(got)
        return got, h.hexdigest()

    def receive_lfs(self, repo: str, oid: str, blocks: Iterable[bytes]) -> None:
        """Store a basic LFS upload as the object ``oid`` if it hashes to ``oid``. A broken upload
        (``ConnectionAbortedError`` from ``blocks``) leaves nothing behind; the client sends it again."""
        self.meta(repo)
        target = self.lfs_path(repo, oid)
        tmp = target.with_name(f".{oid}.{threading.get_ident()}.tmp")
        try:
            _, sha = self._write(tmp, blocks, self.keep_lfs)
        except ConnectionAbortedError:
            tmp.unlink(missing_ok=True)
            raise
        if sha != oid:
            tmp.unlink(missing_ok=True)
            raise HubRefusal(400, f"sha256 mismatch: got {sha}, expected {oid}")
        os.replace(tmp, target)

    def receive_part(self, repo: str, oid: str, part: int, blocks: Iterable[bytes]) -> str:
        """Store part ``part`` of a multipart upload of ``oid`` (always kept: the whole object's
        sha256 is checked when the parts are assembled). -> its ETag, the part's md5."""
        folder = self.path(repo) / "parts" / oid
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / f"{part:05d}"
        self._write(dest, blocks, keep=True)
        return hashlib.md5(dest.read_bytes()).hexdigest()

    def assemble_parts(self, repo: str, oid: str, parts: list[tuple[int, str]]) -> None:
        """Join the parts ``(number, etag)`` of a multipart upload into the object ``oid`` if each
        part is the one its ETag names and the whole hashes to ``oid``; then drop the parts."""
        folder = self.path(repo) / "parts" / oid
        target = self.lfs_path(repo, oid)
        tmp = target.with_name(f".{oid}.tmp")
        h, size = hashlib.sha256(), 0
        with open(tmp, "wb") as out:
            for number, etag in parts:
                data = (folder / f"{number:05d}").read_bytes()
                md5 = hashlib.md5(data).hexdigest()
                if f'"{md5}"' != etag and md5 != etag:
                    raise HubRefusal(400, f"part {number}: etag mismatch")
                if self.keep_lfs:
                    out.write(data)
                h.update(data)
                size += len(data)
            if not self.keep_lfs:
                out.truncate(size)
        if h.hexdigest() != oid:
            tmp.unlink()
            raise HubRefusal(400, "sha256 mismatch after completing the multipart upload")
        os.replace(tmp, target)
        shutil.rmtree(folder, ignore_errors=True)

    # --- commits and tags ---------------------------------------------------------------------
    def _operations(self, repo: str, payload: bytes) -> tuple[dict | None, dict[str, dict],
                                                              list[tuple[str, bool]]]:
        """An NDJSON commit payload -> (header, added entries by path, deleted (path, is_folder)).
        Regular files are stored as blobs here; LFS files must have been uploaded before."""
        header, added, deleted = None, {}, []
        for line in payload.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, v = item["key"], item["value"]
            if key == "header":
                header = v
            elif key == "file":
                data = base64.b64decode(v["content"])
                self.put_blob(repo, data)
                added[v["path"]] = self.regular_entry(data)
            elif key == "lfsFile":
                size = self.lfs_size(repo, v["oid"])
                if size is None:
                    raise HubRefusal(422, f"LFS object {v['oid']} for {v['path']} was never uploaded")
                added[v["path"]] = {"size": size, "oid": git_blob_sha1(_lfs_pointer(v["oid"], size)),
                                    "lfs": {"oid": v["oid"], "size": size}}
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append((v["path"], key == "deletedFolder"))
            else:
                raise HubRefusal(400, f"unknown commit operation {key!r}")
        return header, added, deleted

    def apply_commit(self, repo: str, rev: str, payload: bytes) -> Commit:
        """Commit an NDJSON payload (the Hub's commit API) on the existing branch ``rev``."""
        self.meta(repo)
        header, added, deleted = self._operations(repo, payload)
        if header is None or not header.get("summary"):
            raise HubRefusal(400, "commit header with a summary is required")
        branch = unquote(rev)
        if branch not in self.meta(repo)["branches"]:
            raise HubRefusal(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        sha = self.commit(repo, branch, header["summary"], header.get("description", ""), added, deleted,
                          header.get("parentCommit"))
        return Commit(sha, header["summary"], sorted(added), [d for d, _ in deleted])

    def commit(self, repo: str, branch: str, summary: str, description: str, added: dict[str, dict],
               deleted: list[tuple[str, bool]], parent_commit: str | None) -> str:
        """Add and delete entries on ``branch`` (made if new) -> the new commit's sha. Refused
        when ``parent_commit`` is given and is no longer the branch's head."""
        with self.lock:
            meta = self.meta(repo)
            parent = meta["branches"].get(branch)
            if parent_commit and parent and not parent.startswith(parent_commit):
                raise HubRefusal(412, "A commit has happened since. Please refresh and try again.")
            files = dict(self.files(repo, parent)) if parent else {}
            for path, is_folder in deleted:
                if is_folder:
                    gone = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                else:
                    gone = [path] if path in files else []
                if not gone:
                    raise HubRefusal(404, f"Entry {path} not found", "EntryNotFound")
                for p in gone:
                    del files[p]
            files.update(added)
            body = {"parent": parent, "summary": summary, "description": description, "files": files,
                    "time": time.time()}
            sha = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
            (self.path(repo) / "commits" / f"{sha}.json").write_text(json.dumps(body))
            meta["branches"][branch] = sha
            self.save_meta(repo, meta)
            return sha

    def create_tag(self, repo: str, rev: str, tag: str) -> None:
        with self.lock:
            sha = self.resolve(repo, rev)
            meta = self.meta(repo)
            if tag in meta["tags"]:
                raise HubRefusal(409, f"Tag {tag} already exists")
            meta["tags"][tag] = sha
            self.save_meta(repo, meta)

    def delete_tag(self, repo: str, tag: str) -> None:
        """Delete the tag ``tag`` names once unquoted (as ``resolve`` reads a revision)."""
        with self.lock:
            meta = self.meta(repo)
            if unquote(tag) not in meta["tags"]:
                raise HubRefusal(404, f"Tag {tag} not found", "RevisionNotFound")
            del meta["tags"][unquote(tag)]
            self.save_meta(repo, meta)


class HubServer:
    """The server, run in a background thread: ``with HubServer(root) as hub: ... hub.url``."""

    def __init__(self, root: Path, tokens: tuple[str, ...] | None = ("hf_local",), host: str = "127.0.0.1",
                 port: int = 0, page_size: int = 1000, multipart_threshold: int | None = None,
                 multipart_chunk: int = 5 * 1024 * 1024, user: str = "local-user", keep_lfs: bool = True):
        self.store = Store(root, keep_lfs=keep_lfs)  # keep_lfs=False: sparse LFS objects, see Store
        self.tokens = tokens  # None: any non-empty bearer token is accepted
        self.page_size = page_size
        self.multipart_threshold = multipart_threshold
        self.multipart_chunk = multipart_chunk
        self.user = user
        # LFS oid (sha256) -> {"after": bytes}: the upload of that object stops reading after that
        # many bytes and ``stalled`` is set, as if the network or the client died mid-file.
        self.faults: dict[str, dict] = {}
        self.stalled = threading.Event()
        self._release = threading.Event()
        self.stats_lock = threading.Lock()
        self.reset_stats()
        self.httpd = _HTTPServer((host, port), self)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def reset_stats(self) -> None:
        with self.stats_lock:
            self.stats = {"requests": collections.Counter(), "lfs_bytes": 0, "lfs_uploads": collections.Counter(),
                          "lfs_completed": [], "commits": [], "unauthorized": 0, "download_bytes": 0}

    def count(self, key: str, n: int = 1) -> None:
        with self.stats_lock:
            self.stats["requests"][key] += n

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stall(self) -> None:
        """Hold an upload that reached its fault: set ``stalled``, wait for ``release_stalls``."""
        self.stalled.set()
        self._release.wait(_FAULT_WAIT_S)

    def release_stalls(self) -> None:
        self._release.set()


class _HTTPServer(ThreadingHTTPServer):
    """The HTTP server; its handlers reach the repos, tokens and counters through ``hub``."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], hub: HubServer):
        self.hub = hub
        super().__init__(address, Handler)


def _tree_entries(files: dict[str, dict], prefix: str, recursive: bool) -> list[dict]:
    """The tree API's entries under ``prefix``: files, then the folders implied by their paths."""
    entries, folders = [], set()
    for p, e in sorted(files.items()):
        if not p.startswith(prefix):
            continue
        rest = p[len(prefix):]
        parts = rest.split("/")
        for i in range(1, len(parts)):
            folders.add(prefix + "/".join(parts[:i]))
        if "/" in rest and not recursive:
            continue
        item = {"type": "file", "path": p, "size": e["size"], "oid": e["oid"]}
        if e["lfs"]:
            item["lfs"] = {"oid": e["lfs"]["oid"], "size": e["lfs"]["size"], "pointerSize": 134}
        entries.append(item)
    for f in sorted(folders):
        if recursive or "/" not in f[len(prefix):]:
            entries.append({"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()})
    return entries


# --- routing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    """One kind of request the server answers: its method, the pattern its whole path matches
    (named groups become the handler's keyword arguments) and the Handler method answering it."""

    method: str
    pattern: re.Pattern[str]
    handler: Callable[..., None]


ROUTES: list[Route] = []  # in the order declared, tried in that order; HEAD is served by the GET routes


def route(method: str, *patterns: str) -> Callable[[_F], _F]:
    """Declare, beside a Handler method, the requests it answers: ``method`` on a path matching one
    of ``patterns``. The table is the server's API at a glance: ``grep @route``."""

    def register(handler: _F) -> _F:
        ROUTES.extend(Route(method, re.compile(p), handler) for p in patterns)
        return handler

    return register


class Handler(BaseHTTPRequestHandler):
    """One request, HTTP only: read it, find its ``route``, call the method, write the answer (or
    the ``HubRefusal`` it raised). Repo state lives in ``self.store``, counters on ``self.hub``."""

    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    server: _HTTPServer

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    @property
    def store(self) -> Store:
        return self.server.hub.store

    def log_message(self, format, *args):  # quiet: tests read stats instead
        pass

    # --- plumbing ---------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _body_blocks(self, oid: str) -> Iterator[bytes]:
        """The body of an upload of ``oid`` in blocks of 64 KiB, counted in ``stats`` as they are
        stored. A stall fault on ``oid`` holds it after that many bytes, then aborts it
        (``ConnectionAbortedError``), as does a client that goes away."""
        hub = self.hub
        n = int(self.headers.get("Content-Length") or 0)
        fault = hub.faults.get(oid)
        got = 0
        while got < n:
            want = min(1 << 16, n - got)
            if fault is not None and got + want > fault["after"]:
                want = fault["after"] - got
                if want <= 0:
                    hub.stall()
                    self.close_connection = True
                    raise ConnectionAbortedError("upload stalled by a fault")
            block = self.rfile.read(want)
            if not block:
                raise ConnectionAbortedError("client went away")
            yield block
            got += len(block)
            with hub.stats_lock:
                hub.stats["lfs_bytes"] += len(block)
                hub.stats["lfs_uploads"][oid] += len(block)

    def _send(self, status: int, body: bytes | dict | list | None = None, headers: dict | None = None,
              head: bool = False) -> None:
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        else:
            data = body or b""
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(data)) if not (headers or {}).get("Content-Length") else
                         headers["Content-Length"])
        self.end_headers()
        if not head and data:
            self.wfile.write(data)

    def _refuse(self, e: HubRefusal) -> None:
        headers = {"X-Error-Message": e.message, **e.headers}
        if e.code:
            headers["X-Error-Code"] = e.code
        self._send(e.status, {"error": e.message, **e.body}, headers, head=self.command == "HEAD")

    def _base(self) -> str:
        return f"http://{self.headers.get('Host')}"

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        for r in ROUTES:
            if r.method == self.command or (r.method == "GET" and self.command == "HEAD"):
                m = r.pattern.fullmatch(path)
                if m:
                    self.hub.count(f"{self.command} {r.handler.__name__}")
                    try:
                        if "Authorization" in self.headers and not self._token_ok():
                            self._body()  # as the Hub: a wrong token is refused on any route
                            self._need_write()
                        r.handler(self, query=query, **m.groupdict())
                    except HubRefusal as e:
                        self._refuse(e)
                    return
        self.hub.count(f"{self.command} unknown")
        self._body()
        self._refuse(HubRefusal(404, f"no route {self.command} {path}"))

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # --- auth -------------------------------------------------------------------------------
    def _token_ok(self) -> bool:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:]:
            return False
        return self.hub.tokens is None or auth[7:] in self.hub.tokens

    def _need_write(self) -> None:
        if not self._token_ok():
            with self.hub.stats_lock:
                self.hub.stats["unauthorized"] += 1
            raise HubRefusal(401, "Invalid credentials in Authorization header")

    def _need_read(self, repo: str) -> None:
        if self.store.meta(repo)["private"] and not self._token_ok():
            raise HubRefusal(401, "Repository not found", "RepoNotFound")

    # --- account and repos: whoami, create, card metadata, info, tree, refs --------------------
    @route("GET", r"/api/whoami-v2")
    def whoami(self, query):
        if not self._token_ok():
            raise HubRefusal(401, "Invalid credentials in Authorization header")
        user = self.hub.user
        self._send(200, {"type": "user", "name": user, "fullname": user, "orgs": [],
                         "auth": {"accessToken": {"displayName": "local", "role": "write"}}})

    @route("POST", r"/api/repos/create")
    def create_repo(self, query):
        body = json.loads(self._body() or b"{}")
        self._need_write()
        if body.get("type", "model") != "model":
            raise HubRefusal(400, "only model repos are served here")
        repo = f"{body.get('organization') or self.hub.user}/{body['name']}"
        private = body.get("visibility", "private" if body.get("private") else "public") != "public"
        if not self.store.create(repo, private):
            raise HubRefusal(409, "You already created this model repo", body={"url": f"{self._base()}/{repo}"})
        self._send(200, {"url": f"{self._base()}/{repo}", "name": repo, "id": repo})

    @route("POST", r"/api/validate-yaml")
    def validate_yaml(self, query):
        import yaml

        content = json.loads(self._body())["content"]
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            if m:
                yaml.safe_load(m.group(1))
        except yaml.YAMLError as e:
            self._send(400, {"errors": [{"message": str(e).splitlines()[0]}], "warnings": []})
            return
        self._send(200, {"errors": [], "warnings": []})

    @route("GET", rf"/api/models/{REPO}", rf"/api/models/{REPO}/revision/(?P<rev>[^/]+)")
    def repo_info(self, query, repo, rev="main"):
        self._need_read(repo)
        sha = self.store.resolve(repo, rev)
        meta = self.store.meta(repo)
        self._send(200, {"id": repo, "author": repo.split("/")[0], "sha": sha, "private": meta["private"],
                         "tags": [], "siblings": [{"rfilename": p} for p in sorted(self.store.files(repo, sha))]})

    @route("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.+))?")
    def tree(self, query, repo, rev, sub=None):
        """A folder's entries (everything below it with ``recursive=true``), ``page_size`` a page;
        the next page's URL is in the ``Link`` header, as on the Hub."""
        self._need_read(repo)
        sha = self.store.resolve(repo, rev)
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = (sub.strip("/") + "/") if sub else ""
        entries = _tree_entries(self.store.files(repo, sha), prefix, recursive)
        if sub and not entries:
            raise HubRefusal(404, f"Entry {sub} not found", "EntryNotFound")
        size = self.hub.page_size
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start:start + size]
        headers = {}
        if start + size < len(entries):
            nxt = f"{self._base()}{urlsplit(self.path).path}?recursive={recursive}&cursor={start + size}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._send(200, page, headers)

    @route("GET", rf"/api/models/{REPO}/refs")
    def refs(self, query, repo):
        self._need_read(repo)
        meta = self.store.meta(repo)
        self._send(200, {
            "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in meta["branches"].items()],
            "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": s} for t, s in meta["tags"].items()],
            "converts": [], "pullRequests": []})

    # --- preupload, commits and tags ----------------------------------------------------------
    @route("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)")
    def preupload(self, query, repo, rev):
        body = json.loads(self._body())
        self._need_write()
        current = self.store.files_at(repo, rev)
        out = []
        for f in body["files"]:
            lfs = _is_lfs(f["path"], f["size"], base64.b64decode(f["sample"]))
            remote = current.get(f["path"])
            oid = None
            if remote is not None:
                oid = remote["lfs"]["oid"] if remote["lfs"] else remote["oid"]
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        self._send(200, {"files": out, "commitOid": None})

    @route("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)")
    def commit(self, query, repo, rev):
        raw = self._body()
        self._need_write()
        done = self.store.apply_commit(repo, rev, raw)
        with self.hub.stats_lock:
            self.hub.stats["commits"].append((repo, done.summary, done.added, done.deleted))
        self._send(200, {"success": True, "commitOid": done.sha,
                         "commitUrl": f"{self._base()}/{repo}/commit/{done.sha}", "pullRequestUrl": None})

    @route("POST", rf"/api/models/{REPO}/tag/(?P<rev>[^/]+)")
    def create_tag(self, query, repo, rev):
        body = json.loads(self._body())
        self._need_write()
        self.store.create_tag(repo, rev, body["tag"])
        self._send(200, {"success": True})

    @route("DELETE", rf"/api/models/{REPO}/tag/(?P<tag>[^/]+)")
    def delete_tag(self, query, repo, tag):
        self._need_write()
        self.store.delete_tag(repo, tag)
        self._send(200, {"success": True})

    # --- LFS: batch, basic and multipart transfers, verify, download ---------------------------
    @route("POST", rf"/{REPO}\.git/info/lfs/objects/batch")
    def lfs_batch(self, query, repo):
        body = json.loads(self._body())
        self._need_write()
        self.store.meta(repo)
        hub = self.hub
        objects = []
        for o in body["objects"]:
            item = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if self.store.lfs_size(repo, o["oid"]) is None:
                href = f"{self._base()}/__lfs/{repo}/{o['oid']}"
                upload = {"href": href, "header": {}}
                if hub.multipart_threshold is not None and o["size"] >= hub.multipart_threshold:
                    n = -(-o["size"] // hub.multipart_chunk)
                    upload["header"] = {"chunk_size": str(hub.multipart_chunk),
                                        **{str(i): f"{href}/part/{i}" for i in range(1, n + 1)}}
                item["actions"] = {"upload": upload, "verify": {"href": f"{href}/verify", "header": {}}}
            objects.append(item)
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   {"Content-Type": "application/vnd.git-lfs+json"})

    @route("PUT", rf"/__lfs/{REPO}/{OID}")
    def lfs_put(self, query, repo, oid):
        try:
            self.store.receive_lfs(repo, oid, self._body_blocks(oid))
        except ConnectionAbortedError:
            self.close_connection = True
            return
        with self.hub.stats_lock:
            self.hub.stats["lfs_completed"].append(oid)
        self._send(200, b"", {"ETag": f'"{oid[:32]}"'})

    @route("PUT", rf"/__lfs/{REPO}/{OID}/part/(?P<part>\d+)")
    def lfs_part(self, query, repo, oid, part):
        try:
            etag = self.store.receive_part(repo, oid, int(part), self._body_blocks(oid))
        except ConnectionAbortedError:
            self.close_connection = True
            return
        self._send(200, b"", {"ETag": f'"{etag}"'})

    @route("POST", rf"/__lfs/{REPO}/{OID}")
    def lfs_complete(self, query, repo, oid):
        body = json.loads(self._body())
        self.store.assemble_parts(repo, oid, [(p["partNumber"], p["etag"]) for p in body["parts"]])
        with self.hub.stats_lock:
            self.hub.stats["lfs_completed"].append(oid)
        self._send(200, {"success": True})

    @route("POST", rf"/__lfs/{REPO}/{OID}/verify")
    def lfs_verify(self, query, repo, oid):
        body = json.loads(self._body())
        size = self.store.lfs_size(repo, oid)
        if size is None or size != body["size"]:
            raise HubRefusal(404, f"object {oid} not found")
        self._send(200, {"success": True})

    @route("GET", rf"/__lfs-download/{REPO}/{OID}")
    def lfs_download(self, query, repo, oid):
        size = self.store.lfs_size(repo, oid)
        if size is None:
            raise HubRefusal(404, "object not found")
        start, status, headers = 0, 200, {"ETag": f'"{oid}"', "Accept-Ranges": "bytes"}
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if m and int(m.group(1)) < size:
            start, status = int(m.group(1)), 206
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(self.store.lfs_path(repo, oid), "rb") as fh:
            fh.seek(start)
            while block := fh.read(1 << 20):
                self.wfile.write(block)
                with self.hub.stats_lock:
                    self.hub.stats["download_bytes"] += len(block)

    # --- downloads ------------------------------------------------------------------------------
    @route("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)")
    def resolve(self, query, repo, rev, file):
        head = self.command == "HEAD"
        self._need_read(repo)
        sha = self.store.resolve(repo, rev)
        entry = self.store.files(repo, sha).get(file)
        if entry is None:
            raise HubRefusal(404, f"Entry {file} not found", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            oid = entry["lfs"]["oid"]
            # LFS content lives on "another host" (the CDN of the real Hub): the other name of
            # the loopback address, so the client does not forward the token to it.
            host, port = self.headers.get("Host", "127.0.0.1").rsplit(":", 1)
            other = "localhost" if host == "127.0.0.1" else "127.0.0.1"
            headers.update({"X-Linked-Etag": f'"{oid}"', "X-Linked-Size": entry["lfs"]["size"],
                            "Location": f"http://{other}:{port}/__lfs-download/{repo}/{oid}"})
            self._send(302, b"", headers, head=head)
            return
        self._send(200, self.store.blob(repo, entry["oid"]), headers, head=head)


def _listen(root: Path, host: str, port: int, tokens: tuple[str, ...] | None) -> HubServer:
    """A server bound to ``host:port`` for the repos under ``root``, or one line saying why not."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LocalHubError(f"{root}: cannot create the repos folder ({e.strerror}); choose another --root") from None
    try:
        return HubServer(root, tokens=tokens, host=host, port=port)
    except OSError as e:
        raise LocalHubError(f"{host}:{port}: cannot listen ({e.strerror}); choose another --port") from None


def serve(root: Path, *, port: int = 8999, host: str = "127.0.0.1", tokens: tuple[str, ...] | None = None) -> None:
    """Serve the repos under ``root`` until Ctrl-C. Prints the URL to use as HF_ENDPOINT, never a
    token. ``tokens``: the accepted write tokens; None accepts any bearer token."""
    root, hub = Path(root), None
    try:  # Ctrl-C at any moment, even before the first line, ends in one line
        hub = _listen(root, host, port, tokens)
        writes = "a given token" if tokens else "any bearer token"
        print(f"local Hub at {hub.url} (repos in {root}; writes need {writes}); set HF_ENDPOINT={hub.url}",
              flush=True)
        hub.httpd.serve_forever()
    except KeyboardInterrupt:
        print(f"local Hub stopped (repos kept in {root})", flush=True)
    finally:
        if hub is not None:
            hub.httpd.server_close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m release.localhub", description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=8999)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--root", type=Path, required=True, help="folder holding the repos")
    ap.add_argument("--token", action="append", help="accepted write token (repeat); default: any bearer token")
    args = ap.parse_args(argv)
    try:
        serve(args.root, port=args.port, host=args.host, tokens=tuple(args.token) if args.token else None)
    except LocalHubError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
