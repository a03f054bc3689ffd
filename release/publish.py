"""Publishing to the Hugging Face Hub: plan, refuse what was not verified, push, resume.

``plan`` stages the exact file set of every repo in ``build/<release>/publish/<repo name>/``
(weights hard-linked, not copied), asks the remote what it already has (tree listing with LFS
sha256 oids) and prints what a push would add, change and delete. Nothing leaves the machine.

``push`` uploads each repo as one commit naming the release version, skipping unchanged files,
then tags every repo with ``hub.revision_tag``. An interrupted push is resumed by running it
again: the LFS batch API (or xet's deduplication, on endpoints that offer xet) does not send
objects the remote already holds.

Both refuse a weight file (``.safetensors``, ``.gguf``) that the verification manifest does not
list as passed with the same sha256 (an adapter: that its training stage's manifest lists). The
token comes from ``HF_TOKEN`` or the ``huggingface_hub`` login; it is never printed, logged or put
into an error message.

Each staged repo gets ``provenance.intoto.json`` (release/provenance.py) and, with a signing key
(``--signing-key`` or ``QALB_SIGNING_KEY``) or Sigstore, ``model.sig`` over every file and a
``<file>.sig`` beside each GGUF file (release/signing.py), made from the digests hashed here: a
push refuses an unsigned repo unless told ``--unsigned``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from release import provenance, signing
from release.artifacts import (
    MANIFEST,
    FileEntry,
    Manifest,
    Traits,
    fingerprint,
    human_bytes,
    input_digest,
    read_manifest,
    recorded_sha256,
    sha256_file,
    stage_dir,
    summary_console,
    toolchain,
    write_json,
)
from release.errors import PublishError
from release.spec import Spec

STAGE = "publish"
TRAITS = Traits(publishes=True)
PLAN = "plan.json"  # the stage's record: what a push sends, per repo
WEIGHTS = (".safetensors", ".gguf")
KEEP_REMOTE = (".gitattributes",)  # created by the Hub with the repo; never deleted by a push
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # a training stage's published files


@dataclass(frozen=True)
class LocalFile:
    path: str  # path in the repo
    source: Path  # the built file it comes from
    size: int
    sha256: str


@dataclass
class RepoPlan:
    repo: str
    variant: str  # a [variants] key, or the training stage of a published adapter (cpt, sft)
    folder: Path  # the staged file set
    files: dict[str, LocalFile]
    add: list[str] = field(default_factory=list)
    change: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    exists: bool = False
    remote_sha: str | None = None
    signer: str | None = None  # the signing key's fingerprint, "sigstore", or None: unsigned

    @property
    def upload_bytes(self) -> int:
        return sum(self.files[p].size for p in self.add + self.change)


@dataclass(frozen=True)
class PushResult:
    repo: str
    commit_url: str | None  # None: nothing changed, no commit made
    oid: str
    files: int
    bytes: int
    tag: str


# --- where things are ---------------------------------------------------------------------------


def endpoint(spec: Spec) -> str | None:
    """The Hub to talk to: the spec's URL, or for ``local`` the ``HF_ENDPOINT`` variable (None
    when unset: there is no remote to compare with)."""
    if spec.hub.endpoint == "local":
        return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    return spec.hub.endpoint.rstrip("/")


def repos(spec: Spec) -> dict[str, str]:
    """Every repo the release publishes: variant key (or training stage, for an adapter) -> repo id."""
    return {**{k: v.repo for k, v in spec.variants.items()}, **spec.adapter_repos()}


def sources(spec: Spec, feeds: Mapping[str, Path], name: str) -> dict[str, Path]:
    """Path in repo -> built file, for the repo of variant ``name`` (or adapter ``cpt``/``sft``);
    ``feeds``: the stage's inputs."""
    if name not in spec.variants:
        return _adapter_sources(spec, feeds, name)
    v = spec.variants[name]
    built, modelfiles = feeds[name], feeds["modelfiles"]
    out: dict[str, Path] = {}
    if v.format in ("safetensors", "bnb-4bit"):
        files = sorted(p for p in built.rglob("*") if p.is_file() and p.name != MANIFEST) if built.is_dir() else []
        if not any(p.suffix == ".safetensors" for p in files):
            raise PublishError(f"{built}: no model built for variant {name}; run ./inv release first")
        out.update({p.relative_to(built).as_posix(): p for p in files})
    else:
        for q in spec.gguf_types():
            out[spec.gguf_file_name(q)] = built / spec.gguf_file_name(q)
        mf = read_manifest(modelfiles)
        if mf is None:
            raise PublishError(f"{modelfiles}: no modelfiles manifest; run ./inv release (stage modelfiles) first")
        # every repo gets its LICENSE and NOTICE from the same place, below
        out.update({e.path: modelfiles / e.path for e in mf.outputs if e.path not in ("LICENSE", "NOTICE")})
    return _with_documents(spec, feeds, name, v.repo, out)


