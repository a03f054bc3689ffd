"""Build layout and manifests: skip when unchanged, --force, re-run on changed inputs or spec
sections or damaged outputs, atomic writes, and no half-built stage after a crash or SIGKILL."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT
from release import artifacts
from release.artifacts import StageError, run_stage


def _builder(calls: list, payload: bytes = b"weights"):
    def build(out: Path) -> dict:
        calls.append(out)
        (out / "sub").mkdir()
        (out / "model.bin").write_bytes(payload)
        (out / "sub" / "config.json").write_text('{"a": 1}')
        return {"answer": 42}
    return build


def _run(stage: Path, calls: list, **kw):
    kw.setdefault("release", "r")
    m = run_stage("demo", stage, _builder(calls, kw.pop("payload", b"weights")), **kw)
    return m, m.built


def test_manifest_records_outputs_and_is_skipped_when_unchanged(tmp_path):
    inp = tmp_path / "input.txt"
    inp.write_text("corpus")
    stage, calls = tmp_path / "build" / "demo", []
    m, ran = _run(stage, calls, inputs={"corpus": inp}, spec_sections={"lora": "h1"}, tools=("torch",))
    assert ran and len(calls) == 1
    on_disk = json.loads((stage / "manifest.json").read_text())
    assert on_disk["inputs"]["corpus"] == artifacts.sha256_file(inp)
    assert on_disk["figures"] == {"answer": 42} and on_disk["tools"]["torch"] == "2.13.0+cpu"
    assert on_disk["tools"]["qalb-release"] == importlib.metadata.version("qalb-release")
    assert {e["path"]: e["size"] for e in on_disk["outputs"]} == {"model.bin": 7, "sub/config.json": 8}
    assert artifacts.check_outputs(stage, m, deep=True) == []

    m2, ran = _run(stage, calls, inputs={"corpus": inp}, spec_sections={"lora": "h1"}, tools=("torch",))
    assert not ran and len(calls) == 1 and m2.fingerprint == m.fingerprint

    _, ran = _run(stage, calls, inputs={"corpus": inp}, spec_sections={"lora": "h1"}, tools=("torch",), force=True)
    assert ran and len(calls) == 2


@pytest.mark.parametrize("change", ["input", "spec", "output-size", "output-deleted"])
def test_changes_trigger_a_rebuild(tmp_path, change):
    inp = tmp_path / "input.txt"
    inp.write_text("corpus")
    stage, calls = tmp_path / "demo", []

    def kw() -> dict:
        return {"inputs": {"corpus": inp}, "spec_sections": {"lora": "h2" if change == "spec" else "h1"}}

    _run(stage, calls, inputs={"corpus": inp}, spec_sections={"lora": "h1"})
    if change == "input":
        inp.write_text("corpus, edited")
    elif change == "output-size":
        (stage / "model.bin").write_bytes(b"truncated")
    elif change == "output-deleted":
        (stage / "sub" / "config.json").unlink()
    _, ran = _run(stage, calls, **kw())
    assert ran and len(calls) == 2
    assert artifacts.check_outputs(stage, artifacts.read_manifest(stage), deep=True) == []


def test_a_file_changed_by_hand_at_the_same_size_is_rebuilt_and_deep_finds_a_hidden_change(tmp_path):
    stage, calls = tmp_path / "demo", []
    m, _ = _run(stage, calls)
    target = stage / "model.bin"
    written = (stage / "manifest.json").stat()
    target.write_bytes(b"WEIGHTS")  # same size, other bytes: its mtime is now newer than the manifest's
    assert artifacts.check_outputs(stage, m) == [f"{target}: sha256 differs from the manifest"]
    _, ran = _run(stage, calls)
    assert ran and len(calls) == 2 and target.read_bytes() != b"WEIGHTS"
    # a change that put the old mtime back is seen only by the deep check (./inv release --check)
    target.write_bytes(b"WEIGHTS")
    os.utime(target, ns=(written.st_atime_ns, written.st_mtime_ns))
    m = artifacts.read_manifest(stage)
    assert artifacts.check_outputs(stage, m) == []
    assert artifacts.check_outputs(stage, m, deep=True) == [f"{target}: sha256 differs from the manifest"]


def test_downstream_input_is_the_upstream_manifest_digest(tmp_path):
    up, calls = tmp_path / "up", []
    m, _ = _run(up, calls)
    assert artifacts.input_digest(up) == m.digest()
    down, dcalls = tmp_path / "down", []
    _run(down, dcalls, inputs={"up": up})
    _, ran = _run(up, calls, payload=b"other", force=True)
    assert ran
    _, ran = _run(down, dcalls, inputs={"up": up})
    assert ran and len(dcalls) == 2


def test_missing_input_is_a_one_line_error(tmp_path):
    with pytest.raises(StageError, match=r"input not found; build the stage that makes it first$"):
        _run(tmp_path / "demo", [], inputs={"x": tmp_path / "nope"})


def test_failed_build_keeps_the_previous_stage_and_leaves_no_partial(tmp_path):
    stage, calls = tmp_path / "demo", []
    _run(stage, calls)
    before = (stage / "manifest.json").read_bytes()

    def broken(out: Path) -> dict:
        (out / "model.bin").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        run_stage("demo", stage, broken, release="r", force=True)
    assert (stage / "manifest.json").read_bytes() == before
    assert (stage / "model.bin").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_sigkill_mid_stage_leaves_nothing_that_looks_complete(tmp_path):
    stage = tmp_path / "demo"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from release.artifacts import run_stage
        def build(out):
            (out / "model.bin").write_bytes(b"half written")
            print("writing", flush=True)
            time.sleep(60)
        run_stage("demo", Path({str(stage)!r}), build, release="r")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not stage.exists() and artifacts.read_manifest(stage) is None
    assert [p.name for p in tmp_path.iterdir()] == [".demo.partial"]  # hidden, no manifest
    calls = []
    _, ran = _run(stage, calls)
    assert ran and sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_atomic_path_leaves_destination_untouched_on_error(tmp_path):
    dest = tmp_path / "config.json"
    artifacts.write_json(dest, {"v": 1})
    with pytest.raises(ValueError):
        with artifacts.atomic_path(dest) as tmp:
            tmp.write_text('{"v": 2')
            raise ValueError("crash mid-write")
    assert json.loads(dest.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.parametrize("text", ["{not json", "", '{"stage": "demo"}', "[]", '{"outputs": 3}'])
def test_a_damaged_manifest_counts_as_unbuilt_and_is_rebuilt(tmp_path, text):
    stage = tmp_path / "demo"
    stage.mkdir()
    (stage / "manifest.json").write_text(text)
    assert artifacts.read_manifest(stage) is None
    _, ran = _run(stage, [])
    assert ran and artifacts.read_manifest(stage).stage == "demo"
