"""Checking a published repo as a downloader would: ``./inv check REPO [--revision R] [--file F] [--key PUB]``.

For a repo on the Hub (downloaded into the Hugging Face cache) or a local folder:
- the signature (``model.sig``, or ``<file>.sig`` with ``--file``) verifies with the key;
- every file's sha256 is the one signed, and no file was added or removed;
- the provenance (``provenance.intoto.json``, itself signed) names exactly the weight files as
  its subjects, with their sha256;
- the adapters it names (and a base downloaded from the Hub) are the bytes their repos hold at
  the recorded revision.

Each failure is one line; the table shows file, digest, signer and what it was built from.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from release import provenance, signing
from release.artifacts import sha256_file
from release.errors import ReleaseError

WEIGHTS = (".safetensors", ".gguf")


class CheckError(ReleaseError):
    """The repo could not be checked at all (not found, nothing signed to check against)."""


@dataclass
class Row:
    file: str
    ok: bool
    signer: str
    built_from: str


@dataclass
class Report:
    repo: str
    folder: Path
    rows: list[Row] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def fetch(repo: str, revision: str | None = None, file: str | None = None) -> Path:
    """A local folder as it is; a Hub repo downloaded (at ``revision``) into the Hugging Face cache:
    every file, or with ``file`` that file, its signature, the provenance, model.sig and the key."""
    local = Path(repo)
    if local.is_dir():
        return local
    import httpx
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = None
    if file:
        patterns = [file, file + signing.FILE_SIGNATURE, signing.SIGNATURE, signing.PROVENANCE, signing.PUBLIC_KEY]
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except (httpx.HTTPError, OSError, HFValidationError) as e:
        raise CheckError(f"{repo}: cannot download{f' revision {revision}' if revision else ''} "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:160]}); check the repo id, the "
                         "revision and HF_ENDPOINT/HF_TOKEN") from None


def _files(folder: Path) -> Iterator[str]:
    """The repo's files (symlinks into the cache count as files), minus what signatures ignore."""
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if rel.parts[0] in signing.IGNORED or not p.is_file():
            continue
        yield rel.as_posix()


def check(repo: str, *, revision: str | None = None, file: str | None = None, key: Path | None = None,
          identity: str | None = None, issuer: str | None = None, adapters: bool = True) -> Report:
    """Check ``repo`` (a Hub id or a folder); see the module's docstring."""
    folder = fetch(repo, revision, file)
    report = Report(repo, folder)
    if key is None and identity is None:
        key = folder / signing.PUBLIC_KEY
        if not key.is_file():
            raise CheckError(f"{repo}: no {signing.PUBLIC_KEY} and no --key; pass the maintainers' public key "
                             "with --key PUB (or --identity/--issuer for a Sigstore signature)")
        report.notes.append(f"checked with the repo's own key {signing.key_fingerprint(key)}: compare it "
                            "with the fingerprint the maintainers publish, or pass --key")
    sig = folder / signing.SIGNATURE
    if not sig.is_file():
        raise CheckError(f"{repo}: no {signing.SIGNATURE}: the repo is not signed")
    try:
        signed = signing.verify(sig, public_key=key, identity=identity, issuer=issuer)
    except signing.SigningError as e:
        report.failures.append(str(e))
        return report
    signer = signed.signer[:19] + "…" if signed.signer.startswith("sha256:") else signed.signer
    present = set(_files(folder))
    digests: dict[str, str] = {}
    if file is None:
        for path in sorted(present - set(signed.digests)):
            report.failures.append(f"{path}: not covered by {signing.SIGNATURE} (added after signing)")
        for path in sorted(set(signed.digests) - present):
            report.failures.append(f"{path}: signed in {signing.SIGNATURE} but missing")
        wanted = sorted(present & set(signed.digests))
    else:
        wanted = [p for p in (file, signing.PROVENANCE) if p in present]
        if file not in present:
            report.failures.append(f"{file}: not in {repo}")
    for path in wanted:
        digests[path] = sha256_file((folder / path).resolve())
        ok = digests[path] == signed.digests.get(path)
        if not ok:
            report.failures.append(f"{path}: sha256 {digests[path][:12]}… differs from the signed "
                                   f"{str(signed.digests.get(path))[:12]}… (changed since it was signed)")
    if file is not None and file in present:  # the file's own signature, as a downloader of it alone checks
        try:
            alone = signing.verify(folder / (file + signing.FILE_SIGNATURE), public_key=key, identity=identity,
                                   issuer=issuer)
            if alone.digests.get(".") != digests.get(file):
                report.failures.append(f"{file}: sha256 differs from {file}{signing.FILE_SIGNATURE}")
        except signing.SigningError as e:
            report.failures.append(str(e))
    failed = {p for p in [*signed.digests, *present] if any(f.startswith(f"{p}: ") for f in report.failures)}
    built = _provenance(report, folder, digests, file, adapters=adapters, failed=failed)
    for path in wanted:
        ok = digests[path] == signed.digests.get(path)
        report.rows.append(Row(path, ok, signer, built if Path(path).suffix in WEIGHTS else ""))
    return report


