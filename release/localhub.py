"""A local Hugging Face Hub: the part of the Hub's HTTP API that ``huggingface_hub`` 1.33 uses to
create a repo, upload (preupload, LFS batch, basic and multipart transfers), commit, tag, list and
download. Repos live on disk under ``--root``; LFS objects are checked against their sha256.

It exists so that the publishing code runs the real client end to end without the network: the
demo release is pushed to it, and the tests drive it in a background thread (``HubServer``). It
counts requests and uploaded bytes (``stats``) so tests can say "nothing was sent the second
time", and it can stall an upload after some bytes (``faults``) to interrupt a push mid-file.

It refuses what the Hub refuses, since ``./inv hub.serve --host`` can face a network: repo ids and
file paths are checked as the Hub checks them (400), request bodies have a ceiling (413; an LFS
upload may not exceed the size its batch request announced), and every path the server reads or
writes is resolved and must lie under ``--root``. A commit becomes visible in one ``os.replace``.

For tests of a push that meets a failing Hub, ``HubServer.inject(Fault(...))`` makes chosen
requests answer an error status (with ``Retry-After``), drop the connection mid-body, or wait
longer than the client's timeout; a refused request changes nothing in the store.

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
import socket
import struct
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO, NoReturn, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from release.errors import LocalHubError

GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in (
    "*.bin", "*.gguf", "*.h5", "*.model", "*.msgpack", "*.onnx", "*.pt", "*.pth", "*.safetensors", "*.zip"))
LFS_SUFFIXES = tuple(line.split()[0][1:] for line in GITATTRIBUTES.splitlines())
REGULAR_MAX = 10 * 1024 * 1024  # the Hub stores larger files in LFS whatever their name
MAX_BODY = 64 * 1024 * 1024  # JSON and NDJSON bodies (commits carry regular files, each under REGULAR_MAX)
MAX_LFS_OBJECT = 50 * 1000**3  # the Hub's limit for one file; caps an upload no batch request announced
MAX_PARTS = 10_000  # parts of one multipart upload, as on S3
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"  # route patterns' parts: permissive, ``check_repo_id`` decides
OID = r"(?P<oid>[0-9a-f]{64})"
_FAULT_WAIT_S = 30.0
_LINGER_S = 1.0  # how long a connection closing under an unread body keeps reading it
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")
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


# --- what the Hub accepts -----------------------------------------------------------------------
def check_repo_id(repo: str) -> str:
    """``repo`` if the Hub accepts it as ``namespace/name`` (the rules of ``huggingface_hub``'s
    ``validate_repo_id``), else a 400 refusal. A repo id becomes folders under the root: this is what
    keeps ``..``, ``/`` and the like from naming a folder elsewhere."""
    parts = repo.split("/") if isinstance(repo, str) else []
    if (len(parts) == 2 and all(_REPO_PART.fullmatch(p) for p in parts) and "--" not in repo
            and ".." not in repo and not repo.endswith(".git")):
        return repo
    raise HubRefusal(400, f"Invalid repo id {repo!r}: it must be namespace/name, each of letters, digits, '-', '_' "
                          "and '.', neither starting nor ending with '-' or '.', without '--' or '..', not ending "
                          "in '.git', at most 96 characters")


def _path_problem(path: str) -> str | None:
    """Why the Hub would refuse ``path`` as a file's path in a repo, None if it takes it."""
    if not isinstance(path, str) or not path:
        return "a path is a non-empty string"
    if path.startswith("/"):
        return "absolute paths are refused"
    if "\\" in path:
        return "backslashes are refused"
    if any(unicodedata.category(c) == "Cc" for c in path):
        return "control characters are refused"
    segments = path.split("/")
    if "" in segments:
        return "empty path segments are refused"
    if "." in segments or ".." in segments:
        return "'.' and '..' segments are refused"
    if any(s.lower() == ".git" for s in segments):
        return "files under a '.git' folder are refused"
    return None


def check_path(path: str) -> str:
    """``path`` if the Hub takes it as a file's path in a repo (nested folders, any Unicode name,
    ``.gitattributes``), else a 400 refusal: relative, ``/``-separated, no empty, ``.`` or ``..``
    segment, no ``.git`` folder, no control character, no backslash."""
    why = _path_problem(path)
    if why is not None:
        raise HubRefusal(400, f"Invalid path {path!r}: {why}")
    return path


