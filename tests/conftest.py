"""Shared fixtures: the bundled specs and tiny models built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_spec(folder: Path, text: str | None = None, name: str = "demo.toml") -> Path:
    """A spec file in ``folder`` (the demo's text unless given) with the files it refers to."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("licenses", "eval", "calibration"):  # files the spec names relative to itself
        shutil.copytree(SPECS / sub, folder / sub, dirs_exist_ok=True)
    path = folder / name
    path.write_text(text if text is not None else (SPECS / "demo.toml").read_text(encoding="utf-8"),
                    encoding="utf-8")
    return path


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="run the opt-in slow tests")
    parser.addoption("--gpu", action="store_true", help="run the GPU tests (a host with an NVIDIA GPU)")


def pytest_collection_modifyitems(config, items):
    from release import docker

    skips = {}
    if not config.getoption("--slow"):
        skips["slow"] = pytest.mark.skip(reason="slow test: run with --slow (./inv test --slow)")
    if not config.getoption("--gpu"):
        skips["gpu"] = pytest.mark.skip(reason="GPU test: run with --gpu on a GPU host (./inv test --gpu)")
    elif not docker.gpu_present():
        skips["gpu"] = pytest.mark.skip(reason="no NVIDIA GPU here (nvidia-smi -L lists none)")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_spec():
    from release import spec

    return spec.load(SPECS / "demo.toml")


@pytest.fixture(scope="session")
def qalb_spec():
    from release import spec

    return spec.load(SPECS / "qalb.toml")


@pytest.fixture(scope="session")
def tokenizer_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenizer-cache")


@pytest.fixture(scope="session")
def tiny_model(demo_spec, tokenizer_cache, tmp_path_factory) -> Path:
    """The demo spec's base model (2 layers, hidden 256, GQA, llama3 rope scaling)."""
    from release import scaffold

    out = tmp_path_factory.mktemp("tiny")
    scaffold.write_model(out, demo_spec.base.scaffold, demo_spec.chat, tokenizer_cache=tokenizer_cache)
    return out


@pytest.fixture(scope="session")
def tiny_sharded(demo_spec, tokenizer_cache, tmp_path_factory) -> Path:
    """The same model split into ~40 MB shards with an index."""
    from release import scaffold

    out = tmp_path_factory.mktemp("tiny-sharded")
    scaffold.write_model(out, demo_spec.base.scaffold, demo_spec.chat, max_shard_bytes=40_000_000,
                         tokenizer_cache=tokenizer_cache)
    return out


def demo_release(folder: Path, base_model: Path, text: str | None = None) -> Path:
    """A copy of the demo spec (or ``text``) with its bundled corpora in ``folder``, and
    ``base_model`` in place as its built base stage; returns the spec file."""
    import shutil

    path = write_spec(folder / "specs", text)
    shutil.copytree(SPECS / "demo", folder / "specs" / "demo", dirs_exist_ok=True)
    from release import pipeline, spec

    target = pipeline.folder(spec.load(path), "base")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(base_model, target)
    return path


def demo_copy(folder: Path) -> Path:
    """The demo spec and its bundled corpora in ``folder``, building into ``folder/build``."""
    import shutil

    text = (SPECS / "demo.toml").read_text(encoding="utf-8").replace('dir = "../build"', 'dir = "build"')
    spec = write_spec(folder, text)
    shutil.copytree(SPECS / "demo", folder / "demo")
    return spec


def release_cmd(spec: Path, task: str = "release") -> list[str]:
    import sys

    return [sys.executable, "-m", "invoke", "--search-root", str(ROOT), task, "--spec", str(spec)]


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory):
    """The whole demo release, built once per test run by `invoke release` as a user runs it:
    ``(spec file, the finished process, seconds)``. Tests that only read a release share it and
    must not write into its build folder (copy it first: ``linked_copy``)."""
    import subprocess
    import time

    folder = tmp_path_factory.mktemp("demo-build")
    spec = demo_copy(folder)
    start = time.perf_counter()
    done = subprocess.run(release_cmd(spec), cwd=folder, capture_output=True, text=True, timeout=1800)
    return spec, done, time.perf_counter() - start


@pytest.fixture(scope="session")
def demo_built(demo_build):
    """The shared demo release's spec, loaded, once the release succeeded."""
    from release import spec

    path, done, _ = demo_build
    assert done.returncode == 0, done.stderr[-3000:]
    return spec.load(path)


def linked_copy(spec_path: Path, folder: Path, text: str | None = None) -> Path:
    """A copy of a built release in ``folder``: the spec (or ``text``) and the files it names, and
    the build folder as hard links, so a stage that runs there replaces its own folder (built
    aside, renamed in) and leaves the original's files as they were."""
    import os
    import shutil

    shutil.copytree(spec_path.parent, folder, ignore=shutil.ignore_patterns("build"))
    if text is not None:
        (folder / spec_path.name).write_text(text, encoding="utf-8")
    shutil.copytree(spec_path.parent / "build", folder / "build", copy_function=os.link)
    return folder / spec_path.name
