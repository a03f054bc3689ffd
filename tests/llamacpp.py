"""llama.cpp's own converter, as the reference: taken from llama-cpp-python's source
distribution of the installed version (its ``vendor/llama.cpp``), fetched from the package index
with pip (pip's cache serves repeats) and unpacked once under ``build/.cache``."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from release.artifacts import StageError

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
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    "-d", str(dl), f"llama-cpp-python=={version}"], check=True)
    (sdist,) = dl.glob("llama_cpp_python-*.tar.gz")
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name.removeprefix(prefix)
            if m.name.startswith(prefix) and (m.isfile() or m.isdir()) and rel.startswith(KEEP):
                m.name = rel
                members.append(m)
        tar.extractall(tmp, members=members, filter="data")
    if not (tmp / "convert_hf_to_gguf.py").is_file():
        raise StageError(f"{sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py inside")
    tmp.rename(dest)
    return dest


def convert(model_dir: Path, outfile: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run llama.cpp's converter as a subprocess with its own gguf-py first on the path."""
    ref = converter_dir()
    env = {"PYTHONPATH": str(ref / "gguf-py"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(ref / "convert_hf_to_gguf.py"), str(model_dir),
                           "--outfile", str(outfile), *extra],
                          capture_output=True, text=True, env=env, check=True)