def _adapter_sources(spec: Spec, feeds: Mapping[str, Path], stage: str) -> dict[str, Path]:
    """An adapter repo: the training stage's adapter files."""
    built = feeds[stage]
    out = {f: built / f for f in ADAPTER_FILES}
    missing = [p for p in out.values() if not p.is_file()]
    if missing:
        raise PublishError(f"{missing[0]}: missing (the {stage} adapter, published as {spec.adapter_repos()[stage]}); "
                           f"run ./inv release (stage {stage}) first, or set hub.publish_adapters = false")
    return _with_documents(spec, feeds, stage, spec.adapter_repos()[stage], out)


def _with_documents(spec: Spec, feeds: Mapping[str, Path], name: str, repo: str,
                    out: dict[str, Path]) -> dict[str, Path]:
    # the cards stage's documents of this repo: README.md, the licence's NOTICE, the GGUF chart, the public key
    docs = feeds["cards"] / name
    out.update({p.name: p for p in sorted(docs.iterdir()) if p.is_file() and not p.name.startswith(".")}
               if docs.is_dir() else {})
    for path in ("README.md", "NOTICE"):
        out.setdefault(path, docs / path)  # missing: refused below, with the fix
    out["LICENSE"] = spec.resolve(spec.release.license_file)
    for path, src in out.items():
        if not src.is_file():
            fix = "run ./inv cards" if src.parent == docs else "build it first (./inv release)"
            raise PublishError(f"{src}: missing (needed as {path} in {repo}); {fix}")
    return out


# --- verification gate --------------------------------------------------------------------------


def check_adapters(spec: Spec, feeds: Mapping[str, Path], weights: dict[Path, str]) -> None:
    """Refuse an adapter file (path -> current sha256) whose bytes are not the ones its training
    stage's manifest records: the adapters are what the provenance names."""
    for stage in spec.adapter_repos():
        m = read_manifest(feeds[stage])
        recorded = {e.path: e.sha256 for e in m.outputs} if m else {}
        for path, sha in weights.items():
            if path.parent == feeds[stage] and recorded.get(path.name) != sha:
                raise PublishError(f"{path}: bytes differ from the {stage} stage's manifest; run ./inv release "
                                   "--check to rebuild it")


