"""The dependency set installs together on a CPU-only machine: CPU torch, no torchvision, and
Unsloth importable through its CPU fallback."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_torch_is_the_pinned_cpu_build():
    import torch

    assert torch.__version__ == "2.13.0+cpu"
    assert not torch.cuda.is_available()
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in pins


def test_cuda_only_wheels_are_absent():
    # PyPI's torchvision fails to import beside the CPU torch; unsloth works without it.
    assert importlib.util.find_spec("torchvision") is None
    assert importlib.util.find_spec("xformers") is None


def test_installed_versions_match_the_constraints():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    for name in ("transformers", "trl", "datasets", "peft", "bitsandbytes", "llama-cpp-python",
                 "huggingface-hub", "unsloth", "unsloth-zoo", "gguf", "safetensors"):
        assert importlib.metadata.version(name) == pins[name], name


def test_packages_import_and_unsloth_selects_its_cpu_fallback(tmp_path):
    code = ("import release, training\n"
            "from unsloth import FastLanguageModel\n"
            "print('ok')\n")
    # Unsloth writes a compiled-code cache into the working directory: keep it out of the checkout.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
    assert "no GPU found, training on CPU" in out.stdout + out.stderr


def test_inv_builds_llama_cpps_imatrix_and_quantize_tools_for_the_installed_version():
    """./inv compiles llama-imatrix and llama-quantize from llama-cpp-python's sdist
    (release/llamatools.py); they run against the libllama it installed."""
    from release import llamatools

    assert "python -m release.llamatools" in (ROOT / "inv").read_text()
    assert llamatools.built() == llamatools.wanted(), "run ./inv: the tools are missing or stale"
    for name in llamatools.TOOLS:
        exe = llamatools.tool(name)
        assert exe.parent == llamatools.bin_dir()
        out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
        assert "usage" in (out.stdout + out.stderr).lower(), out.stderr[-1000:]
        linked = subprocess.run(["ldd", str(exe)], capture_output=True, text=True).stdout
        found = dict(line.split()[0:3:2] for line in linked.splitlines() if " => " in line)
        assert Path(found["libllama.so.0"]).resolve() == (llamatools.lib_dir() / "libllama.so.0").resolve(), linked
    # a second install is a no-op: nothing compiles at release time or on the next ./inv
    assert llamatools.install() is False