def _provenance(report: Report, folder: Path, digests: dict[str, str], file: str | None, *, adapters: bool,
                failed: set[str]) -> str:
    """Check the provenance's subjects (and adapters); return a short 'built from'. A file already
    reported (``failed``) is not reported again."""
    path = folder / signing.PROVENANCE
    if not path.is_file():
        report.failures.append(f"{signing.PROVENANCE}: missing")
        return ""
    try:
        st = provenance.read(path)
        subjects = {s["name"]: s["digest"]["sha256"] for s in st["subject"]}
        deps = st["predicate"]["buildDefinition"]["resolvedDependencies"]
    except (ValueError, KeyError, TypeError) as e:
        report.failures.append(f"{signing.PROVENANCE}: not an in-toto SLSA statement ({type(e).__name__})")
        return ""
    weights = {p: d for p, d in digests.items() if Path(p).suffix in WEIGHTS and p not in failed}
    for p, d in sorted(weights.items()):
        if p not in subjects:
            report.failures.append(f"{p}: not a subject of {signing.PROVENANCE}")
        elif subjects[p] != d:
            report.failures.append(f"{p}: sha256 differs from its subject in {signing.PROVENANCE}")
    if file is None:
        for p in sorted(set(subjects) - set(weights) - failed):
            report.failures.append(f"{signing.PROVENANCE}: names subject {p}, which the repo does not hold")
    if adapters:
        _adapters(report, deps)
    base = next((d for d in deps if d["name"].startswith("base/")), None)
    ann = (base or {}).get("annotations", {})
    origin = ann.get("model", "?") + (f"@{str(ann['revision'])[:12]}" if ann.get("revision") else
                                       " (scaffold)" if ann.get("built_by") else "")
    n = sum(1 for d in deps if d["name"].startswith(provenance.ADAPTERS) and d["name"].endswith(".safetensors"))
    return f"{origin} + {n} adapter{'s' * (n != 1)}"


def _adapters(report: Report, deps: list[dict]) -> None:
    """Each adapter file (and each file of a base downloaded from the Hub) the provenance names
    must be what its repo holds at that revision: the sha256 the Hub records for an LFS file, or
    the bytes of a small one."""
    import httpx
    from huggingface_hub import HfApi, RepoFile, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    trees: dict[tuple[str, str], dict[str, RepoFile]] = {}
    for d in deps:
        ann = d.get("annotations", {})
        repo = ann.get("repo") or (ann.get("model") if ann.get("revision") else None)  # an adapter, or a Hub base
        uri = d.get("uri", "")
        if not repo or "/resolve/" not in uri:
            continue
        rev, _, path = uri.split("/resolve/", 1)[1].partition("/")
        try:
            if (repo, rev) not in trees:
                trees[repo, rev] = {f.path: f for f in api.list_repo_tree(repo, revision=rev, recursive=True)
                                    if isinstance(f, RepoFile)}
            f = trees[repo, rev].get(path)
            held = (f.lfs.sha256 if f.lfs else sha256_file(Path(hf_hub_download(repo, path, revision=rev))))\
                if f is not None else None
        except (httpx.HTTPError, OSError, HfHubHTTPError) as e:
            report.failures.append(f"{signing.PROVENANCE}: names {d['name']} from {repo}@{rev}, which cannot be "
                                   f"read ({type(e).__name__}: {' '.join(str(e).split())[:120]})")
            continue
        if held != d["digest"]["sha256"]:
            report.failures.append(f"{signing.PROVENANCE}: names {d['name']} sha256 {d['digest']['sha256'][:12]}…, but "
                                   f"{repo}@{rev} holds {str(held)[:12]}… (built from other inputs than published)")
