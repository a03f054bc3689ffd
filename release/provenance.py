"""Where a published repo's files came from: an in-toto statement with the SLSA provenance v1
predicate (https://slsa.dev/provenance/v1), written as ``provenance.intoto.json`` in every repo
and covered by its ``model.sig``.

- subjects: the repo's weight files with their sha256;
- resolved dependencies: the base model (Hub id, revision, each file's sha256), the adapters
  (their repos and files), the release spec, the curated data (the data stage's outputs) and the
  importance matrix's calibration text;
- builder: this toolchain (name, version, the git commit of a checkout) and the libraries and
  llama.cpp build that shape the bytes; the thread counts, which may;
- byproducts: the verification record (``verify/verification.json``) by its digest.

Everything comes from the stages' manifests and the spec: nothing is hashed again. The
statement holds no time or host, so the same build gives the same bytes, except for the
verification record's digest: that record keeps how long each measurement took.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from release.artifacts import read_manifest, sha256_file, tool_versions, toolchain
from release.spec import Spec

STATEMENT = "https://in-toto.io/Statement/v1"
PREDICATE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:qalb-release:buildtype:repo:v1"  # a release repo; `externalParameters` name spec and repo
LIBRARIES = ("torch", "transformers", "peft", "safetensors", "bitsandbytes", "gguf", "llama-cpp-python",
             "huggingface_hub", "model-signing")
ADAPTERS = ("cpt", "sft")  # the training stages whose adapters are published, in merge order
FEEDS = ("base", "data", *ADAPTERS)  # the stage folders ``dependencies`` reads
DATA_RECORDS = ("report.json",)  # the data stage's record of the curation (with its timings), not data


def git_commit(root: Path | None = None) -> dict[str, object] | None:
    """The checkout's commit and whether tracked files differ from it; None outside a checkout."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": bool(dirty)}


def threads() -> dict[str, int]:
    """The thread counts a build ran with: torch's (merge, bnb4) and llama.cpp's (imatrix, quants).
    The stages are written to give the same bytes at any count (release/gguf.py, docs/release.md);
    they are recorded so that a difference can be traced."""
    import torch

    return {"torch": torch.get_num_threads(), "llama.cpp": len(os.sched_getaffinity(0))}


def builder() -> dict:
    """SLSA ``runDetails.builder``: this toolchain, its commit and the libraries beneath it."""
    name = toolchain()
    versions = tool_versions(name, *LIBRARIES)
    git = git_commit()
    out: dict = {"id": f"urn:{name}", "version": versions}
    if git is not None:
        out["version"] = {**versions, "git": git["commit"] + ("-dirty" if git["dirty"] else "")}
    return out


def _file(name: str, sha256: str, uri: str | None = None, **annotations: object) -> dict:
    d: dict = {"name": name, "digest": {"sha256": sha256}}
    if uri:
        d["uri"] = uri
    if annotations:
        d["annotations"] = annotations
    return d


def adapter_repo(spec: Spec, stage: str) -> str | None:
    """The repo a training stage's adapter is published in (None when the spec does not publish
    adapters)."""
    return spec.adapter_repos().get(stage)


def for_repo(deps: list[dict], name: str) -> list[dict]:
    """The dependencies of the repo of ``name`` (a variant key, or ``cpt``/``sft`` for an adapter):
    an adapter was built from the base, the data, the spec and the adapters before it."""
    if name not in ADAPTERS:
        return deps
    later = ADAPTERS[ADAPTERS.index(name):]
    return [d for d in deps if not d["name"].startswith(tuple(f"{s}/" for s in later))
            and not d.get("annotations", {}).get("calibration")]


def dependencies(spec: Spec, feeds: Mapping[str, Path], endpoint: str | None) -> list[dict]:
    """SLSA ``resolvedDependencies`` from the stages' records. ``feeds``: the ``base``, ``data``,
    ``cpt`` and ``sft`` stage folders."""
    hub = (endpoint or "https://huggingface.co").rstrip("/")
    deps: list[dict] = []
    base = feeds["base"]
    source = base / "source.json"
    if source.is_file():  # a local copy or a Hub download, recorded with each weight file's sha256
        rec = json.loads(source.read_text(encoding="utf-8"))
        rev = rec.get("revision")
        for path, sha in sorted(rec["sha256"].items()):
            uri = f"{hub}/{spec.base.model}/resolve/{rev}/{path}" if rev else None
            deps.append(_file(f"base/{path}", sha, uri, model=spec.base.model, revision=rev))
    else:  # built here by the scaffold kit (the demo): its files as recorded in the base manifest
        m = read_manifest(base)
        for e in m.outputs if m else []:
            deps.append(_file(f"base/{e.path}", e.sha256, None, model=spec.base.model, built_by="scaffold"))
    repos = spec.adapter_repos()
    for stage in ADAPTERS:
        m = read_manifest(feeds[stage])
        repo = repos.get(stage)
        for e in m.outputs if m else []:
            if e.path.startswith("adapter_"):
                uri = f"{hub}/{repo}/resolve/{spec.hub.revision_tag}/{e.path}" if repo else None
                deps.append(_file(f"{stage}/{e.path}", e.sha256, uri, **({"repo": repo} if repo else {})))
    deps.append(_file(f"spec/{spec.path.name}", sha256_file(spec.path)))
    m = read_manifest(feeds["data"])
    for e in m.outputs if m else []:
        if e.path not in DATA_RECORDS:
            deps.append(_file(f"data/{e.path}", e.sha256))
    im = spec.gguf_imatrix()
    if im is not None:
        deps.append(_file(f"spec/{im.calibration}", sha256_file(spec.resolve(im.calibration)), calibration=True))
    return deps


def statement(spec: Spec, repo: str, subjects: Mapping[str, str], deps: list[dict],
              verification: Path | None) -> dict:
    """The in-toto statement of ``repo``; ``subjects``: its weight files -> sha256."""
    byproducts = []
    if verification is not None and verification.is_file():
        byproducts.append(_file("verify/verification.json", sha256_file(verification)))
    return {
        "_type": STATEMENT,
        "subject": [{"name": p, "digest": {"sha256": d}} for p, d in sorted(subjects.items())],
        "predicateType": PREDICATE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"spec": spec.path.name, "release": spec.release.name,
                                       "version": spec.release.version, "repo": repo},
                "internalParameters": {"threads": threads()},
                "resolvedDependencies": deps,
            },
            "runDetails": {"builder": builder(), "byproducts": byproducts},
        },
    }


def dumps(st: dict) -> str:
    return json.dumps(st, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def digest_of(deps: list[dict], name: str) -> str | None:
    return next((d["digest"]["sha256"] for d in deps if d["name"] == name), None)


def read(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def fingerprint(st: dict) -> str:
    return hashlib.sha256(dumps(st).encode()).hexdigest()