def _phrase(status: int) -> str:
    """The reason phrase of ``status`` ("Service Unavailable"), "Error" for a code without one."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _tmp_name(name: str) -> str:
    """A temporary name beside ``name`` that is this writer's own (process and thread): the server is
    threaded, and two writers of one file must not share one temporary file."""
    return f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"


def _atomic_write(dest: Path, data: bytes) -> None:
    """Write ``dest`` whole or not at all: a reader sees the old file or the new one, never a part."""
    tmp = dest.with_name(_tmp_name(dest.name))
    try:
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class Commit:
    """A commit made from the Hub's NDJSON payload: what the server's ``stats`` record of it."""

    sha: str
    summary: str
    added: list[str]
    deleted: list[str]


@dataclass
class _Operations:
    """A commit payload read and checked, nothing written yet: the header, the entries added (by path),
    the regular files' contents to store as blobs, the deletions ``(path, is_folder)``."""

    header: dict | None = None
    added: dict[str, dict] = field(default_factory=dict)
    blobs: list[bytes] = field(default_factory=list)
    deleted: list[tuple[str, bool]] = field(default_factory=list)


def _is_lfs(path: str, size: int, sample: bytes) -> bool:
    """Where the Hub puts a file: LFS for its LFS suffixes, large files and binary samples."""
    return path.endswith(LFS_SUFFIXES) or size > REGULAR_MAX or b"\0" in sample


def _lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def _hex(value: str, length: int, what: str) -> str:
    """``value`` if it is ``length`` lowercase hex digits (a name the store makes files of), else a refusal."""
    if not isinstance(value, str) or not re.fullmatch(rf"[0-9a-f]{{{length}}}", value):
        raise HubRefusal(400, f"invalid {what} {value!r}")
    return value


