"""llama.cpp's ``llama-imatrix`` and ``llama-quantize``, built once at install time.

llama-cpp-python exposes llama.cpp's quantizer, but neither the importance-matrix computation nor
quantization guided by one. Its source distribution carries llama.cpp's sources, tools included,
so ``./inv`` builds these two tools from the sdist of the installed version (pip's cache serves
it) with ``python -m release.llamatools``. Only the two tools and llama.cpp's ``common`` library
are compiled; they link against the ``libllama``/``libggml`` that llama-cpp-python installed, so
they run the very quantizer and CPU kernels the rest of the toolchain uses, and no ggml is
compiled (its CPU-feature choice is the installed wheel's). The release itself never runs a
compiler: a missing or stale tool is an error that says to run ./inv.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

from release.errors import GGUFError

TOOLS = ("llama-imatrix", "llama-quantize")
PACKAGE = "llama-cpp-python"
RECORD = "llama-tools.json"  # beside the tools: what they were built from

# The build: upstream's own CMake files for the vendored libraries, common and the two tools,
# with the installed shared libraries standing in for the `llama` target. `common` holds argument
# parsing, chat templates and downloads, code the tools barely run; compiling it unoptimised
# takes 2 min 45 s of CPU here instead of 3 min 50 s (the tools' own code keeps -O3).
CMAKE = """\
cmake_minimum_required(VERSION 3.21)
project(qalb-llama-tools C CXX)
set(LLAMA_VERSION_BASE 0.0.0)
set(LLAMA_VERSION_MAJOR 0)
set(LLAMA_BUILD_NUMBER 0)
set(BUILD_COMPILER "${CMAKE_CXX_COMPILER_ID} ${CMAKE_CXX_COMPILER_VERSION}")
set(BUILD_TARGET "${CMAKE_SYSTEM_NAME} ${CMAKE_SYSTEM_PROCESSOR}")
set(BUILD_SHARED_LIBS OFF)
set(LLAMA_BUILD_COMMON ON)
set(LLAMA_OPENSSL OFF)
set(LLAMA_TOOLS_INSTALL OFF)
function(llama_add_compile_flags)  # upstream's adds warning and sanitizer flags only
endfunction()
include(${LLAMA_SRC}/cmake/license.cmake)
find_package(Threads REQUIRED)
foreach(lib ggml-base ggml llama)
  add_library(${lib} SHARED IMPORTED)
  set_target_properties(${lib} PROPERTIES IMPORTED_LOCATION ${LLAMA_LIB}/lib${lib}.so)
endforeach()
set_target_properties(llama PROPERTIES
  INTERFACE_INCLUDE_DIRECTORIES "${LLAMA_SRC}/include;${LLAMA_SRC}/ggml/include"
  INTERFACE_LINK_LIBRARIES "ggml;ggml-base")
set(CMAKE_BUILD_WITH_INSTALL_RPATH ON)
set(CMAKE_INSTALL_RPATH "${TOOLS_RPATH}")
add_subdirectory(${LLAMA_SRC}/vendor vendor)
add_subdirectory(${LLAMA_SRC}/common common)
add_subdirectory(${LLAMA_SRC}/tools/imatrix imatrix)
add_subdirectory(${LLAMA_SRC}/tools/quantize quantize)
foreach(lib llama-common llama-common-base cpp-httplib vendor-hash)
  target_compile_options(${lib} PRIVATE -O0)
endforeach()
"""
# what of the sdist's vendor/llama.cpp the build reads
SOURCES = ("include/", "ggml/include/", "src/llama-ext.h", "common/", "vendor/", "tools/imatrix/", "tools/quantize/",
           "cmake/license.cmake", "LICENSE")


def bin_dir() -> Path:
    """The environment's scripts folder (``.venv/bin``), where the tools go."""
    return Path(sysconfig.get_path("scripts"))


def lib_dir() -> Path:
    """llama-cpp-python's shared libraries (found without importing it, which loads them)."""
    found = importlib.util.find_spec("llama_cpp")
    if found is None or not found.submodule_search_locations:
        raise GGUFError(f"{PACKAGE} is not installed; run ./inv")
    return Path(next(iter(found.submodule_search_locations))) / "lib"


def wanted() -> dict[str, str]:
    """What tools built now would record: the installed version and this build recipe."""
    return {PACKAGE: importlib.metadata.version(PACKAGE),
            "recipe": hashlib.sha256(CMAKE.encode()).hexdigest()[:16]}


def built() -> dict[str, str] | None:
    """The record of the installed tools, or None when they are missing."""
    record = bin_dir() / RECORD
    if not record.is_file() or not all((bin_dir() / t).is_file() for t in TOOLS):
        return None
    return json.loads(record.read_text(encoding="utf-8"))