def check_verified(spec: Spec, feeds: Mapping[str, Path], weights: dict[Path, str]) -> None:
    """Refuse unless every weight file (path -> current sha256) is in the verification manifest
    (``feeds["verify"]``), passed, and has the same bytes; and the cards (``feeds["cards"]``) were
    written from that verification."""
    vdir = feeds["verify"]
    where = vdir / MANIFEST
    m = read_manifest(vdir)
    if m is None:
        raise PublishError(f"{where}: no verification manifest; run ./inv release --from verify before publishing")
    artifacts = m.figures.get("artifacts", {})
    for path, sha in weights.items():
        rel = path.relative_to(spec.build_dir).as_posix()
        a = artifacts.get(rel)
        if a is None:
            raise PublishError(f"{path}: not in the verification manifest {where}; run ./inv release --from verify")
        if not a.get("passed"):
            raise PublishError(f"{path}: failed verification (variant {a.get('variant')}"
                               f"{' ' + a['quant'] if a.get('quant') else ''}); "
                               "fix it and run ./inv release --from verify")
        if a.get("sha256") != sha:
            raise PublishError(f"{path}: bytes changed since verification (sha256 {sha[:12]}…, verified "
                               f"{str(a.get('sha256'))[:12]}…); run ./inv release --check to rebuild it from "
                               "its stage (a plain re-verify would approve the changed file)")
    if not m.figures.get("passed"):
        failed = sorted(k for k, v in m.figures.get("variants", {}).items() if not v.get("passed"))
        raise PublishError(f"{where}: verification failed ({', '.join(failed) or 'no variant passed'}); "
                           "fix the failing variants and run ./inv release --from verify")
    cards = read_manifest(feeds["cards"])
    if cards is not None and cards.inputs.get("verify") != sha256_file(where):
        raise PublishError(f"{feeds['cards']}: cards predate the current verification; run ./inv cards")


# --- staging ------------------------------------------------------------------------------------


def _link(src: Path, dst: Path) -> None:
    """Hard link (weights are GBs); copy where linking is impossible (another file system)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stage(spec: Spec, name: str, files: dict[str, Path]) -> RepoPlan:
    """Link ``files`` into ``publish/.<repo name>.partial/`` and hash them there: what is hashed (and
    checked against the verification) is the very inode that will be uploaded. ``commit_stage``
    swaps the folder in."""
    repo = repos(spec)[name]
    repo_dir = stage_dir(spec.build_dir, STAGE) / repo.split("/")[-1]
    partial = repo_dir.with_name(f".{repo_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    local = {}
    for path, src in sorted(files.items()):
        _link(src, partial / path)
        local[path] = LocalFile(path, src, (partial / path).stat().st_size, "")
    return RepoPlan(repo, name, partial, local)


def commit_stage(p: RepoPlan) -> None:
    """Replace ``publish/<repo name>/`` by the staged partial folder."""
    folder = p.folder.with_name(p.folder.name.removeprefix(".").removesuffix(".partial"))
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(p.folder, folder)
    shutil.rmtree(old, ignore_errors=True)
    p.folder = folder


# --- talking to the Hub -------------------------------------------------------------------------


def token() -> str | None:
    """``HF_TOKEN`` or the token saved by ``hf auth login``."""
    from huggingface_hub import get_token

    return get_token()


def _scrub(text: str, secret: str | None) -> str:
    line = " ".join(str(text).split())
    return line.replace(secret, "***") if secret else line


@contextlib.contextmanager
def _hub_errors(what: str, secret: str | None, url: str | None = None) -> Iterator[None]:
    """Turn the client's errors (HTTP answers, the network, offline mode, an id it refuses) into
    one line that names the operation, the endpoint and what to do, and never the token; anything
    else is a bug and keeps its traceback. The client's exception is chained (``from e``) for
    debugging; tasks print only the line."""
    import httpx
    from huggingface_hub.errors import HFValidationError

    expected = (httpx.HTTPError, OSError, HFValidationError)
    try:
        yield
    except expected + (RuntimeError,) as e:
        # huggingface_hub wraps an LFS upload's failure: RuntimeError("Error while uploading ...") from it
        cause = e.__cause__ if isinstance(e, RuntimeError) else e
        if not isinstance(cause, expected):
            raise
        where = f" ({url})" if url else ""
        todo = f"; {RESUME}" if transient(cause) else ""
        raise PublishError(_scrub(f"{what}{where}: {type(cause).__name__}: {_explain(cause)}{todo}", secret)) from e


RESUME = ("the Hub did not answer after retries with backoff; run the same command again to resume (each repo "
          "shows whole commits only; what the Hub holds is not sent again, and the release tag is set once every "
          "repo is committed)")
TRANSIENT = (408, 429, 500, 502, 503, 504)  # huggingface_hub's http_backoff retries these
RETRIES = 5  # and its schedule: 1, 2, 4, 8, 8 s, or the server's Retry-After


def transient(e: BaseException) -> bool:
    """An error worth retrying: a timeout, a dropped connection, 408, 429 or 5xx."""
    import httpx

    status = getattr(getattr(e, "response", None), "status_code", None)
    return status in TRANSIENT or isinstance(e, (httpx.TimeoutException, httpx.NetworkError,
                                                 httpx.RemoteProtocolError))


def _retrying(call, *, tries: int = RETRIES + 1):
    """``call()``, retried on transient errors as huggingface_hub's ``http_backoff`` retries the
    requests it makes itself (uploads, LFS batch, preupload): for the API calls it does not retry
    (create repo, tree, refs, tags, the commit)."""
    wait = 1.0
    for attempt in range(1, tries + 1):
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - only transient errors are retried; the rest re-raise at once
            if attempt == tries or not transient(e):
                raise
            after = getattr(getattr(e, "response", None), "headers", {}).get("Retry-After", "")
            time.sleep(float(after) + 1 if after.isdigit() else wait)  # +1 s, as huggingface_hub does
            wait = min(8.0, wait * 2)


def timeout_seconds() -> float:
    """How long a push waits for the server: ``HF_HUB_DOWNLOAD_TIMEOUT`` (huggingface_hub's own
    setting, its default timeout for requests) when set, else 60 s, as the Hub's commit endpoint
    may take a while on large commits."""
    value = os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT", "")
    try:
        return float(value) if value else 60.0
    except ValueError:
        return 60.0


def _with_timeout(seconds: float) -> None:
    """Make huggingface_hub's shared client give up on a server silent for ``seconds``; its own
    default waits forever. A timeout is then retried like a dropped connection."""
    import httpx
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http  # its default client: event hooks, redirects

    def factory() -> httpx.Client:
        client = _http.default_client_factory()
        client.timeout = httpx.Timeout(seconds, connect=min(seconds, 10.0))
        return client

    set_client_factory(factory)


def _explain(e: Exception) -> str:
    """The first line of the error, the server's own explanation (huggingface_hub keeps it in
    ``server_message``; the first line is only the status) and, for 401/403, what to check."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    server = " ".join(str(getattr(e, "server_message", None) or "").split())
    if server and server not in first:
        first = f"{first} ({server})" if first else server
    status = getattr(getattr(e, "response", None), "status_code", None)
    hint = "; check the token (HF_TOKEN or `hf auth login`) and its write access" if status in (401, 403) else ""
    return first + hint