class Store:
    """Repos on disk: ``repos/<ns>/<name>/{repo.json, commits/<sha>.json, blobs/<sha1>, lfs/<sha256>}``,
    and multipart uploads in progress under ``parts/<sha256>/``. Everything a request changes in a
    repo (blobs, LFS objects, commits, tags) goes through here; it knows nothing of HTTP but the
    refusals (``HubRefusal``) the Hub answers for a missing repo, revision or object.

    Every path it reads or writes is resolved and must lie under the root (the second line of
    defence beside ``check_repo_id`` and ``check_path``). Files are written under a temporary name
    and renamed, and a commit becomes visible in one ``os.replace`` of ``repo.json``.

    ``keep_lfs=False``: an LFS upload is read and its sha256 checked as always, but stored as a
    sparse file of its size (downloads read zeros). For benchmarks whose disk cannot hold a second
    copy of what they push."""

    def __init__(self, root: Path, keep_lfs: bool = True):
        self.root = Path(root)
        self.keep_lfs = keep_lfs
        self.lock = threading.RLock()
        self._announced: dict[tuple[str, str], int] = {}  # (repo, oid) -> size, from LFS batch requests

    def _inside(self, path: Path) -> Path:
        """``path`` resolved (links and ``..`` followed), refused unless it lies under the root."""
        real = path.resolve()
        if not real.is_relative_to(self.root.resolve()):
            raise HubRefusal(400, "Invalid path: outside the repos")
        return real

    # --- repos and revisions ----------------------------------------------------------------
    def path(self, repo: str, *parts: str) -> Path:
        """``parts`` in ``repo``'s folder (the folder itself without), resolved and checked."""
        return self._inside(self.root.joinpath("repos", repo, *parts))

    def _commit_file(self, repo: str, sha: str) -> Path:
        return self.path(repo, "commits", f"{_hex(sha, 40, 'commit')}.json")

    def meta(self, repo: str) -> dict:
        f = self.path(repo, "repo.json")
        if not f.is_file():
            raise HubRefusal(404, f"Repository {repo} not found", "RepoNotFound")
        return json.loads(f.read_text())

    def save_meta(self, repo: str, meta: dict) -> None:
        """Replace ``repo.json`` in one rename: branches and tags move together, or not at all."""
        _atomic_write(self.path(repo, "repo.json"), json.dumps(meta, indent=1).encode())

    def create(self, repo: str, private: bool) -> bool:
        """Make ``repo`` with the Hub's first commit (its ``.gitattributes``); False if it exists.
        ``repo.json`` comes last, with ``main`` at that commit: a repo is never seen half made."""
        with self.lock:
            if self.path(repo, "repo.json").is_file():
                return False
            for sub in ("commits", "blobs", "lfs", "parts"):
                self.path(repo, sub).mkdir(parents=True, exist_ok=True)
            data = GITATTRIBUTES.encode()
            self.put_blob(repo, data)
            sha = self._write_commit(repo, None, "initial commit", "", {".gitattributes": self.regular_entry(data)})
            self.save_meta(repo, {"id": repo, "private": private, "branches": {"main": sha}, "tags": {}})
            return True

    def resolve(self, repo: str, rev: str) -> str:
        """A branch, tag or commit sha -> commit sha."""
        meta = self.meta(repo)
        rev = unquote(rev)
        if rev in meta["branches"]:
            return meta["branches"][rev]
        if rev in meta["tags"]:
            return meta["tags"][rev]
        if re.fullmatch(r"[0-9a-f]{40}", rev) and self._commit_file(repo, rev).is_file():
            return rev
        raise HubRefusal(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def files(self, repo: str, sha: str) -> dict[str, dict]:
        return json.loads(self._commit_file(repo, sha).read_text())["files"]

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
        _atomic_write(self.path(repo, "blobs", sha1), data)
        return sha1

    def blob(self, repo: str, sha1: str) -> bytes:
        return self.path(repo, "blobs", _hex(sha1, 40, "blob")).read_bytes()

    @staticmethod
    def regular_entry(data: bytes) -> dict:
        return {"size": len(data), "oid": git_blob_sha1(data), "lfs": None}

    def lfs_path(self, repo: str, oid: str) -> Path:
        return self.path(repo, "lfs", _hex(oid, 64, "oid"))

    def lfs_size(self, repo: str, oid: str) -> int | None:
        """The size of the LFS object ``oid``, None until it is uploaded whole."""
        f = self.lfs_path(repo, oid)
        return f.stat().st_size if f.is_file() else None

    def announce(self, repo: str, oid: str, size: int) -> None:
        """Remember the size an LFS batch request gave for ``oid``: its upload may not be larger."""
        with self.lock:
            self._announced[(repo, _hex(oid, 64, "oid"))] = size

    def announced(self, repo: str, oid: str) -> int | None:
        """The size announced for ``oid`` in ``repo``, None if no batch request named it."""
        with self.lock:
            return self._announced.get((repo, oid))

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
        (``ConnectionAbortedError`` from ``blocks``) or a refused one leaves nothing behind; the
        client sends it again."""
        self.meta(repo)
        target = self.lfs_path(repo, oid)
        tmp = target.with_name(_tmp_name(oid))
        try:
            _, sha = self._write(tmp, blocks, self.keep_lfs)
            if sha != oid:
                raise HubRefusal(400, f"sha256 mismatch: got {sha}, expected {oid}")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        with self.lock:
            self._announced.pop((repo, oid), None)

    def receive_part(self, repo: str, oid: str, part: int, blocks: Iterable[bytes]) -> str:
        """Store part ``part`` of a multipart upload of ``oid`` (always kept: the whole object's
        sha256 is checked when the parts are assembled). -> its ETag, the part's md5."""
        self.meta(repo)
        if not 1 <= part <= MAX_PARTS:
            raise HubRefusal(400, f"part number {part} is not between 1 and {MAX_PARTS}")
        folder = self.path(repo, "parts", _hex(oid, 64, "oid"))
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / f"{part:05d}"
        tmp = dest.with_name(_tmp_name(dest.name))
        try:
            self._write(tmp, blocks, keep=True)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return hashlib.md5(dest.read_bytes()).hexdigest()

    def assemble_parts(self, repo: str, oid: str, parts: list[tuple[int, str]]) -> None:
        """Join the parts ``(number, etag)`` of a multipart upload into the object ``oid`` if each
        part is the one its ETag names and the whole hashes to ``oid``; then drop the parts."""
        folder = self.path(repo, "parts", _hex(oid, 64, "oid"))
        target = self.lfs_path(repo, oid)
        tmp = target.with_name(_tmp_name(oid))
        h, size = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as out:
                for number, etag in parts:
                    part = folder / f"{int(number):05d}"
                    if not part.is_file():
                        raise HubRefusal(400, f"part {number} was never uploaded")
                    data = part.read_bytes()
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
                raise HubRefusal(400, "sha256 mismatch after completing the multipart upload")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        with self.lock:
            self._announced.pop((repo, oid), None)

    # --- commits and tags ---------------------------------------------------------------------
    def _operations(self, repo: str, payload: bytes) -> _Operations:
        """An NDJSON commit payload -> its operations, every path checked; nothing is stored yet.
        LFS files must have been uploaded before."""
        ops = _Operations()
        for line in payload.split(b"\n"):
            if not line.strip():
                continue
            item = json.loads(line)
            key, v = item["key"], item["value"]
            if key == "header":
                ops.header = v
            elif key == "file":
                data = base64.b64decode(v["content"])
                ops.blobs.append(data)
                ops.added[check_path(v["path"])] = self.regular_entry(data)
            elif key == "lfsFile":
                path = check_path(v["path"])
                size = self.lfs_size(repo, v["oid"])
                if size is None:
                    raise HubRefusal(422, f"LFS object {v['oid']} for {path} was never uploaded")
                ops.added[path] = {"size": size, "oid": git_blob_sha1(_lfs_pointer(v["oid"], size)),
                                   "lfs": {"oid": v["oid"], "size": size}}
            elif key in ("deletedFile", "deletedFolder"):
                folder = key == "deletedFolder"
                path = v["path"].rstrip("/") if folder and isinstance(v["path"], str) else v["path"]
                ops.deleted.append((check_path(path), folder))
            else:
                raise HubRefusal(400, f"unknown commit operation {key!r}")
        return ops

    def apply_commit(self, repo: str, rev: str, payload: bytes) -> Commit:
        """Commit an NDJSON payload (the Hub's commit API) on the existing branch ``rev``: checked
        whole first, so a refused commit stores nothing."""
        self.meta(repo)
        ops = self._operations(repo, payload)
        if not isinstance(ops.header, dict) or not ops.header.get("summary"):
            raise HubRefusal(400, "commit header with a summary is required")
        branch = unquote(rev)
        if branch not in self.meta(repo)["branches"]:
            raise HubRefusal(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        header = ops.header
        sha = self.commit(repo, branch, header["summary"], header.get("description", ""), ops.added, ops.deleted,
                          header.get("parentCommit"), ops.blobs)
        return Commit(sha, header["summary"], sorted(ops.added), [d for d, _ in ops.deleted])

    def _write_commit(self, repo: str, parent: str | None, summary: str, description: str,
                      files: dict[str, dict]) -> str:
        """Store a commit object (not yet on any branch, so invisible) -> its sha."""
        body = {"parent": parent, "summary": summary, "description": description, "files": files,
                "time": time.time()}
        sha = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
        _atomic_write(self._commit_file(repo, sha), json.dumps(body).encode())
        return sha

    def commit(self, repo: str, branch: str, summary: str, description: str, added: dict[str, dict],
               deleted: list[tuple[str, bool]], parent_commit: str | None, blobs: Iterable[bytes] = ()) -> str:
        """Add and delete entries on ``branch`` (made if new) -> the new commit's sha. Refused
        when ``parent_commit`` is given and is no longer the branch's head. ``blobs`` (the regular
        files' contents) are stored once the commit is known to go through; the commit becomes
        visible when ``repo.json`` is replaced, in one rename."""
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
            for data in blobs:
                self.put_blob(repo, data)
            sha = self._write_commit(repo, parent, summary, description, files)
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


@dataclass(frozen=True)
class Fault:
    """One failure the server plays: on the ``nth`` request (1-based, counted from when it was
    injected) whose handler name is ``route`` ("commit", "lfs_put", "lfs_part", "lfs_batch",
    "preupload", "create_repo", "create_tag", "repo_info", ...; None: any request), and on the
    ``times - 1`` matching requests after it. It answers ``status`` (500, 503, 429, ...; with a
    ``Retry-After`` of ``retry_after`` seconds) instead of handling the request, or reads
    ``drop_after`` bytes of the body and resets the connection without answering; ``delay`` first
    waits that many seconds (alone, the request is then handled: a server slower than the client's
    timeout). The request it refuses changes nothing in the store."""

    route: str | None = None
    nth: int = 1
    times: int = 1
    status: int | None = None
    retry_after: float | None = None
    drop_after: int | None = None
    delay: float = 0.0

    def __post_init__(self) -> None:
        names = {r.handler.__name__ for r in ROUTES}
        if self.route is not None and self.route not in names:
            raise ValueError(f"no route is handled by {self.route!r}; one of {sorted(names)}")
        if self.nth < 1 or self.times < 1:
            raise ValueError("nth and times count requests from 1")
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError(f"a fault answers an error status (4xx, 5xx), not {self.status}")
        if self.status is not None and self.drop_after is not None:
            raise ValueError("a fault answers a status or drops the connection, not both")
        if self.retry_after is not None and (self.status is None or self.retry_after < 0):
            raise ValueError("retry_after goes with a status, and is not negative")
        if (self.drop_after is not None and self.drop_after < 0) or self.delay < 0:
            raise ValueError("drop_after and delay are not negative")
        if self.status is None and self.drop_after is None and not self.delay:
            raise ValueError("a fault answers a status, drops the connection or delays")

    @property
    def kind(self) -> str:
        """What it plays, as ``stats["faults"]`` records it: "drop", the status ("503"), or "delay"."""
        if self.drop_after is not None:
            return "drop"
        return str(self.status) if self.status is not None else "delay"


@dataclass
class _Armed:
    """An injected fault and the matching requests it has seen."""

    fault: Fault
    seen: int = 0

    def hit(self, name: str) -> bool:
        """Count a request to handler ``name`` if it matches -> whether this one is to fail."""
        if self.fault.route not in (None, name):
            return False
        self.seen += 1
        return self.fault.nth <= self.seen < self.fault.nth + self.fault.times

    @property
    def spent(self) -> bool:
        return self.seen >= self.fault.nth + self.fault.times - 1


class HubServer:
    """The server, run in a background thread: ``with HubServer(root) as hub: ... hub.url``.

    ``max_body``: the ceiling of a JSON or NDJSON request body (413 above it). Faults: ``inject``
    plays ``Fault``s on chosen requests (``stats["faults"]`` lists those played); ``faults`` (LFS
    oid -> ``{"after": bytes}``) stalls the upload of that object after that many bytes until
    ``release_stalls``, as if the client died mid-file."""

    def __init__(self, root: Path, tokens: tuple[str, ...] | None = ("hf_local",), host: str = "127.0.0.1",
                 port: int = 0, page_size: int = 1000, multipart_threshold: int | None = None,
                 multipart_chunk: int = 5 * 1024 * 1024, user: str = "local-user", keep_lfs: bool = True,
                 max_body: int = MAX_BODY):
        self.store = Store(root, keep_lfs=keep_lfs)  # keep_lfs=False: sparse LFS objects, see Store
        self.tokens = tokens  # None: any non-empty bearer token is accepted
        self.page_size = page_size
        self.multipart_threshold = multipart_threshold
        self.multipart_chunk = multipart_chunk
        self.user = user
        self.max_body = max_body
        # LFS oid (sha256) -> {"after": bytes}: the upload of that object stops reading after that
        # many bytes and ``stalled`` is set, as if the network or the client died mid-file.
        self.faults: dict[str, dict] = {}
        self.stalled = threading.Event()
        self._release = threading.Event()
        self.stopping = threading.Event()  # set by stop(): delayed requests give up
        self._armed: list[_Armed] = []
        self._fault_lock = threading.Lock()
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
                          "lfs_completed": [], "commits": [], "unauthorized": 0, "download_bytes": 0,
                          "faults": []}

    def count(self, key: str, n: int = 1) -> None:
        with self.stats_lock:
            self.stats["requests"][key] += n

    def start(self) -> "HubServer":
        # polled often: a test's server stops in a few milliseconds, not the default half second
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.stopping.set()
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

    # --- injected faults ------------------------------------------------------------------------
    def inject(self, *faults: Fault) -> None:
        """Play ``faults`` on the requests to come (each counts its matching requests from now)."""
        with self._fault_lock:
            self._armed.extend(_Armed(f) for f in faults)

    def clear_faults(self) -> None:
        """Drop every fault not yet played, injected or stall (a held upload stays held until
        ``release_stalls``)."""
        with self._fault_lock:
            self._armed.clear()
        self.faults.clear()

    def fault_for(self, name: str) -> Fault | None:
        """The fault a request to handler ``name`` meets, if any (the first injected of those that
        fire); every armed fault counts the request, and spent ones are dropped."""
        with self._fault_lock:
            fired = [a.fault for a in self._armed if a.hit(name)]
            self._armed = [a for a in self._armed if not a.spent]
        if not fired:
            return None
        with self.stats_lock:
            self.stats["faults"].append((name, fired[0].kind))
        return fired[0]


class _HTTPServer(ThreadingHTTPServer):
    """The HTTP server; its handlers reach the repos, tokens and counters through ``hub``."""

    daemon_threads = True
    request_queue_size = 128  # clients upload in parallel; the default backlog of 5 drops connections

    def __init__(self, address: tuple[str, int], hub: HubServer):
        self.hub = hub
        self.resets: set[socket.socket] = set()  # connections to close with a reset (a drop fault)
        super().__init__(address, Handler)

    def shutdown_request(self, request: socket.socket) -> None:
        """Close the connection; one marked for a reset is closed at once (SO_LINGER 0: an RST, not
        the orderly FIN that ``shutdown`` would send first)."""
        if request in self.resets:
            self.resets.discard(request)
            self.close_request(request)
            return
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        """A client that went away mid-answer is no error of the server's; anything else is printed."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


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


# --- request bodies -----------------------------------------------------------------------------
class RequestBody:
    """A request's body, read as it comes (by ``Content-Length`` or chunked) and counted, so that
    the answer knows whether the connection can carry the next request (the body was read whole)
    or must close. ``error``: why the headers do not say how to read it (a 400)."""

    def __init__(self, rfile: BinaryIO, headers) -> None:
        self.rfile = rfile
        self.read = 0
        self.error: str | None = None
        self._chunk_left = 0
        encoding = headers.get("Transfer-Encoding", "").strip().lower()
        raw = headers.get("Content-Length")
        self.chunked = encoding == "chunked"
        self.length: int | None = None if self.chunked else 0
        if encoding not in ("", "identity", "chunked"):
            self.error = f"unsupported Transfer-Encoding {encoding!r}"
        elif not self.chunked and raw is not None:
            if re.fullmatch(r"\d+", raw.strip(), re.ASCII):
                self.length = int(raw.strip())
            else:
                self.error = f"invalid Content-Length {raw!r}"
        self.over = self.error is not None  # what is left is never to be read: bad headers, a limit passed, a break
        self.done = not self.chunked and self.length == 0 and not self.over

    def take(self, n: int) -> bytes:
        """Up to ``n`` bytes of what is left, b"" at its end. ``ConnectionAbortedError`` if the client
        went away, a 400 refusal if a chunked body is malformed."""
        if self.done or self.over or n <= 0:
            return b""
        if self.chunked and self._chunk_left == 0:
            self._chunk_left = self._chunk_size()
            if self._chunk_left == 0:
                self._end_chunks()
                return b""
        want = min(n, self._chunk_left if self.chunked else self.length - self.read)
        block = self.rfile.read(want)
        if len(block) < want:
            self.over = True
            raise ConnectionAbortedError("client went away")
        self.read += len(block)
        if self.chunked:
            self._chunk_left -= len(block)
            if self._chunk_left == 0 and self.rfile.readline(8) not in (b"\r\n", b"\n"):
                self._malformed("a chunk does not end with CRLF")
        elif self.read == self.length:
            self.done = True
        return block

    def _chunk_size(self) -> int:
        line = self.rfile.readline(1024)
        if not line.endswith(b"\n"):
            self._malformed("a chunk size line is missing or too long")
        try:
            size = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            self._malformed(f"invalid chunk size {line[:40]!r}")
        if size < 0:
            self._malformed("negative chunk size")
        return size

    def _end_chunks(self) -> None:
        """Read the trailer after the last chunk, up to its empty line."""
        for _ in range(100):
            line = self.rfile.readline(8192)
            if line in (b"\r\n", b"\n"):
                self.done = True
                return
            if not line.endswith(b"\n"):
                break
        self._malformed("the chunked body does not end")

    def _malformed(self, why: str) -> NoReturn:
        self.over = True
        raise HubRefusal(400, f"malformed chunked body: {why}")

    def drain(self, budget: int) -> bool:
        """Read and drop what is left if that is at most ``budget`` bytes -> whether the body is now
        read whole (else it is left, and the connection must close)."""
        if self.done:
            return True
        if self.over or (self.length is not None and self.length - self.read > budget):
            self.over = True
            return False
        start = self.read
        try:
            while not self.done and not self.over and self.read - start <= budget:
                self.take(1 << 16)
        except (HubRefusal, ConnectionAbortedError):
            return False
        self.over = not self.done
        return self.done


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


def _find_route(command: str, path: str) -> tuple[Route, dict[str, str]] | None:
    """The route answering ``command path`` and its path's named parts, None if there is none."""
    for r in ROUTES:
        if r.method == command or (r.method == "GET" and command == "HEAD"):
            m = r.pattern.fullmatch(path)
            if m:
                return r, {k: v for k, v in m.groupdict().items() if v is not None}
    return None


class Handler(BaseHTTPRequestHandler):
    """One request, HTTP only: read it, find its ``route``, call the method, write the answer (or
    the ``HubRefusal`` it raised). Repo state lives in ``self.store``, counters on ``self.hub``."""

    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms wait for a delayed ACK
    server: _HTTPServer
    reader: RequestBody

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    @property
    def store(self) -> Store:
        return self.server.hub.store

    def log_message(self, format, *args):  # quiet: tests read stats instead
        pass

    # --- request bodies ---------------------------------------------------------------------
    def _too_large(self, limit: int) -> HubRefusal:
        self.reader.over = True
        return HubRefusal(413, f"Payload Too Large: the request body is over {limit} bytes")

    def _blocks(self, limit: int, stall_after: int | None = None) -> Iterator[bytes]:
        """The body in blocks of 64 KiB, refused with 413 past ``limit`` bytes: before any is read
        when ``Content-Length`` says so, as soon as a chunked body passes it. ``stall_after``: hold
        the reading after that many bytes (``HubServer.stall``), then abort it."""
        body = self.reader
        if body.length is not None and body.length > limit:
            raise self._too_large(limit)
        while True:
            want = 1 << 16
            if stall_after is not None:
                want = min(want, stall_after - body.read)
                if want <= 0:
                    self.hub.stall()
                    body.over = True
                    raise ConnectionAbortedError("upload stalled by a fault")
            block = body.take(want)
            if not block:
                return
            if body.read > limit:
                raise self._too_large(limit)
            yield block

    def _body(self, limit: int | None = None) -> bytes:
        """The whole body (JSON, NDJSON), at most ``limit`` bytes (default the server's ``max_body``):
        a client cannot make the server hold more."""
        return b"".join(self._blocks(self.hub.max_body if limit is None else limit))

    def _body_blocks(self, oid: str, limit: int) -> Iterator[bytes]:
        """The body of an upload of ``oid``, at most ``limit`` bytes, counted in ``stats`` as it is
        stored. A stall fault on ``oid`` holds it after that many bytes, then aborts it
        (``ConnectionAbortedError``), as does a client that goes away."""
        hub = self.hub
        stall = hub.faults.get(oid)
        for block in self._blocks(limit, None if stall is None else stall["after"]):
            with hub.stats_lock:
                hub.stats["lfs_bytes"] += len(block)
                hub.stats["lfs_uploads"][oid] += len(block)
            yield block

    def _settle(self) -> bool:
        """Read what is left of the body if it is small (at most ``max_body``) -> whether the
        connection can carry the next request; if not, it is to close."""
        if self.reader.drain(self.hub.max_body):
            return True
        self.close_connection = True
        return False

    def _linger(self) -> None:
        """After answering a request whose body is left unread: stop writing, then read and drop
        what the client still sends for a moment, so that closing does not reset the connection
        under the answer before the client reads it."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(_LINGER_S)
            deadline, budget = time.monotonic() + _LINGER_S, self.hub.max_body
            while budget > 0 and time.monotonic() < deadline:
                got = self.connection.recv(1 << 16)
                if not got:
                    break
                budget -= len(got)
        except OSError:
            pass

    def _reset(self) -> None:
        """Close the connection with a TCP reset, answering nothing: a network failing mid-request."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.reader.over = True
        self.close_connection = True
        self._dropped = True
        self.server.resets.add(self.connection)

    # --- answers ----------------------------------------------------------------------------
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
        self._answered = True
        if not head and data:
            self.wfile.write(data)

    def _refuse(self, e: HubRefusal) -> None:
        """Answer ``e``, after reading what is left of a small body (the client then reads the answer,
        not a broken pipe); past that, the connection closes after the answer."""
        headers = {"X-Error-Message": e.message, **e.headers}
        if e.code:
            headers["X-Error-Code"] = e.code
        if not self._settle():
            headers["Connection"] = "close"
        self._send(e.status, {"error": e.message, **e.body}, headers, head=self.command == "HEAD")

    def _base(self) -> str:
        return f"http://{self.headers.get('Host')}"

    # --- dispatch ---------------------------------------------------------------------------
    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        found = _find_route(self.command, path)
        name = found[0].handler.__name__ if found else "unknown"
        self.hub.count(f"{self.command} {name}")
        self.reader = RequestBody(self.rfile, self.headers)
        self._answered = self._dropped = False
        try:
            if self.reader.error:
                raise HubRefusal(400, self.reader.error)
            if found is None:
                raise HubRefusal(404, f"no route {self.command} {path}")
            fault = self.hub.fault_for(name)
            if fault is None or not self._play(fault):
                self._handle(found[0], found[1], query)
        except HubRefusal as e:
            self._refuse(e)
        except (ValueError, KeyError, TypeError) as e:  # a body that is not what the API sends
            self._refuse(HubRefusal(400, f"malformed request: {type(e).__name__}: {e}"))
        self._finish_body()

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def _handle(self, r: Route, groups: dict[str, str], query: dict) -> None:
        """Call the route's method, once the token (if any) and the repo id are known good."""
        if "Authorization" in self.headers and not self._token_ok():
            self._need_write()  # as the Hub: a wrong token is refused on any route
        if "repo" in groups:
            check_repo_id(groups["repo"])
        r.handler(self, query=query, **groups)

    def _play(self, fault: Fault) -> bool:
        """Meet ``fault`` -> whether it took the request (answered or dropped it); False after a
        delay alone, and the request is then handled."""
        if fault.delay and self.hub.stopping.wait(fault.delay):
            self._reset()  # the server is stopping: nobody is to answer
            return True
        if fault.drop_after is not None:
            try:
                while self.reader.read < fault.drop_after and self.reader.take(fault.drop_after - self.reader.read):
                    pass
            except (HubRefusal, ConnectionAbortedError):
                pass
            self._reset()
            return True
        if fault.status is not None:
            headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
            self._refuse(HubRefusal(fault.status, f"{_phrase(fault.status)} (a fault the local Hub plays)",
                                    headers=headers))
            return True
        return False

    def _finish_body(self) -> None:
        """Leave the connection ready for the next request: a body left unread is read when small;
        else the connection closes, lingering if an answer was sent so that the client reads it."""
        if self._dropped or self._settle():
            return
        if self._answered:
            self._linger()

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
        repo = check_repo_id(f"{body.get('organization') or self.hub.user}/{body['name']}")
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
        sub = check_path(sub.strip("/")) if sub else None
        prefix = (sub + "/") if sub else ""
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
            check_path(f["path"])
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
            if not isinstance(o["size"], int) or not 0 <= o["size"] <= MAX_LFS_OBJECT:
                item["error"] = {"code": 422, "message": f"size must be a whole number of bytes up to {MAX_LFS_OBJECT}"}
            elif self.store.lfs_size(repo, o["oid"]) is None:
                self.store.announce(repo, o["oid"], o["size"])
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
        """A basic transfer: no larger than its batch request announced (or than the Hub takes)."""
        announced = self.store.announced(repo, oid)
        limit = MAX_LFS_OBJECT if announced is None else announced
        try:
            self.store.receive_lfs(repo, oid, self._body_blocks(oid, limit))
        except ConnectionAbortedError:
            self.reader.over = True
            self.close_connection = True
            return
        with self.hub.stats_lock:
            self.hub.stats["lfs_completed"].append(oid)
        self._send(200, b"", {"ETag": f'"{oid[:32]}"'})

    @route("PUT", rf"/__lfs/{REPO}/{OID}/part/(?P<part>\d+)")
    def lfs_part(self, query, repo, oid, part):
        """One part of a multipart transfer: no larger than the chunk size the batch answer gave."""
        try:
            etag = self.store.receive_part(repo, oid, int(part), self._body_blocks(oid, self.hub.multipart_chunk))
        except ConnectionAbortedError:
            self.reader.over = True
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
        check_path(file)
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