def tool(name: str) -> Path:
    """Path of an installed tool; a one-line error naming the fix when it is missing or was built
    for another llama-cpp-python (its library interface changes between versions)."""
    path = bin_dir() / name
    have = built()
    if have is None:
        raise GGUFError(f"{path}: llama.cpp's {name} is not installed; run ./inv to build it "
                        f"(from {PACKAGE}'s source, a few minutes once)")
    if have.get(PACKAGE) != wanted()[PACKAGE]:
        raise GGUFError(f"{path}: built for {PACKAGE} {have.get(PACKAGE)}, but {wanted()[PACKAGE]} is installed; "
                        "run ./inv to build it again")
    return path


# --- the build ---------------------------------------------------------------------------------


def sdist(version: str, dest: Path) -> Path:
    """llama-cpp-python's source distribution of ``version``, from pip's cache or the index."""
    out = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                          "--no-deps", "--no-binary", PACKAGE, "-d", str(dest), f"{PACKAGE}=={version}"],
                         capture_output=True, text=True)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if out.returncode != 0 or not found:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise GGUFError(f"pip could not download {PACKAGE}=={version}'s source ({last})")
    return found[0]


def extract(archive: Path, dest: Path, keep: tuple[str, ...] = SOURCES,
            expect: str = "tools/imatrix/imatrix.cpp") -> Path:
    """The parts (``keep``) of the sdist's ``vendor/llama.cpp`` into ``dest``: by default what the
    tools' build reads. ``expect`` is a file that must be among them."""
    prefix = f"{archive.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    with tarfile.open(archive) as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name.removeprefix(prefix)
            if m.name.startswith(prefix) and (m.isfile() or m.isdir()) and rel.startswith(keep):
                m.name = rel
                members.append(m)
        # extraction filters came with Python 3.11.4 (Debian 12's is 3.11.2); without them the
        # members are still only plain files and folders under the known source folders
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **safe)
    if not (dest / expect).is_file():
        raise GGUFError(f"{archive}: no vendor/llama.cpp/{expect} inside")
    return dest


def cmake() -> str:
    """The cmake program (checked before anything is downloaded)."""
    found = shutil.which("cmake")
    if found is None:
        raise GGUFError("cmake is not installed (apt-get install cmake, or pip install cmake); "
                        "it builds llama.cpp's imatrix and quantize tools")
    return found


def compile_tools(src: Path, work: Path, version: str, jobs: int) -> dict[str, Path]:
    """Configure and build the two tools in ``work``; their paths. The log stays in ``work``."""
    (work / "project").mkdir()
    (work / "project" / "CMakeLists.txt").write_text(CMAKE, encoding="utf-8")
    rpath = "$ORIGIN/" + os.path.relpath(lib_dir(), bin_dir())
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    steps = [
        [cmake(), "-S", str(work / "project"), "-B", str(work / "build"), *generator, "-DCMAKE_BUILD_TYPE=Release",
         f"-DLLAMA_SRC={src}", f"-DLLAMA_LIB={lib_dir()}", f"-DTOOLS_RPATH={rpath}",
         f"-DLLAMA_BUILD_COMMIT={PACKAGE}-{version}"],
        [cmake(), "--build", str(work / "build"), "--parallel", str(jobs), "--target", *TOOLS],
    ]
    log = work / "build.log"
    with open(log, "w", encoding="utf-8") as fh:
        for cmd in steps:
            if subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode != 0:
                tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
                raise GGUFError(f"building llama.cpp's tools failed ({' '.join(tail) or 'no output'}); "
                                f"the full log is {log}")
    return {t: work / "build" / t.removeprefix("llama-") / t for t in TOOLS}


def install(jobs: int | None = None, force: bool = False) -> bool:
    """Build the tools into the environment's bin folder unless they are there for the installed
    llama-cpp-python already. Returns whether it built."""
    want = wanted()
    if not force and built() == want:
        (bin_dir() / RECORD).touch()  # checked against this install: ./inv stops asking
        return False
    version = want[PACKAGE]
    cmake()
    start = time.perf_counter()
    print(f"inv: building {' and '.join(TOOLS)} from {PACKAGE} {version}'s source (a few minutes, once)",
          file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="llama-tools-"))
    exes = compile_tools(extract(sdist(version, work / "sdist"), work / "src"), work, version,
                         jobs or os.cpu_count() or 2)
    for name, exe in exes.items():
        tmp = bin_dir() / f".{name}.tmp"
        shutil.copy2(exe, tmp)
        os.replace(tmp, bin_dir() / name)
    (bin_dir() / RECORD).write_text(json.dumps(want, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(work, ignore_errors=True)
    print(f"inv: built {', '.join(TOOLS)} into {bin_dir()} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return True


def main(argv: list[str]) -> int:
    """``python -m release.llamatools [--force] [--jobs N]``: what ./inv runs after its pip installs."""
    force = "--force" in argv
    jobs = int(argv[argv.index("--jobs") + 1]) if "--jobs" in argv else None
    try:
        install(jobs, force)
    except GGUFError as e:
        print(f"inv: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