def _api(url: str, secret: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=url, token=secret or False, library_name=toolchain())


def compare(plan: RepoPlan, api, secret: str | None) -> RepoPlan:
    """Fill ``add``/``change``/``delete``/``unchanged`` from the remote's tree on ``main``."""
    from huggingface_hub import RepoFile
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils.sha import git_hash

    remote: dict[str, RepoFile] = {}
    with _hub_errors(f"{plan.repo}: listing the remote files", secret, api.endpoint):
        try:
            info = _retrying(lambda: api.repo_info(plan.repo))
            plan.exists, plan.remote_sha = True, info.sha
            remote = _retrying(lambda: {f.path: f for f in api.list_repo_tree(plan.repo, recursive=True,
                                                                               revision=info.sha)
                                        if isinstance(f, RepoFile)})
        except (RepositoryNotFoundError, RevisionNotFoundError):
            plan.exists, plan.remote_sha = False, None
    plan.add, plan.change, plan.unchanged = [], [], []
    for path, f in plan.files.items():
        r = remote.get(path)
        if r is None:
            plan.add.append(path)
        elif (r.lfs.sha256 == f.sha256) if r.lfs else (r.blob_id == git_hash((plan.folder / path).read_bytes())):
            plan.unchanged.append(path)
        else:
            plan.change.append(path)
    plan.delete = sorted(p for p in remote if p not in plan.files and p not in KEEP_REMOTE)
    return plan


