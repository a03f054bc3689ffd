"""The release pipeline: stage order, skip/resume from manifests, the final summary table.

    base -> data -> cpt -> sft -> merge (BF16 + FP16) -> bnb4 -> gguf (+ quants) -> verify
         -> modelfiles -> cards -> hub (plan; push with --push)

Stages run in order; each is skipped when its manifest says its inputs and spec sections are
unchanged, and an interrupted one is rebuilt from scratch (or, for training, from its last
checkpoint) on the next run. ``only`` runs one stage, ``start`` resumes from a stage (earlier
ones must be built). This module is the only place that knows which stage feeds which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from release import base, card, gguf, hub, merge, modelfile, quant4, verify
from release.errors import StageError
from release.artifacts import Manifest, read_manifest, summary_console
from release.spec import Spec
from training import curate, stages


@dataclass(frozen=True)
class StageResult:
    name: str
    directory: Path
    manifest: Manifest | None  # None for the hub step (its record is hub/plan.json)
    ran: bool


Runner = Callable[[Spec, bool, bool], tuple[Manifest, bool]]


def models(spec: Spec) -> dict[str, Path]:
    """Variant key -> the folder it is built in (what verification and publishing read)."""
    return {key: spec.variant_dir(key) for key in spec.variants}


def adapters(spec: Spec) -> list[Path]:
    """The training stages' adapters, in the order they are merged."""
    return [stages.stage_dir(spec, s) for s in stages.STAGES]


# name -> (runner, folder), in data-flow order
STAGES: dict[str, tuple[Runner, Callable[[Spec], Path]]] = {
    base.STAGE: (lambda s, f, p: base.run(s, force=f, progress=p), base.stage_dir),
    curate.STAGE: (lambda s, f, p: curate.run(s, force=f, progress=p), curate.stage_dir),
    **{name: ((lambda s, f, p, n=name: stages.run(s, n, force=f, progress=p)),
              (lambda s, n=name: stages.stage_dir(s, n))) for name in stages.STAGES},
    merge.STAGE: (lambda s, f, p: merge.run_merge(s, base.model_dir(s), adapters(s), merge.stage_dir(s),
                                                   force=f, progress=p), merge.stage_dir),
    quant4.STAGE: (lambda s, f, p: quant4.run(s, s.variant_dir(s.flagship_key), force=f, progress=p),
                   quant4.stage_dir),
    gguf.STAGE: (lambda s, f, p: gguf.run(s, s.variant_dir(s.flagship_key), force=f, progress=p), gguf.stage_dir),
    verify.STAGE: (lambda s, f, p: verify.run(s, models(s), force=f, progress=p), verify.stage_dir),
    modelfile.STAGE: (lambda s, f, p: modelfile.run(s, force=f, progress=p), modelfile.stage_dir),
    card.STAGE: (lambda s, f, p: card.run(s, force=f, progress=p), card.stage_dir),
}
HUB = hub.STAGE
NAMES = [*STAGES, HUB]


def applicable(spec: Spec) -> list[str]:
    """The stages this spec needs (no bnb4 stage without a bitsandbytes variant, ...)."""
    formats = {v.format for v in spec.variants.values()}
    skip = {quant4.STAGE} if "bnb-4bit" not in formats else set()
    skip |= {gguf.STAGE, modelfile.STAGE} if "gguf" not in formats else set()
    return [n for n in NAMES if n not in skip]


def run(spec: Spec, *, force: bool = False, only: str | None = None, start: str | None = None,
        until: str | None = None, push: bool = False, progress: bool = True,
        console: Console | None = None) -> list[StageResult]:
    """Run the stages in order (``start`` to ``until``, or ``only`` one); returns what each did.
    Raises ``StageError`` when verification fails (after recording it), so nothing unverified
    goes on to the cards and the Hub."""
    console = console or summary_console()
    names = applicable(spec)
    for opt, value in (("--only", only), ("--from", start), ("--until", until)):
        if value is not None and value not in names:
            raise StageError(f"{opt} {value}: unknown stage (stages: {', '.join(names)})")
    if only:
        names = [only]
    else:
        names = names[names.index(start) if start else 0:names.index(until) + 1 if until else None]
    results = []
    for name in names:
        if name == HUB:
            plans = hub.plan(spec, console=console, progress=progress)
            if push:
                console.print(hub.push_table(spec, hub.push(spec, plans, console=console, progress=progress)))
            results.append(StageResult(HUB, hub.stage_dir(spec), None, push))
            continue
        runner, folder = STAGES[name]
        if progress:
            console.print(f"[bold]{name}[/bold] …")
        manifest, ran = runner(spec, force, progress)
        results.append(StageResult(name, folder(spec), manifest, ran))
        if name == verify.STAGE and not manifest.figures.get("passed"):
            console.print(verify_table(manifest.figures))
            raise StageError("verify: release gates failed (recorded in "
                             f"{verify.stage_dir(spec) / 'verification.json'}):\n"
                             + "\n".join(verify.failures(manifest.figures)))
    return results


def status(spec: Spec) -> list[tuple[str, Manifest | None]]:
    return [(name, read_manifest(folder(spec))) for name, (_, folder) in STAGES.items()]


# --- summary ----------------------------------------------------------------------------------


def summary(spec: Spec, results: list[StageResult], console: Console | None = None) -> Table:
    """Stages table, then (once verified) every artifact with its gates and destination."""
    console = console or summary_console()
    table = Table(title=f"{spec.release.name} {spec.release.version}: stages")
    for col in ("stage", "status", "files", "size", "seconds", "folder"):
        table.add_column(col, justify="right" if col in ("files", "size", "seconds") else "left")
    for r in results:
        if r.manifest is None:
            table.add_row(r.name, "pushed" if r.ran else "planned", "", "", "", _short(r.directory))
            continue
        size = sum(e.size for e in r.manifest.outputs)
        table.add_row(r.name, "built" if r.ran else "up to date", str(len(r.manifest.outputs)),
                      human_bytes(size), f"{r.manifest.seconds:.1f}", _short(r.directory))
    console.print(table)
    vm = read_manifest(verify.stage_dir(spec))
    if vm is not None:
        console.print(artifact_table(spec, vm.figures))
    return table


def artifact_table(spec: Spec, figures: dict) -> Table:
    """Every verified weight file: size, sha256, its gates, and the repo it goes to."""
    t = Table(title="artifacts")
    for col in ("file", "size", "sha256", "KLD", "top-1", "Urdu", "stop", "gates", "goes to"):
        t.add_column(col, justify="right" if col in ("size", "KLD", "top-1", "Urdu") else "left",
                     overflow="fold", no_wrap=col not in ("file", "goes to"))
    rows = figures.get("variants", {})
    for rel, a in figures.get("artifacts", {}).items():
        r = rows[a["variant"] if a["quant"] is None else f"gguf:{a['quant']}"]
        t.add_row(rel, human_bytes(a["size"]), a["sha256"][:16],
                  "-" if r.get("kld_mean") is None else f"{r['kld_mean']:.5f}",
                  "-" if r.get("top1") is None else f"{r['top1']:.1%}",
                  f"{r.get('urdu_purity', 0):.0%}", "yes" if r.get("stopped") else "no",
                  "pass" if r["passed"] else "FAIL", spec.variants[a["variant"]].repo)
    return t


def verify_table(figures: dict) -> Table:
    t = Table(title="verification")
    for col in ("variant", "runtime", "KLD", "top-1", "max KLD", "Urdu", "stopped", "result"):
        t.add_column(col)
    for row in verify.summary_rows(figures):
        t.add_row(*row)
    return t


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
