"""Rebuilding a published variant from its provenance: ``./inv reproduce REPO``.

The repo's signed provenance names the inputs by sha256: the base model's files (at a Hub
revision, or built by the scaffold kit), the adapters (in their own repos), the release spec and
the calibration text. Reproducing takes those, checks every digest, runs the stages that make the
variant (merge, then bnb4 or gguf) in a fresh build folder, and compares each weight file's
sha256 with the published one. Training and curation are not run again: the adapters are the
published ones (training on GPUs is not bit-reproducible, and the provenance records the data).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from release import check, provenance, signing
from release.artifacts import sha256_file
from release.errors import ReleaseError
from release.spec import Spec, load


class ReproduceError(ReleaseError):
    """An input that cannot be had with the recorded digest."""


@dataclass(frozen=True)
class Row:
    file: str
    published: str
    rebuilt: str | None

    @property
    def same(self) -> bool:
        return self.published == self.rebuilt


def find_spec(digest: str, name: str, candidates: list[Path]) -> Path:
    """The spec file with the recorded sha256 among ``candidates``."""
    for p in candidates:
        if p.is_file() and sha256_file(p) == digest:
            return p
    raise ReproduceError(f"no spec with sha256 {digest[:12]}… (the {name} the release was built with) among "
                         f"{', '.join(str(p) for p in candidates) or 'no candidates'}; check out the toolchain at the "
                         "commit the provenance names (runDetails.builder.version.git) or pass --spec")


def _key(spec: Spec, repo: str) -> str:
    key = next((k for k, v in spec.variants.items() if v.repo == repo), None)
    if key is None:
        known = ", ".join(v.repo for v in spec.variants.values())
        raise ReproduceError(f"{repo}: not a variant of {spec.path} ({known})")
    return key


def _in(spec: Spec, build: Path) -> Spec:
    """``spec`` building into ``build`` (a fresh folder)."""
    return dataclasses.replace(spec, build=dataclasses.replace(spec.build, dir=str(build.resolve())))


def _fetch_adapter(dep: dict, dest: Path) -> None:
    from huggingface_hub import hf_hub_download

    repo = dep["annotations"]["repo"]
    rev, _, path = dep["uri"].split("/resolve/", 1)[1].partition("/")
    try:
        got = Path(hf_hub_download(repo, path, revision=rev))
    except Exception as e:  # noqa: BLE001 - the client's HTTP, network and validation errors; one line
        raise ReproduceError(f"{repo}@{rev}/{path}: cannot download ({type(e).__name__}); the provenance names it "
                             "as an input") from None
    if sha256_file(got) != dep["digest"]["sha256"]:
        raise ReproduceError(f"{repo}@{rev}/{path}: sha256 differs from the provenance's {dep['name']}")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(got, dest / path)


# (spec, variant key, adapter folders by training stage, the base's check) -> the variant's folder:
# the pipeline's ``rebuild``, which the task hands in (only tasks and the pipeline wire stages)
Rebuild = Callable[[Spec, str, Mapping[str, Path], Callable[[Path], None]], Path]


def reproduce(repo: str, rebuild: Rebuild, *, revision: str | None = None, key: Path | None = None,
              spec_path: Path | None = None, build: Path) -> tuple[list[Row], check.Report]:
    """Rebuild ``repo``'s weight files in ``build`` (with ``rebuild``) and compare them with the
    published ones."""
    # the signature, the provenance and the key only: the published digests are the signed subjects
    folder = check.fetch(repo, revision, file=signing.PROVENANCE)
    report = check.Report(repo, folder)
    pub = key or folder / signing.PUBLIC_KEY
    try:
        signed = signing.verify(folder / signing.SIGNATURE, public_key=pub)
    except signing.SigningError as e:
        raise ReproduceError(str(e)) from None
    if sha256_file(folder / signing.PROVENANCE) != signed.digests.get(signing.PROVENANCE):
        raise ReproduceError(f"{repo}: {signing.PROVENANCE} differs from the one signed in {signing.SIGNATURE}")
    st = provenance.read(folder / signing.PROVENANCE)
    subjects = {s["name"]: s["digest"]["sha256"] for s in st["subject"]}
    deps = st["predicate"]["buildDefinition"]["resolvedDependencies"]
    params = st["predicate"]["buildDefinition"]["externalParameters"]
    recorded = next(d for d in deps if d["name"] == f"spec/{params['spec']}")
    root = Path(__file__).resolve().parent.parent
    spec = load(find_spec(recorded["digest"]["sha256"], params["spec"],
                          [spec_path] if spec_path else sorted((root / "specs").glob("*.toml"))))
    name = _key(spec, params["repo"])
    for d in deps:  # the calibration text and other files the spec names, from this checkout
        if d["name"].startswith("spec/") and d is not recorded:
            p = spec.resolve(d["name"].removeprefix("spec/"))
            if not p.is_file() or sha256_file(p) != d["digest"]["sha256"]:
                raise ReproduceError(f"{p}: sha256 differs from the provenance's {d['name']}; check out the "
                                     "toolchain at the commit the provenance names")
    build = Path(build)
    if build.exists() and any(build.iterdir()):
        raise ReproduceError(f"{build}: not empty; reproduce builds into a fresh folder (remove it or pass --build)")
    base_deps = {d["name"].removeprefix("base/"): d for d in deps if d["name"].startswith("base/")}
    revision_of_base = next((d.get("annotations", {}).get("revision") for d in base_deps.values()), None)
    spec = _in(spec, build)
    if revision_of_base:
        spec = dataclasses.replace(spec, base=dataclasses.replace(spec.base, revision=revision_of_base, path=None))

    def check_base(base_dir: Path) -> None:
        for path, d in sorted(base_deps.items()):
            if not (base_dir / path).is_file() or sha256_file(base_dir / path) != d["digest"]["sha256"]:
                raise ReproduceError(f"{base_dir / path}: the base model's file differs from the provenance's "
                                     f"{d['name']}")

    adapters = {}
    for stage in provenance.ADAPTERS:
        for d in (d for d in deps if d["name"].startswith(f"{stage}/")):
            _fetch_adapter(d, build / "adapters" / stage)
            adapters[stage] = build / "adapters" / stage
    built = rebuild(spec, name, adapters, check_base)
    rows = []
    for path, sha in sorted(subjects.items()):
        f = built / path
        rows.append(Row(path, sha, sha256_file(f) if f.is_file() else None))
        if not rows[-1].same:
            report.failures.append(f"{path}: rebuilt sha256 {str(rows[-1].rebuilt)[:12]}… differs from the published "
                                   f"{sha[:12]}…" if rows[-1].rebuilt else f"{path}: not rebuilt")
    return rows, report
