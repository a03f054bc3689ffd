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


def start(model_dir: Path, outfile: Path, *extra: str) -> subprocess.Popen:
    """Start llama.cpp's converter as a subprocess with its own gguf-py first on the path (several
    may run at once: each is one Python process, mostly on one core)."""
    ref = converter_dir()
    env = {"PYTHONPATH": str(ref / "gguf-py"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.Popen([sys.executable, str(ref / "convert_hf_to_gguf.py"), str(model_dir),
                             "--outfile", str(outfile), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait for a converter ``start`` started; raise as ``check=True`` would when it failed."""
    out, err = proc.communicate()
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, out, err)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def convert(model_dir: Path, outfile: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run llama.cpp's converter to the end."""
    return finish(start(model_dir, outfile, *extra))
