"""The dependency set installs together on a CPU-only machine: CPU torch, no torchvision, and
Unsloth importable through its CPU fallback."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys

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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
    assert "no GPU found, training on CPU" in out.stdout + out.stderr