def plan(spec: Spec, inputs: Mapping[str, Path], *, console: Console | None = None,
         progress: bool = True) -> list[RepoPlan]:
    """Stage every repo, refuse unverified weights, compare with the remote, print the table.
    ``inputs``: the ``verify``, ``cards`` and ``modelfiles`` folders and each variant's folder
    by its ``[variants]`` key."""
    console = console or summary_console()
    found = {n: sources(spec, inputs, n) for n in repos(spec)}
    plans = [stage(spec, n, files) for n, files in found.items()]
    url = endpoint(spec)
    _hash_and_check(spec, inputs, plans, console, progress, url)
    secret = token()
    if url is None:
        console.print("hub.endpoint is 'local' and HF_ENDPOINT is not set: compared with an empty remote "
                      "(nothing was contacted)")
        for p in plans:
            p.add, p.change, p.delete, p.unchanged = sorted(p.files), [], [], []
    else:
        api = _api(url, secret)
        plans = [compare(p, api, secret) for p in plans]
    write_json(stage_dir(spec.build_dir, STAGE) / PLAN, {
        "release": spec.release.name, "version": spec.release.version, "endpoint": url,
        "repos": {p.repo: {"variant": p.variant, "folder": p.folder.name, "exists": p.exists,
                           "remote_sha": p.remote_sha, "add": p.add, "change": p.change, "delete": p.delete,
                           "unchanged": p.unchanged, "upload_bytes": p.upload_bytes, "signer": p.signer,
                           "files": {f.path: {"size": f.size, "sha256": f.sha256, "source": str(f.source)}
                                     for f in p.files.values()}}
                  for p in plans}})
    console.print(plan_table(spec, plans, url))
    return plans


def read_plans(spec: Spec) -> list[RepoPlan]:
    """The plans the last ``plan`` wrote (``publish/plan.json``), so a push right after it sends what
    was hashed and checked without hashing the release again."""
    path = stage_dir(spec.build_dir, STAGE) / PLAN
    try:
        repos = json.loads(path.read_text(encoding="utf-8"))["repos"]
        return [RepoPlan(repo, r["variant"], stage_dir(spec.build_dir, STAGE) / r["folder"],
                         {p: LocalFile(p, Path(f["source"]), f["size"], f["sha256"]) for p, f in r["files"].items()},
                         r["add"], r["change"], r["delete"], r["unchanged"], r["exists"], r["remote_sha"],
                         r.get("signer"))
                for repo, r in repos.items()]
    except (OSError, ValueError, KeyError) as e:
        raise PublishError(f"{path}: no readable Hub plan ({type(e).__name__}); "
                           "run ./inv publish to plan again") from None


def run(spec: Spec, inputs: Mapping[str, Path], *, force: bool = False, progress: bool = True) -> Manifest:
    """Stage ``publish``: plan the upload (``plan``); ``push`` sends it. Always run: the remote may
    have changed. Its record is ``publish/plan.json``; the manifest returned lists the staged
    files."""
    start = time.perf_counter()
    found = dict(inputs)
    plans = plan(spec, inputs, progress=progress)
    outputs = [FileEntry(f"{p.folder.name}/{f.path}", f.size, f.sha256) for p in plans for f in p.files.values()]
    digests = {k: input_digest(v) for k, v in found.items() if Path(v).exists()}
    return Manifest(STAGE, spec.release.name, fingerprint(digests, {}, {}), digests, {}, {}, outputs,
                    {"planned": len(plans), "upload_bytes": sum(p.upload_bytes for p in plans)},
                    round(time.perf_counter() - start, 3), built=True)


