"""The release pipeline: stage order, skip/resume from manifests, the final summary table.

Stages run in order; each is skipped when its manifest says its inputs and spec sections are
unchanged. ``only`` runs one stage, ``start`` resumes from a stage (earlier ones must be built).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from release import base, modelfile
from release.artifacts import Manifest, StageError, read_manifest
from release.spec import Spec


@dataclass(frozen=True)
class StageResult:
    name: str
    directory: Path
    manifest: Manifest
    ran: bool


# name -> (runner, folder). The list grows as stages are added; order is the data flow.
STAGES: dict[str, tuple[Callable[..., tuple[Manifest, bool]], Callable[[Spec], Path]]] = {
    base.STAGE: (base.run, base.stage_dir),
    modelfile.STAGE: (modelfile.run, modelfile.stage_dir),
}


def run(spec: Spec, *, force: bool = False, only: str | None = None, start: str | None = None,
        progress: bool = True) -> list[StageResult]:
    names = list(STAGES)
    for opt, value in (("--only", only), ("--from", start)):
        if value is not None and value not in STAGES:
            raise StageError(f"{opt} {value}: unknown stage (stages: {', '.join(names)})")
    if only:
        names = [only]
    elif start:
        names = names[names.index(start):]
    results = []
    for name in names:
        runner, folder = STAGES[name]
        manifest, ran = runner(spec, force=force, progress=progress)
        results.append(StageResult(name, folder(spec), manifest, ran))
    return results


def status(spec: Spec) -> list[tuple[str, Manifest | None]]:
    return [(name, read_manifest(folder(spec))) for name, (_, folder) in STAGES.items()]


def summary(spec: Spec, results: list[StageResult], console: Console | None = None) -> Table:
    table = Table(title=f"{spec.release.name} {spec.release.version}")
    for col in ("stage", "status", "files", "size", "seconds", "folder"):
        table.add_column(col, justify="right" if col in ("files", "size", "seconds") else "left")
    for r in results:
        size = sum(e.size for e in r.manifest.outputs)
        table.add_row(r.name, "built" if r.ran else "up to date", str(len(r.manifest.outputs)),
                      human_bytes(size), f"{r.manifest.seconds:.1f}", _short(r.directory))
    (console or Console()).print(table)
    return table


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _short(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
