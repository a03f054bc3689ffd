"""llama.cpp's own converter, as the reference: taken from llama-cpp-python's source
distribution of the installed version (its ``vendor/llama.cpp``), fetched from the package index
with pip (pip's cache serves repeats) and unpacked once under ``build/.cache``."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

from release import llamatools

ROOT = Path(__file__).resolve().parent.parent
KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def converter_dir() -> Path:
    """Folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/ of the installed version."""
    version = importlib.metadata.version("llama-cpp-python")
    dest = ROOT / "build" / ".cache" / f"llama.cpp-{version}"
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    dl = dest.with_name(dest.name + ".download")
    dl.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    llamatools.extract(llamatools.sdist(version, dl), tmp, keep=KEEP, expect="convert_hf_to_gguf.py")
    tmp.rename(dest)
    return dest


def convert(model_dir: Path, outfile: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run llama.cpp's converter as a subprocess with its own gguf-py first on the path."""
    ref = converter_dir()
    env = {"PYTHONPATH": str(ref / "gguf-py"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(ref / "convert_hf_to_gguf.py"), str(model_dir),
                           "--outfile", str(outfile), *extra],
                          capture_output=True, text=True, env=env, check=True)