def _hash_and_check(spec: Spec, feeds: Mapping[str, Path], plans: list[RepoPlan], console: Console,
                    progress: bool, url: str | None = None) -> None:
    """Hash the staged files and refuse unverified weights; add each repo's provenance and sign
    it when a key is given; then swap the staging in."""
    try:
        with _progress(console, progress) as bar:
            task = bar.add_task("sha256", total=sum(f.size for p in plans for f in p.files.values()))
            for p in plans:
                for path, f in p.files.items():
                    bar.update(task, description=f"sha256 {path}")
                    p.files[path] = replace(f, sha256=_digest(spec, f.source, p.folder / path))
                    bar.advance(task, f.size)
            bar.update(task, description=f"sha256 of {sum(len(p.files) for p in plans)} files")
        adapters = {p.variant for p in plans if p.variant not in spec.variants}
        weights = {f.source: f.sha256 for p in plans for f in p.files.values() if f.source.suffix in WEIGHTS}
        check_verified(spec, feeds, {k: v for k, v in weights.items()
                                     if not any(k.parent == feeds[a] for a in adapters)})
        check_adapters(spec, feeds, weights)
        key = signing.from_environment()
        deps = provenance.dependencies(spec, feeds, url) if all(k in feeds for k in provenance.FEEDS) else []
        for p in plans:
            _provenance(spec, feeds, p, deps)
            if key is not None:
                _sign(spec, feeds, p, key)
    except BaseException:
        for p in plans:
            shutil.rmtree(p.folder, ignore_errors=True)
        raise
    for p in plans:
        commit_stage(p)


def _digest(spec: Spec, source: Path, staged: Path) -> str:
    """sha256 of a staged file: its stage's manifest's, when the staged file is a hard link to the
    built file and that is as its stage wrote it (the rule that skips a built stage; ``./inv
    release --check`` hashes everything); else hashed here."""
    try:
        linked = os.path.samefile(source, staged)
    except OSError:
        linked = False
    return (recorded_sha256(source, spec.build_dir) if linked else None) or sha256_file(staged)


def _add(p: RepoPlan, path: str) -> None:
    """A file written into the staged folder itself (provenance, signatures), hashed."""
    f = p.folder / path
    p.files[path] = LocalFile(path, f, f.stat().st_size, sha256_file(f))


def _provenance(spec: Spec, feeds: Mapping[str, Path], p: RepoPlan, deps: list[dict]) -> None:
    """``provenance.intoto.json``: the repo's weight files as subjects, the release's inputs."""
    from release.artifacts import write_text

    subjects = {path: f.sha256 for path, f in p.files.items() if Path(path).suffix in WEIGHTS}
    verification = feeds["verify"] / "verification.json" if "verify" in feeds else None
    write_text(p.folder / signing.PROVENANCE,
               provenance.dumps(provenance.statement(spec, p.repo, subjects, provenance.for_repo(deps, p.variant),
                                                     verification)))
    _add(p, signing.PROVENANCE)


def _sign(spec: Spec, feeds: Mapping[str, Path], p: RepoPlan, key) -> None:
    """``<file>.sig`` for each GGUF file, then ``model.sig`` over every file of the repo."""
    if isinstance(key, signing.Key):
        pub = p.folder / signing.PUBLIC_KEY
        if not pub.is_file() or pub.read_bytes() != key.public_pem:
            raise PublishError(f"{feeds['cards'] / p.variant / signing.PUBLIC_KEY}: the cards were written for "
                               f"{'another signing key' if pub.is_file() else 'no signing key'}, "
                               f"not {key.fingerprint}; "
                               "run ./inv cards with the same key (--signing-key or QALB_SIGNING_KEY)")
    for path in sorted(x for x in p.files if x.endswith(".gguf")):
        sig = path + signing.FILE_SIGNATURE
        signing.sign(p.folder / sig, Path(path).name, {".": p.files[path].sha256}, key)
        _add(p, sig)
    signing.sign(p.folder / signing.SIGNATURE, p.repo.split("/")[-1],
                 {path: f.sha256 for path, f in p.files.items()}, key)
    _add(p, signing.SIGNATURE)
    p.signer = key.fingerprint if isinstance(key, signing.Key) else "sigstore"


