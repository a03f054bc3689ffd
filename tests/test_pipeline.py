"""The whole demo release through `invoke release`, uninterrupted and stopped (Ctrl-C, SIGTERM,
SIGKILL) inside each stage in turn: the re-runs finish it and every artifact has the same sha256 as the
uninterrupted run's."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, SPECS, demo_copy, linked_copy, release_cmd
from release import pipeline, publish, signing
from release.artifacts import MANIFEST, check_outputs, read_manifest, sha256_file
from release.spec import load

RELEASE = "Qalb-Demo-1.0-Tiny-Instruct"
# Files whose content records how long things took; everything else must be byte-identical.
TIMED = {"verify/verification.json", "cpt/train.log", "sft/train.log", "data/report.json"}


# A tqdm progress-bar frame, as transformers, datasets and the trainer draw them on stderr (a
# terminal redraws them in place with \r; a pipe gets every frame).
BAR = re.compile(r"[^\r\n|]*\d{1,3}%\|[^|\r\n]*\| *[\d.]+[kMG]?/[\d.]+[kMG]? \[[^\]\r\n]*\]"
                 # tqdm without a total (datasets' "Generating train split: 26 examples [00:00, 11714.67 examples/s]")
                 r"|[^\r\n|]*: *[\d.]+[kMG]? [\w ]+ \[[\d:]+, [^\]\r\n]*\]")
# What this toolchain itself writes on stderr in a run that succeeds.
OURS = re.compile(r"(warning|note): ")


def notices(stderr: str) -> list[str]:
    """What a run wrote on stderr besides progress bars and our own lines: third-party notices
    (warnings, log records, deprecations, tracebacks; release/quiet.py drops the known-harmless
    ones), one per line."""
    lines = (BAR.sub("", part).strip() for line in stderr.splitlines() for part in line.split("\r"))
    return [ln for ln in lines if ln and not OURS.match(ln)]


def artifacts(build: Path) -> dict[str, str]:
    """Every file of every stage manifest (relative to the build folder) -> sha256, read back
    from disk, plus the Hub staging folders."""
    out = {}
    for manifest in sorted(build.glob(f"*/{MANIFEST}")):
        m = read_manifest(manifest.parent)
        for e in m.outputs:
            path = manifest.parent / e.path
            out[f"{manifest.parent.name}/{e.path}"] = sha256_file(path)
    for f in sorted((build / "publish").rglob("*")):
        if f.is_file() and f.name == signing.PROVENANCE:  # all but the digest of the (TIMED) verification record
            st = json.loads(f.read_text(encoding="utf-8"))
            st["predicate"]["runDetails"].pop("byproducts")
            out[f.relative_to(build).as_posix()] = json.dumps(st, sort_keys=True)
        elif f.is_file() and f.name != "plan.json":
            out[f.relative_to(build).as_posix()] = sha256_file(f)
    return out


@pytest.fixture(scope="module")
def uninterrupted(demo_build) -> tuple[Path, subprocess.CompletedProcess, float]:
    """The session's demo release (conftest.demo_build): read, never written, by these tests."""
    return demo_build


def test_demo_release_runs_end_to_end(uninterrupted):
    spec_path, done, seconds = uninterrupted
    assert done.returncode == 0, done.stderr[-3000:]
    spec = load(spec_path)
    for name in pipeline.applicable(spec):
        if name != publish.STAGE:  # the publish stage's record is its plan, made afresh every run
            assert (pipeline.folder(spec, name) / MANIFEST).is_file(), name
    vm = read_manifest(spec.build_dir / "verify").figures
    assert vm["passed"] and set(vm["variants"]) == {"bf16", "fp16", "bnb4", *(f"gguf:{q}" for q in spec.gguf_types())}
    # the publishing plan staged every repo (nothing was contacted: no HF_ENDPOINT)
    plan = json.loads((spec.build_dir / "publish" / "plan.json").read_text())
    assert set(plan["repos"]) == set(publish.repos(spec).values()) and plan["endpoint"] is None
    assert {*spec.adapter_repos().values()} < set(plan["repos"])  # the adapters too (hub.publish_adapters)
    # stderr holds none of the libraries' notices (release/quiet.py), and, not being a terminal,
    # none of their progress bars either (a pipe would get every frame of every bar)
    assert notices(done.stderr) == [], notices(done.stderr)
    assert not BAR.search(done.stderr), BAR.search(done.stderr).group(0)
    out = done.stdout
    assert "artifacts" in out and "nothing left this machine" in out
    # the demo's model has learned: every gate is enforced, and every variant passes them
    assert "(info)" not in out and "FAIL" not in out
    for v in spec.variants.values():
        assert v.repo in out
    print(f"demo release: {seconds:.0f} s")


