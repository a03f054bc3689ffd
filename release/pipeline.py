"""The release pipeline: stage order, which stage feeds which, skip/resume, the summary tables.

    base -> data -> cpt -> sft -> merge (BF16 + FP16) -> bnb4 -> gguf (+ quants) -> modelfiles
         -> verify -> cards -> publish (plan; push with --push)

Every stage module has the same face: ``STAGE`` (its name: also its module's, its folder's and its
task's), ``TRAITS`` (how it runs: container image, GPU, many processes, publishing) and
``run(spec, inputs, *, force, progress) -> Manifest``. This module is the only place that knows
their order, where each writes (``folder``: ``build/<release>/<STAGE>``) and which stage's output
feeds which input (``upstream``): it hands each stage its inputs, as datatrove's executor hands
each step its data, so a stage never asks for them and runs alone in a test
(``bnb4.run(spec, {"model": folder})``). Adding a stage is one module plus one line in ``STAGES``
(and its line in ``upstream`` when it reads another stage's output).

Stages run in order; each is skipped when its manifest says its inputs and spec sections are
unchanged, and an interrupted one is rebuilt from scratch (or, for training, from its last
checkpoint) on the next run. ``only`` runs one stage, ``start`` resumes from a stage (earlier
ones must be built). Distributed stages run on as many processes and hosts as ``launch`` says
(training/distributed.py); with the docker runner every stage runs in its container image
(release/docker.py), one ``release --only STAGE`` each. A stage whose manifest records
``passed: false`` (verify's gates) stops the run before anything is published.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from rich.console import Console
from rich.table import Table

from release import (
    base,
    bnb4,
    cards,
    docker,
    gguf,
    interrupts,
    lock,
    merge,
    modelfiles,
    preflight,
    publish,
    signing,
    verify,
)
from release.artifacts import (
    Manifest,
    Traits,
    built_elsewhere,
    check_outputs,
    human_bytes,
    read_manifest,
    remove_leftovers,
    stage_dir,
    summary_console,
)
from release.errors import Interrupted, PublishError, StageError
from release.spec import Spec
from training import cluster, cpt, data, distributed, sft
from training import stages as training_stages


class Stage(Protocol):
    """What the pipeline needs of a stage module."""

    STAGE: str
    TRAITS: Traits

    def run(self, spec: Spec, inputs: Mapping[str, Path], *, force: bool = False,
            progress: bool = True) -> Manifest: ...


# The stages, in data-flow order.
STAGES: tuple[Stage, ...] = (base, data, cpt, sft, merge, bnb4, gguf, modelfiles, verify, cards, publish)
NAMES = [s.STAGE for s in STAGES]


def stage(name: str) -> Stage:
    return next(s for s in STAGES if s.STAGE == name)


def folder(spec: Spec, name: str) -> Path:
    """Where stage ``name`` writes its files."""
    return stage_dir(spec.build_dir, name)


def variant_dir(spec: Spec, key: str) -> Path:
    """The folder variant ``key`` (a ``[variants]`` key) is built in: what is verified and published."""
    v = spec.variants[key]
    if v.format == "safetensors":
        return folder(spec, merge.STAGE) / merge.subfolder(v.dtype)
    return folder(spec, {"bnb-4bit": bnb4, "gguf": gguf}[v.format].STAGE)


def base_model_dir(spec: Spec) -> Path:
    """The folder holding the base model's files: the base stage's, or the local or downloaded
    copy it records."""
    return base.model_dir(folder(spec, base.STAGE))


def models(spec: Spec) -> dict[str, Path]:
    """Variant key -> the folder it is built in."""
    return {key: variant_dir(spec, key) for key in spec.variants}


def upstream(spec: Spec, name: str) -> dict[str, Path]:
    """What stage ``name`` reads from other stages: input name -> folder or file."""
    flagship = variant_dir(spec, spec.flagship_key)
    trained = {"base": base_model_dir(spec), "data": folder(spec, data.STAGE)}
    feeds = {
        data.STAGE: lambda: {"tokenizer": base_model_dir(spec) / "tokenizer.json"},
        cpt.STAGE: lambda: trained,
        sft.STAGE: lambda: {**trained, "cpt": folder(spec, cpt.STAGE)},
        # adapters in the order they are merged
        merge.STAGE: lambda: {"base": base_model_dir(spec), "adapter0": folder(spec, cpt.STAGE),
                              "adapter1": folder(spec, sft.STAGE)},
        bnb4.STAGE: lambda: {"model": flagship},
        gguf.STAGE: lambda: {"model": flagship},
        # the variants, and the Modelfiles that ship beside the GGUF files (verify checks them too)
        verify.STAGE: lambda: {**models(spec), **({verify.MODELFILES: folder(spec, modelfiles.STAGE)}
                                                  if modelfiles.STAGE in applicable(spec) else {})},
        cards.STAGE: lambda: {"verify": folder(spec, verify.STAGE), "gguf": folder(spec, gguf.STAGE),
                              "model": flagship, **{cards.VARIANT + k: p for k, p in models(spec).items()}},
        # and, for the adapter repos and the provenance, the stages the release was built from
        publish.STAGE: lambda: {"verify": folder(spec, verify.STAGE), "cards": folder(spec, cards.STAGE),
                                "modelfiles": folder(spec, modelfiles.STAGE), **models(spec),
                                **{n: folder(spec, n) for n in (base.STAGE, data.STAGE, cpt.STAGE, sft.STAGE)}},
    }
    return feeds[name]() if name in feeds else {}


def applicable(spec: Spec) -> list[str]:
    """The stages this spec needs (no bnb4 stage without a bitsandbytes variant, ...)."""
    formats = {v.format for v in spec.variants.values()}
    skip = {bnb4.STAGE} if "bnb-4bit" not in formats else set()
    skip |= {gguf.STAGE, modelfiles.STAGE} if "gguf" not in formats else set()
    return [n for n in NAMES if n not in skip]


def rebuild(spec: Spec, name: str, adapters: Mapping[str, Path], check_base: Callable[[Path], None], *,
            progress: bool = True) -> Path:
    """Variant ``name`` built again from the base and the given adapter folders (training stage
    -> folder, in merge order) into ``spec``'s build folder: ``./inv reproduce``. The base is
    built (or downloaded) and handed to ``check_base`` before anything is made from it. Returns
    the folder the variant was built in."""
    run_one(spec, base.STAGE, progress=progress)
    check_base(base_model_dir(spec))
    inputs = {"base": base_model_dir(spec), **{f"adapter{i}": p for i, p in enumerate(adapters.values())}}
    merge.run(spec, inputs, progress=progress)
    fmt = spec.variants[name].format
    if fmt in ("bnb-4bit", "gguf"):
        run_one(spec, (bnb4 if fmt == "bnb-4bit" else gguf).STAGE, progress=progress)
    return variant_dir(spec, name)


def run_one(spec: Spec, name: str, *, force: bool = False, progress: bool = True) -> Manifest:
    """Stage ``name`` alone, in this process, with the inputs the pipeline hands it."""
    return stage(name).run(spec, upstream(spec, name), force=force, progress=progress)


@dataclass(frozen=True)
class StageResult:
    name: str
    directory: Path
    manifest: Manifest

    @property
    def ran(self) -> bool:
        return self.manifest.built


def select(spec: Spec, only: str | None = None, start: str | None = None, until: str | None = None) -> list[str]:
    """The stage names to run: ``only`` one, or ``start`` to ``until`` of the applicable ones."""
    names = applicable(spec)
    for opt, value in (("--only", only), ("--from", start), ("--until", until)):
        if value is not None and value not in names:
            raise StageError(f"{opt} {value}: unknown stage (stages: {', '.join(names)})")
    if only:
        return [only]
    return names[names.index(start) if start else 0:names.index(until) + 1 if until else None]


ONE_PROCESS = distributed.Launch()


def run(spec: Spec, *, force: bool | Collection[str] = False, only: str | None = None, start: str | None = None,
        until: str | None = None, push: bool = False, progress: bool = True,
        console: Console | None = None, launch: distributed.Launch = ONE_PROCESS,
        executor: cluster.Executor = cluster.LOCAL,
        runner: str = "local", root: Path | None = None, wait: bool = False, check: bool = False,
        unsigned: bool = False) -> list[StageResult]:
    """Run the stages in order (``start`` to ``until``, or ``only`` one); returns what each did.
    Raises ``StageError`` when verification fails (after recording it), so nothing unverified
    goes on to the cards and the Hub. ``push`` publishes the Hub plan once it is made.
    ``launch``: the training stages' processes and hosts; ``executor``: where the curation's
    datatrove jobs run (this machine, a Ray or Slurm cluster); ``runner`` ``docker``: each stage in
    its container image, from the checkout ``root``. ``force``: rebuild every stage run (True)
    or the stages named. ``check``: hash every built file again and rebuild the stages whose
    bytes changed. The build folder is locked for the whole run (release/lock.py; ``wait``:
    wait for another writer instead of refusing); Ctrl-C and SIGTERM become ``Interrupted``
    naming the stage they stopped. ``unsigned``: push without signatures (refused otherwise, before
    anything is built, when no signing key is given)."""
    if runner not in docker.RUNNERS:
        raise StageError(f"--runner {runner}: expected one of {', '.join(docker.RUNNERS)}")
    if runner == "docker" and executor != cluster.LOCAL:
        raise StageError(f"--executor {executor.kind} with --runner docker: run it with --runner local on a node of "
                         "the cluster (its workers run this environment, not the image)")
    console = console or summary_console()
    names = select(spec, only, start, until)
    if push and not unsigned and publish.STAGE in names and signing.from_environment() is None:
        raise PublishError(f"{spec.path}: --push without a signing key; sign with --signing-key KEY or "
                           f"{signing.ENV_KEY} (./inv keygen --out KEY makes one), or publish unsigned with --unsigned")
    forced = set(names) if force is True else set(force or ())
    group = f"{','.join(names)}@{launch.rdzv}" if launch.nodes > 1 and launch.rdzv else None
    current: list[str | None] = [None]
    try:
        with lock.hold(spec.build_dir, wait=wait, group=group,
                       notice=lambda text: print(text, file=sys.stderr)) as holder:
            if holder is not None:  # this run writes the folder alone: what others left is a dead run's
                for leftover in remove_leftovers(spec.build_dir):
                    print(f"note: removed {leftover}, left unfinished by a run that ended", file=sys.stderr)
            if check:
                forced |= changed(spec, names, console)
            # before anything is built: refuse in one line when the disk cannot hold what will be written
            preflight.check(spec, names,
                            built={n for n in names if n not in forced and read_manifest(folder(spec, n))})
            return _run_stages(spec, names, forced, current, push=push, progress=progress, console=console,
                               launch=launch, runner=runner, root=root, unsigned=unsigned, executor=executor)
    except KeyboardInterrupt:
        raise Interrupted(signal.SIGINT, current[0]) from None
    except Interrupted as e:
        e.stage = e.stage or current[0]
        raise


def changed(spec: Spec, names: list[str], console: Console) -> set[str]:
    """The built stages among ``names`` with a file whose bytes differ from its manifest (each
    printed): ``--check``, which hashes everything again."""
    out = set()
    for name in names:
        m = read_manifest(folder(spec, name))
        for problem in check_outputs(folder(spec, name), m, deep=True) if m else []:
            console.print(f"changed since built: {problem}; rebuilding stage {name}")
            out.add(name)
    return out


def _run_stages(spec: Spec, names: list[str], forced: set[str], current: list[str | None], *, push: bool,
                progress: bool, console: Console, launch: distributed.Launch, runner: str,
                root: Path | None, unsigned: bool = False,
                executor: cluster.Executor = cluster.LOCAL) -> list[StageResult]:
    results = []
    for name in names:
        interrupts.check(current[0])  # one that a library swallowed stops the run here
        current[0] = name
        s = stage(name)
        if progress:
            console.print(f"[bold]{name}[/bold] …")
        if runner == "docker":
            manifest = _in_container(spec, s, root or Path.cwd(), force=name in forced, launch=launch,
                                     push=push and s.TRAITS.publishes, unsigned=unsigned)
            results.append(StageResult(name, folder(spec, name), manifest))
            continue  # the container ran the gate and the push
        inputs = upstream(spec, name)
        if s.TRAITS.distributed:  # in child processes, one or many (training/distributed.py says why)
            up_to_date = None if name in forced else training_stages.current(spec, name, inputs)
            manifest = up_to_date or distributed.run(spec, name, inputs, launch, force=name in forced,
                                                     progress=progress)
        elif s.TRAITS.clustered and executor != cluster.LOCAL:
            manifest = s.run_with(spec, inputs, force=name in forced, progress=progress, executor=executor)
        else:
            manifest = s.run(spec, inputs, force=name in forced, progress=progress)
        results.append(StageResult(name, folder(spec, name), manifest))
        if manifest.figures.get("passed") is False:
            console.print(verify_table(manifest.figures))
            raise StageError(f"{name}: release gates failed (recorded in {folder(spec, name) / 'verification.json'}):\n"
                             + "\n".join(verify.failures(manifest.figures)))
        if s.TRAITS.publishes and push:
            pushed = publish.push(spec, publish.read_plans(spec), console=console, progress=progress,
                                  unsigned=unsigned)
            console.print(publish.push_table(spec, pushed))
            manifest.figures["pushed"] = len(pushed)
    interrupts.check(current[0])
    return results


def _in_container(spec: Spec, s: Stage, root: Path, *, force: bool, launch: distributed.Launch,
                  push: bool, unsigned: bool = False) -> Manifest:
    """Stage ``s`` as ``release --only STAGE`` in its image (``TRAITS.image``); its manifest."""
    name = s.STAGE
    before = read_manifest(folder(spec, name))
    options = {"spec": spec.path, "only": name, "force": force, "push": push, "unsigned": unsigned and push}
    if s.TRAITS.distributed:
        options.update(processes=launch.processes, nodes=launch.nodes, rdzv=launch.rdzv,
                       join_timeout=launch.join_timeout)
    docker.dispatch("release", "docker", options, root, build_dir=spec.build_dir,
                    image=(s.TRAITS.image, s.TRAITS.gpu))
    after = read_manifest(folder(spec, name))
    if after is None:
        raise StageError(f"{name}: the container wrote no manifest in {folder(spec, name)}")
    return built_elsewhere(before, after)


def status(spec: Spec) -> list[tuple[str, Manifest | None]]:
    return [(s.STAGE, read_manifest(folder(spec, s.STAGE))) for s in STAGES]


# --- summary ----------------------------------------------------------------------------------


def summary(spec: Spec, results: list[StageResult], console: Console | None = None, *,
            artifacts: bool = False) -> Table:
    """The stages table of ``results``; with ``artifacts`` (a release or verify run, which covers
    every artifact) and once verified, every artifact with its gates and destination too."""
    console = console or summary_console()
    table = Table(title=f"{spec.release.name} {spec.release.version}: stages")
    for col in ("stage", "status", "files", "size", "seconds", "folder"):
        table.add_column(col, justify="right" if col in ("files", "size", "seconds") else "left")
    for r in results:
        size = sum(e.size for e in r.manifest.outputs)
        status = ("pushed" if r.manifest.figures.get("pushed") else "planned") if stage(r.name).TRAITS.publishes else \
            "built" if r.ran else "up to date"
        table.add_row(r.name, status, str(len(r.manifest.outputs)), human_bytes(size),
                      f"{r.manifest.seconds:.1f}", _short(r.directory))
    console.print(table)
    vm = read_manifest(folder(spec, verify.STAGE)) if artifacts else None
    if vm is not None:
        console.print(artifact_table(spec, vm.figures))
    return table


def artifact_table(spec: Spec, figures: dict) -> Table:
    """Every verified weight file: size, sha256, its gates, and the repo it goes to. A gate the
    spec does not enforce shows its figure as "(info)", explained in the caption."""
    t = Table(title="artifacts", caption=verify.info_note(figures), caption_justify="left")
    for col in ("file", "size", "sha256", "KLD", "top-1", "Urdu", "stop", "gates", "goes to"):
        t.add_column(col, justify="right" if col in ("size", "KLD", "top-1", "Urdu") else "left",
                     overflow="fold", no_wrap=col not in ("file", "goes to"))
    rows = figures.get("variants", {})
    for rel, a in figures.get("artifacts", {}).items():
        r = rows[a["variant"] if a["quant"] is None else f"gguf:{a['quant']}"]
        t.add_row(rel, human_bytes(a["size"]), a["sha256"][:16],
                  "-" if r.get("kld_mean") is None else f"{r['kld_mean']:z.5f}",
                  "-" if r.get("top1") is None else f"{r['top1']:.1%}",
                  verify.gate_cell(f"{r.get('urdu_purity', 0):.0%}", "urdu_purity", figures),
                  verify.gate_cell(verify.stopped_cell(r), "stop_token", figures),
                  "pass" if r["passed"] else "FAIL", spec.variants[a["variant"]].repo)
    return t


def verify_table(figures: dict) -> Table:
    t = Table(title="verification", caption=verify.info_note(figures), caption_justify="left")
    for col in ("variant", "runtime", "KLD", "top-1", "max KLD", "Urdu", "stopped", "result"):
        t.add_column(col)
    for row in verify.summary_rows(figures):
        t.add_row(*row)
    return t


def _short(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