def plan_table(spec: Spec, plans: list[RepoPlan], url: str | None) -> Table:
    t = Table(title=f"{spec.release.name} {spec.release.version} → {url or 'empty remote'}")
    for col in ("repo", "files", "add", "change", "delete", "unchanged", "to upload"):
        t.add_column(col, justify="left" if col == "repo" else "right")
    for p in plans:
        t.add_row(p.repo + ("" if p.exists else " (new)"), str(len(p.files)), str(len(p.add)), str(len(p.change)),
                  str(len(p.delete)), str(len(p.unchanged)), human_bytes(p.upload_bytes))
    return t


@contextlib.contextmanager
def _lfs_only(enabled: bool) -> Iterator[None]:
    """Upload through the LFS batch API instead of xet. huggingface_hub uses xet whenever hf_xet is
    installed; an endpoint without xet (a local or self-hosted Hub) needs the LFS path, which
    ``HF_HUB_DISABLE_XET`` selects (read at call time from ``constants``)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_DISABLE_XET
    constants.HF_HUB_DISABLE_XET = before or enabled
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_XET = before


def offers_xet(api, repo: str) -> bool:
    """Whether the endpoint hands out xet write tokens for ``repo`` (the Hub does)."""
    from huggingface_hub.utils import build_hf_headers, get_session

    r = get_session().get(f"{api.endpoint}/api/models/{repo}/xet-write-token/main",
                          headers=build_hf_headers(token=api.token, library_name=api.library_name))
    return r.status_code == 200


def push(spec: Spec, plans: list[RepoPlan], *, console: Console | None = None,
         progress: bool = True, unsigned: bool = False) -> list[PushResult]:
    """Upload each planned repo (``plan``, or ``read_plans`` after the stage ran) as one commit;
    once every repo has its commit, tag them all. The caller prints ``push_table(spec, results)``.

    What a push cut short leaves: whole commits only (a commit is atomic on the Hub), some repos
    with the release's commit and the others without, and the tag on none, so nothing names a
    half-published release. Its LFS objects already sent stay on the Hub. Re-running plans again
    from what the Hub holds, sends only the missing files and commits, then tags every repo.
    Transient errors are retried with backoff (huggingface_hub's for uploads; ``_retrying`` for
    the calls it does not retry); the commit names the parent it was planned on, so a commit
    whose answer was lost is not made twice."""
    console = console or summary_console()
    bare = [p for p in plans if signing.SIGNATURE not in p.files]
    if bare and not unsigned:
        raise PublishError(f"{bare[0].folder}: not signed ({len(bare)} of {len(plans)} repos without "
                           f"{signing.SIGNATURE}); "
                           f"sign with --signing-key KEY or {signing.ENV_KEY} (./inv keygen --out KEY makes one) and "
                           "run again, or publish unsigned with --unsigned")
    url = endpoint(spec)
    if url is None:
        raise PublishError(f"{spec.path}: hub.endpoint is 'local' and HF_ENDPOINT is not set; start a local Hub "
                           "(./inv hub.serve --root DIR) and set HF_ENDPOINT to its URL")
    secret = token()
    if not secret:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    _with_timeout(timeout_seconds())
    api = _api(url, secret)
    message = f"{spec.release.name} {spec.release.version}"
    tag = spec.hub.revision_tag
    committed = []
    disable_progress_bars()  # one rich bar per file instead of tqdm's
    try:
        with _progress(console, progress) as bar:
            for p in plans:
                committed.append(_commit_repo(api, p, message, secret, bar, private=spec.hub.private))
        for r in committed:  # every repo has its commit: now the release tag, on each
            with _hub_errors(f"{r.repo}: tagging {tag}", secret, url):
                _retrying(lambda r=r: _move_tag(api, r.repo, tag, r.oid, message))
    finally:
        enable_progress_bars()
    return [replace(r, tag=tag) for r in committed]


def _commit_repo(api, p: RepoPlan, message: str, secret: str | None, bar: Progress, *,
                 private: bool) -> PushResult:
    """Create ``p.repo`` if needed, upload its new and changed files, and commit them at once."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    url = api.endpoint
    with _hub_errors(f"{p.repo}: creating the repo", secret, url):
        _retrying(lambda: api.create_repo(p.repo, private=private, exist_ok=True))
    with _hub_errors(f"{p.repo}: checking xet support", secret, url):
        xet = _retrying(lambda: offers_xet(api, p.repo))
        parent = p.remote_sha if p.exists else _retrying(lambda: api.repo_info(p.repo)).sha
    adds = []
    for path in p.add + p.change:
        op = CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(p.folder / path))
        op.upload_info.sha256 = bytes.fromhex(p.files[path].sha256)  # hashed once, in plan
        adds.append(op)
    deletes = [CommitOperationDelete(path_in_repo=d) for d in p.delete]
    task = bar.add_task(p.repo, total=p.upload_bytes)
    with _lfs_only(not xet):
        for op in adds:  # one file at a time: progress per file; finished files stay uploaded
            bar.update(task, description=f"{p.repo.split('/')[-1]}/{op.path_in_repo}")
            with _hub_errors(f"{p.repo}: uploading {op.path_in_repo}", secret, url):
                api.preupload_lfs_files(p.repo, additions=[op])  # retried by huggingface_hub
            bar.advance(task, op.upload_info.size)
        commit_url, oid = None, p.remote_sha or parent or ""
        if adds or deletes:
            with _hub_errors(f"{p.repo}: committing", secret, url):
                commit_url, oid = _commit_once(api, p, adds + deletes, parent, message, len(adds), secret)
    bar.update(task, completed=p.upload_bytes, description=p.repo)
    return PushResult(p.repo, commit_url, oid, len(adds), p.upload_bytes, "")