def test_disk_estimate_matches_what_the_demo_wrote(uninterrupted):
    """The preflight estimate against the demo's real files (every file of a variant's folder but
    its manifest): safetensors and GGUF F16 are shapes times 2 bytes plus Llama 3's tokenizer
    (within 1%: headers, configs); NF4 within 10% (block states); the llama.cpp quants use
    Llama-3-8B's sizes per weight, which a 2-layer model with a vocabulary of 128,256 follows
    less closely (its embedding, a type of its own in each mix, is most of it): within 25%."""
    from release import preflight

    spec_path, done, _ = uninterrupted
    assert done.returncode == 0
    spec = load(spec_path)
    for n in preflight.estimate(spec):
        if n.stage == "merge":
            real = sum(p.stat().st_size for p in pipeline.variant_dir(spec, n.what.split(":")[0]).iterdir())
            assert abs(real - n.bytes) / real < 0.01, (n, real)
        elif n.stage == "bnb4":
            real = sum(p.stat().st_size for p in pipeline.folder(spec, "bnb4").iterdir() if p.name != MANIFEST)
            assert abs(real - n.bytes) / real < 0.10, (n, real)
        elif n.stage == "gguf":
            real = (pipeline.folder(spec, "gguf") / n.what.split(": ")[1]).stat().st_size
            limit = 0.01 if n.what.endswith("F16.gguf") else 0.25
            assert abs(real - n.bytes) / real < limit, (n, real)


