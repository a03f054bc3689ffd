"""The code is clean under the project's ruff configuration (pyproject.toml: pycodestyle at 120
columns, pyflakes, bugbear, import order, and BLE001 against blind `except Exception`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def _ruff() -> str:
    exe = Path(sys.executable).with_name("ruff")
    if exe.is_file():
        return str(exe)
    found = shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: it is in the [dev] extra (./inv installs it)")
    return found


def test_ruff_finds_nothing():
    out = subprocess.run([_ruff(), "check", "--no-cache", "--output-format", "concise", "."], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]


def test_ruff_refuses_a_blind_except(tmp_path):
    """The rule set catches what it is there for (the check above can fail)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    try:\n        return 1\n    except Exception:\n        return 2\n", encoding="utf-8")
    out = subprocess.run([_ruff(), "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(bad)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "BLE001" in out.stdout, out.stdout
