"""Ollama's template engine for the tests: Go's text/template, driven the way Ollama's server
drives it (see ollama_render/main.go). Needs Go (Debian's golang-go); built once per session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def build(dest: Path) -> Path:
    go = shutil.which("go")
    if go is None:
        msg = "Go is not installed (Debian: apt-get install golang-go; ./inv installs it when run as root)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    exe = dest / "ollama_render"
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOCACHE": str(dest / "gocache"), "GOPATH": str(dest / "gopath")}
    subprocess.run([go, "build", "-o", str(exe), "."], cwd=HERE / "ollama_render", check=True, env=env,
                   capture_output=True, text=True)
    return exe


def render(exe: Path, template: str, system: str, cases: list[dict]) -> list[str]:
    """Each case is {"messages": [...]} (chat) or {"prompt": "..."} (legacy)."""
    out = subprocess.run([str(exe)], input=json.dumps({"template": template, "system": system, "cases": cases}),
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise AssertionError(f"Go template rendering failed: {out.stderr}")
    return json.loads(out.stdout)