def test_a_second_run_builds_nothing(uninterrupted):
    spec_path, _, _ = uninterrupted
    before = artifacts(load(spec_path).build_dir)
    again = subprocess.run(release_cmd(spec_path), cwd=spec_path.parent, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    built = [n for n in pipeline.applicable(load(spec_path)) if n != publish.STAGE]
    assert " built " not in again.stdout and again.stdout.count("up to date") == len(built)
    assert artifacts(load(spec_path).build_dir) == before


def test_a_stage_task_prints_only_its_stage(uninterrupted):
    """`./inv cards` reports the cards stage, not the release's artifact table (that belongs to
    `./inv release` and `./inv verify`)."""
    spec_path, done, _ = uninterrupted
    assert done.returncode == 0
    cards = _task("cards", spec_path)
    assert cards.returncode == 0, cards.stderr[-2000:]
    assert "cards" in cards.stdout and "up to date" in cards.stdout
    assert "goes to" not in cards.stdout and "sha256" not in cards.stdout, cards.stdout
    assert notices(cards.stderr) == []


def test_artifact_table_marks_gates_the_spec_does_not_enforce(demo_spec):
    from rich.console import Console

    row = {"runtime": "transformers", "kld_mean": 0.01, "top1": 0.9, "urdu_purity": 0.04, "stopped": False,
           "passed": True}
    files = {"bnb4/model.safetensors": {"sha256": "ab" * 32, "size": 10, "variant": "bnb4", "quant": None,
                                        "passed": True}}

    def shown(enforced: bool) -> str:
        figures = {"variants": {"bnb4": row}, "artifacts": files,
                   "enforced": {"urdu_purity": enforced, "stop_token": enforced}}
        console = Console(record=True, width=250)
        console.print(pipeline.artifact_table(demo_spec, figures))
        return console.export_text()

    demo, enforced = shown(False), shown(True)
    assert "4% (info)" in demo and "no (info)" in demo and "pass" in demo
    assert "(info): measured, not a release gate" in demo and "evaluation.enforce_stop_token = false" in demo
    assert "(info)" not in enforced and "4%" in enforced


def _started(build: Path, stage: str) -> bool:
    """The stage has work on disk that a kill would cut short."""
    if stage in ("cpt", "sft"):  # a complete trainer checkpoint: the kill exercises the resume
        from training import stages

        return any(stages._last_checkpoint(d / "trainer") for d in build.glob(f".checkpoints/{stage}-*"))
    partial = build / f".{stage}.partial"
    return partial.is_dir() and (stage == "verify" or any(p.is_file() for p in partial.rglob("*")))


# How each stage is stopped: Ctrl-C in a terminal (SIGINT to the whole process group), SIGTERM to
# the main process alone (a CI runner's cancel, `kill PID`: its children must be stopped by it),
# or SIGKILL to the group (a power cut; nothing runs after it).
STOPS = {"base": ("SIGTERM", "pid"), "data": ("SIGINT", "group"), "cpt": ("SIGTERM", "pid"),
         "sft": ("SIGKILL", "group"), "merge": ("SIGINT", "group"), "bnb4": ("SIGKILL", "group"),
         "gguf": ("SIGTERM", "pid"), "verify": ("SIGINT", "group")}


def _survivors(session: int) -> list[str]:
    """Processes (zombies aside) still in the session a test started: what an interrupt left behind."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "name", "status"]):
        try:
            if os.getsid(p.info["pid"]) == session and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{p.info['pid']} {p.info['name']}")
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def test_killed_inside_each_stage_then_resumed_gives_the_same_artifacts(uninterrupted, tmp_path):
    """Each stage is stopped once (Ctrl-C, SIGTERM or SIGKILL: ``STOPS``) and the same command is run
    again; the interrupts end in one line with 130 or 143 and leave no process behind."""
    spec_a, done, _ = uninterrupted
    assert done.returncode == 0
    spec = demo_copy(tmp_path)
    build = load(spec).build_dir
    killed = []
    for stage in [n for n in pipeline.applicable(load(spec)) if n != publish.STAGE]:
        proc = subprocess.Popen(release_cmd(spec), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True, text=True)
        while proc.poll() is None and not _started(build, stage):
            time.sleep(0.005)
        if proc.poll() is None:
            if stage == "verify":
                time.sleep(3)  # inside the measurements, not at their start
            name, target = STOPS.get(stage, ("SIGKILL", "group"))
            signum = getattr(signal, name)
            os.killpg(proc.pid, signum) if target == "group" else os.kill(proc.pid, signum)
            _, err = proc.communicate(timeout=120)
            killed.append(stage)
            if signum != signal.SIGKILL:
                assert proc.returncode == 128 + signum, (stage, name, proc.returncode, err[-3000:])
                line = f"interrupted in stage {stage}; run the same command to resume"
                assert err.strip().splitlines()[-1] == line, (stage, err[-3000:])
                assert "Traceback" not in err, (stage, err[-3000:])
            deadline = time.monotonic() + 10
            while _survivors(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _survivors(proc.pid) == [], (stage, name)
            # nothing half-built is visible: the stage folder is absent or a complete build
            m = read_manifest(build / stage)
            assert ((m is None and not (build / stage).exists())
                    or (m is not None and not check_outputs(build / stage, m)))
        else:
            assert proc.returncode == 0, proc.stderr.read()[-2000:]
    # every stage that takes measurable time was interrupted at least once
    assert {"base", "data", "cpt", "sft", "merge", "bnb4", "gguf", "verify"} <= set(killed), killed
    final = subprocess.run(release_cmd(spec), cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert final.returncode == 0, final.stderr[-3000:]
    a, b = artifacts(load(spec_a).build_dir), artifacts(build)
    assert set(a) == set(b)
    differ = sorted(k for k in a if a[k] != b[k] and k not in TIMED)
    assert differ == [], differ
    # the training stages were killed after a complete checkpoint and resumed from it: their run
    # logs hold both attempts
    for stage in ("cpt", "sft"):
        resumed = read_manifest(build / stage).figures["resumed_from"]
        log = (build / stage / "train.log").read_text(encoding="utf-8")
        assert resumed and resumed.startswith("checkpoint-"), (stage, resumed)
        assert log.count("--- start") >= 2 and f"resuming from {resumed}" in log, (stage, log)
    assert not list(build.glob(".*.partial")) and not list(build.glob(".checkpoints/*-*"))


def _task(name: str, spec: Path) -> subprocess.CompletedProcess:
    return subprocess.run(release_cmd(spec, name), cwd=spec.parent, capture_output=True, text=True, timeout=900)


def test_verify_task_reports_gates_and_a_failed_gate_stops_publishing(uninterrupted, tmp_path):
    """It re-verifies a copy of the uninterrupted build under a stricter spec."""
    spec_path, _, _ = uninterrupted
    ok = _task("verify", spec_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "every release gate passed" in ok.stdout and "verification" in ok.stdout
    assert " built " not in ok.stdout  # everything, verification included, was up to date

    # the same release with an unreachable Q8_0 gate (its measured KLD is ~0.002), verified in a
    # hard-linked copy of the shared build
    text = spec_path.read_text(encoding="utf-8")
    strict_text = text.replace("[gates.Q8_0]\nmax_kld = 0.01\n", "[gates.Q8_0]\nmax_kld = 0.000001\n")
    assert strict_text != text
    strict = linked_copy(spec_path, tmp_path / "strict", strict_text)
    failed = _task("verify", strict)
    assert failed.returncode == 2, failed.stdout[-2000:] + failed.stderr[-2000:]
    # the run ends with the error lines, after progress bars only (a verify run alone imports
    # torchao and bitsandbytes without Unsloth, which has filters of its own for some of them)
    lines = failed.stderr.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("error: verify: release gates failed"))
    errors = lines[first:]
    assert notices("\n".join(lines[:first])) == [], failed.stderr[-3000:]
    assert all(ln.startswith("error: ") for ln in errors), errors
    assert [ln for ln in errors if ln.startswith("error: gguf:Q8_0: KLD")], errors
    assert "Traceback" not in failed.stderr
    figures = read_manifest(load(strict).build_dir / "verify").figures
    assert figures["passed"] is False and figures["variants"]["gguf:Q8_0"]["passed"] is False
    # only a gate changed: the stored measurements were judged again, not measured again
    assert figures["rejudged"] is True and figures["variants"]["gguf:Q8_0"]["max_kld"] == 0.000001
    # the publishing plan refuses the failed file in one line
    plan = _task("publish", strict)
    assert plan.returncode == 2 and "Q8_0.gguf: failed verification" in plan.stderr, plan.stderr[-2000:]
    assert "Traceback" not in plan.stderr


# --- the shape: one stage interface, wired only here -------------------------------------------


def test_every_stage_has_the_same_face():
    """``STAGE``, ``TRAITS`` and ``run(spec, inputs, *, force=False, progress=True)``; no stage has
    a folder rule or an inputs lookup of its own (the pipeline's ``folder`` and ``upstream``)."""
    import inspect

    from release.artifacts import Traits

    for s in pipeline.STAGES:
        assert isinstance(s.STAGE, str) and s.STAGE and isinstance(s.TRAITS, Traits), s
        assert s.__name__.rsplit(".", 1)[1] == s.STAGE  # one word: module, stage, folder, task
        assert not hasattr(s, "folder") and not hasattr(s, "inputs"), s.STAGE
        params = inspect.signature(s.run).parameters
        assert list(params) == ["spec", "inputs", "force", "progress"], s.STAGE
        assert params["force"].kind is params["progress"].kind is inspect.Parameter.KEYWORD_ONLY
        assert (params["force"].default, params["progress"].default) == (False, True)
    assert len(set(pipeline.NAMES)) == len(pipeline.NAMES)
    # traits, not names, decide how a stage runs
    assert [s.STAGE for s in pipeline.STAGES if s.TRAITS.distributed] == ["cpt", "sft"]
    assert [s.STAGE for s in pipeline.STAGES if s.TRAITS.publishes] == ["publish"]
    for s in pipeline.STAGES:  # a clustered stage also runs on a Ray or Slurm cluster, the pipeline's choice
        if s.TRAITS.clustered:
            assert {"spec", "inputs", "force", "progress", "executor"} <= set(inspect.signature(s.run_with).parameters)
    assert [s.STAGE for s in pipeline.STAGES if s.TRAITS.clustered] == ["data"]


def test_every_stage_has_a_task_of_its_name():
    from tasks import ns

    tasks = set(ns.task_names)
    for name in pipeline.NAMES:
        assert name in tasks, name


def test_stage_folders_and_variant_folders_come_from_the_pipeline():
    spec = load(SPECS / "demo.toml")
    for s in pipeline.STAGES:
        assert pipeline.folder(spec, s.STAGE) == spec.build_dir / s.STAGE
    dirs = pipeline.models(spec)
    assert {k: p.relative_to(spec.build_dir).as_posix() for k, p in dirs.items()} == {
        "bf16": "merge/bf16", "fp16": "merge/fp16", "bnb4": "bnb4", "gguf": "gguf"}
    # what each stage reads from another is named by the pipeline alone
    assert set(pipeline.upstream(spec, "verify")) == set(spec.variants) | {"modelfiles"}  # the Modelfiles too
    assert pipeline.upstream(spec, "bnb4") == pipeline.upstream(spec, "gguf") == {"model": dirs["bf16"]}
    assert list(pipeline.upstream(spec, "merge"))[1:] == ["adapter0", "adapter1"]


def _imports(path: Path, package: str) -> set[str]:
    """The project modules ``path`` imports, at module level and inside functions."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else f"{package}.{node.module}"
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_the_import_graph_has_no_cycle_and_only_tasks_import_the_pipeline():
    """Arrows point down, counting imports inside functions: no cycle among the project's modules,
    and nothing in release/ or training/ imports the pipeline (it hands the stages their inputs)."""
    import graphlib

    modules = {f"{p.parent.name}.{p.stem}": p for d in ("release", "training") for p in (ROOT / d).glob("*.py")
               if p.stem != "__init__"}
    graph = {m: {i for i in _imports(p, p.parent.name) if i in modules and i != m} for m, p in modules.items()}
    importers = sorted(m for m, deps in graph.items() if "release.pipeline" in deps)
    assert importers == [], importers
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None
    assert order.index("release.errors") < order.index("release.pipeline")