def _commit_once(api, p: RepoPlan, ops: list, parent: str | None, message: str, files: int,
                 secret: str | None) -> tuple[str | None, str]:
    """The commit of ``ops`` on ``parent``, retried on transient errors. A retry refused because
    the branch moved (412) is the first attempt having landed when its answer was lost: it is
    taken as done when the remote now holds exactly the planned files."""
    from huggingface_hub.errors import HfHubHTTPError

    attempts = [0]

    def commit():
        attempts[0] += 1
        try:
            info = api.create_commit(p.repo, ops, commit_message=message, parent_commit=parent,
                                     commit_description=f"{message}: {files} files added or changed, "
                                     f"{len(p.delete)} deleted.")
            return info.commit_url, info.oid
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if attempts[0] > 1 and status in (409, 412):
                again = compare(replace(p), api, secret)
                if not (again.add or again.change or again.delete):
                    return None, again.remote_sha or ""
            raise

    return _retrying(commit)


def _move_tag(api, repo: str, tag: str, oid: str, message: str) -> None:
    """Point ``tag`` at ``oid``: create it, or move it if it names another commit."""
    from huggingface_hub.errors import HfHubHTTPError

    refs = api.list_repo_refs(repo)
    current = next((t.target_commit for t in refs.tags if t.name == tag), None)
    if current == oid:
        return
    if current is not None:
        api.delete_tag(repo, tag=tag)
    try:
        api.create_tag(repo, tag=tag, revision=oid, tag_message=message)
    except HfHubHTTPError as e:
        if e.response is None or e.response.status_code != 409:
            raise


def push_table(spec: Spec, results: list[PushResult]) -> Table:
    t = Table(title=f"Published {spec.release.name} {spec.release.version}")
    for col in ("repo", "files sent", "bytes", "tag", "commit"):
        t.add_column(col, justify="right" if col in ("files sent", "bytes") else "left",
                     overflow="fold" if col == "commit" else "ellipsis")
    for r in results:
        t.add_row(r.repo, str(r.files), human_bytes(r.bytes), r.tag, r.commit_url or f"unchanged ({r.oid[:12]})")
    return t


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                    console=console, disable=not enabled, transient=False)
