"""Build layout, manifests and atomic writes: the contract between stages.

Each stage writes into ``build/<release>/<stage>/`` and finishes by writing ``manifest.json``
(the inputs it read, the spec sections it used, tool versions, every output file with size and
sha256, and measured figures). A stage is built in a sibling ``.<stage>.partial`` folder and
renamed into place only when complete, so an interrupted stage never leaves files that a later
stage could take for finished ones. A stage whose manifest matches its inputs is skipped.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib.metadata
import json
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from release.errors import DiskFull, StageError

MANIFEST = "manifest.json"
SCHEMA = 1


@dataclass(frozen=True)
class Traits:
    """What a stage declares about how it runs (``TRAITS`` in its module), read by the pipeline
    and the docker runner instead of checking stage names."""

    image: str = "release"  # the container image it runs in: ``release`` (CPU) or ``train``
    gpu: bool = False  # asks for the GPUs in a container
    distributed: bool = False  # may run as many processes and hosts (torchrun)
    clustered: bool = False  # may hand its work to a Ray or Slurm cluster (``run_with(..., executor=)``)
    publishes: bool = False  # has a ``push`` that uploads what ``run`` planned


def stage_dir(build_dir: Path, name: str) -> Path:
    """``build/<release>/<stage>``: where stage ``name`` writes. The one folder rule."""
    return Path(build_dir) / name


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the stage folder, '/' separated
    size: int
    sha256: str


@dataclass
class Manifest:
    stage: str
    release: str
    fingerprint: str  # sha256 over spec sections, inputs and tool versions
    inputs: dict[str, str]  # input name -> sha256 (of a file, or of a manifest's outputs)
    spec_sections: dict[str, str]  # dotted spec key -> section hash
    tools: dict[str, str]
    outputs: list[FileEntry] = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    seconds: float = 0.0
    schema: int = SCHEMA
    # True when this run built the stage, False when it was up to date; not written to the file
    built: bool = field(default=False, compare=False)

    def to_json(self) -> str:
        data = asdict(self)
        del data["built"]
        return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        data.pop("built", None)
        data["outputs"] = [FileEntry(**e) for e in data.get("outputs", [])]
        return cls(**data)

    def digest(self) -> str:
        """One sha256 for all outputs: what a downstream stage records as this input."""
        h = hashlib.sha256()
        for e in sorted(self.outputs, key=lambda e: e.path):
            h.update(f"{e.path}\0{e.size}\0{e.sha256}\n".encode())
        return h.hexdigest()


# --- hashing and atomic writes ----------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    log = os.environ.get(HASH_LOG)
    if log:  # benchmarks/signing.py counts how often each published byte is read again, and by whom
        import sys

        caller = Path(sys._getframe(1).f_code.co_filename).name
        with open(log, "a", encoding="utf-8") as fh:
            st = os.stat(path)
            fh.write(f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}\t{st.st_size}\t{caller}\t{path}\n")
    return h.hexdigest()


HASH_LOG = "QALB_HASH_LOG"  # a file each full hash of a file is appended to (benchmarks only)

# Digests of files hashed while they were written (HashingFile), by (device, inode): the stage
# records them without reading the file again, while its size and mtime are still those written.
_WRITTEN: dict[tuple[int, int], tuple[int, int, str]] = {}


class HashingFile:
    """A binary file being written, hashed on the way. The digest holds while writes are
    sequential; a write anywhere else (a header patched at the end) drops it, and the stage reads
    the file once more to hash it. Wraps an open file: ``HashingFile(open(path, "wb"))``."""

    def __init__(self, raw):
        self._raw = raw
        self._h = hashlib.sha256()
        self._hashed = 0  # bytes hashed, all from offset 0
        self._valid = True

    def write(self, data) -> int:
        pos = self._raw.tell()
        n = self._raw.write(data)
        if self._valid and pos == self._hashed:
            self._h.update(data)
            self._hashed += n
        elif pos < self._hashed:  # overwriting hashed bytes
            self._valid = False
        elif pos > self._hashed:  # a hole, filled later
            self._valid = False
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def truncate(self, size: int | None = None) -> int:
        out = self._raw.truncate(size)
        if out < self._hashed:
            self._valid = False
        return out

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        if self._raw.closed:
            return
        self._raw.flush()
        st = os.fstat(self._raw.fileno())
        self._raw.close()
        if self._valid and st.st_size == self._hashed:
            _WRITTEN[(st.st_dev, st.st_ino)] = (st.st_size, st.st_mtime_ns, self._h.hexdigest())

    @property
    def closed(self) -> bool:
        return self._raw.closed

    def __enter__(self) -> "HashingFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def written_sha256(path: Path) -> str | None:
    """The digest of ``path`` taken while it was written, if the file is still as written."""
    st = os.stat(path)
    rec = _WRITTEN.get((st.st_dev, st.st_ino))
    return rec[2] if rec and rec[:2] == (st.st_size, st.st_mtime_ns) else None


def output_sha256(path: Path) -> str:
    """sha256 of a file this stage wrote: taken while it was written, or read once now and kept
    for the manifest, so that no file is hashed twice."""
    digest = written_sha256(path)
    if digest is None:
        digest = sha256_file(path)
        st = os.stat(path)
        _WRITTEN[(st.st_dev, st.st_ino)] = (st.st_size, st.st_mtime_ns, digest)
    return digest


def recorded_sha256(path: Path, stop: Path) -> str | None:
    """The sha256 a stage's manifest records for ``path`` (or a hard link to it), when the file is
    as the stage wrote it: same size, not modified since the manifest was written (the rule of
    ``check_outputs``). Looked up in the nearest folder above ``path``, up to ``stop``, that has
    a manifest. None: hash it."""
    path = Path(path)
    for folder in path.parents:
        if not folder.is_relative_to(stop):
            return None
        m = folder / MANIFEST
        if m.is_file():
            manifest = read_manifest(folder)
            rel = path.relative_to(folder).as_posix()
            entry = next((e for e in manifest.outputs if e.path == rel), None) if manifest else None
            try:
                st, written = path.stat(), m.stat().st_mtime_ns
            except OSError:
                return None
            if entry is None or st.st_size != entry.size or st.st_mtime_ns > written:
                return None
            return entry.sha256
    return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success fsync it and rename it over ``dest``.
    On error the temporary file is removed and ``dest`` is untouched."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(dest: Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(dest: Path, data: object) -> None:
    write_text(dest, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# --- progress and memory, for the stages' figures ------------------------------------------------


def track(items: list, enabled: bool, desc: str):
    """``items`` with a transient rich progress bar when ``enabled``."""
    if not enabled:
        return items
    from rich.progress import track as rich_track

    return rich_track(items, description=desc, transient=True)


def summary_console():
    """A rich console for summaries: the terminal's width, or 200 columns when piped to a log
    (rich's default of 80 would truncate repo names and paths, the very things a log is read for)."""
    from rich.console import Console

    return Console(width=None if Console().is_terminal else 200)


def human_bytes(n: float) -> str:
    """Decimal units, as the Hub and disk tools show sizes."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; getrusage would include a parent's at fork)."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# --- stages -----------------------------------------------------------------------------------


@functools.cache
def toolchain() -> str:
    """This project's distribution name, as installed from pyproject.toml."""
    return importlib.metadata.packages_distributions()[__name__.partition(".")[0]][0]


def tool_versions(*packages: str) -> dict[str, str]:
    out = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def fingerprint(inputs: dict[str, str], spec_sections: dict[str, str], tools: dict[str, str]) -> str:
    blob = json.dumps({"inputs": inputs, "spec": spec_sections, "tools": tools}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def built_elsewhere(before: Manifest | None, after: Manifest) -> Manifest:
    """``after``, read back once another process (torchrun's rank 0, a container) ran the stage,
    with ``built`` set when that process wrote a new manifest."""
    after.built = before is None or before.to_json() != after.to_json()
    return after


def read_manifest(stage_dir: Path) -> Manifest | None:
    """The stage's manifest; None when there is none or it is damaged (truncated, not JSON, not
    a manifest), so that the stage counts as unbuilt and is rebuilt, as after an interrupted run."""
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = Manifest.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return m if isinstance(m.outputs, list) and isinstance(m.figures, dict) else None


def check_outputs(stage_dir: Path, manifest: Manifest, deep: bool = False) -> list[str]:
    """Problems with the files a manifest lists: missing, resized, or changed bytes.

    Bytes are hashed again for a file modified after the manifest was written (its mtime is
    newer: an edit by hand at the same size), as git re-reads a file whose stat changed, and for
    every file with ``deep`` (``./inv release --check``: also a change that kept the old mtime,
    or bit rot). Hashing every file on every run would read the whole release (16 GB at 8B)
    just to skip it."""
    problems = []
    try:
        written = (Path(stage_dir) / MANIFEST).stat().st_mtime_ns
    except OSError:
        written = 0
    for e in manifest.outputs:
        p = Path(stage_dir) / e.path
        try:
            st = p.stat()
        except OSError:
            st = None
        if st is None or not p.is_file():
            problems.append(f"{p}: missing")
        elif st.st_size != e.size:
            problems.append(f"{p}: size {st.st_size} != {e.size} in the manifest")
        elif (deep or st.st_mtime_ns > written) and sha256_file(p) != e.sha256:
            problems.append(f"{p}: sha256 differs from the manifest")
    return problems


def input_digest(path: Path) -> str:
    """sha256 naming an input: a stage folder counts by its manifest's digest, a file by its
    bytes, a folder without a manifest by its files' names and bytes."""
    path = Path(path)
    if path.is_dir():
        m = read_manifest(path)
        if m is not None:
            return m.digest()
        # a folder inside a stage (merge/bf16): its entries of the stage's manifest, when intact
        m = read_manifest(path.parent)
        if m is not None and not check_outputs(path.parent, m):
            inside = [e for e in m.outputs if e.path.startswith(f"{path.name}/")]
            if inside:
                return Manifest(m.stage, m.release, "", {}, {}, {}, inside).digest()
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
        return h.hexdigest()
    if path.is_file():
        return sha256_file(path)
    raise StageError(f"{path}: input not found; build the stage that makes it first")


def stage_key(inputs: dict[str, Path] | None, spec_sections: dict[str, str] | None, tools: tuple[str, ...]) -> str:
    """The fingerprint a stage's manifest records: its inputs' digests, its spec sections, and the
    versions of its tools and of the toolchain itself (bump that when a stage's output changes,
    and releases rebuild)."""
    digests = {k: input_digest(v) for k, v in (inputs or {}).items()}
    return fingerprint(digests, dict(spec_sections or {}), tool_versions(toolchain(), *tools))


def kept(stage_dir: Path, key: str) -> Manifest | None:
    """The manifest of ``stage_dir`` when it records ``key`` and its outputs are intact, else None."""
    old = read_manifest(stage_dir)
    return old if old is not None and old.fingerprint == key and not check_outputs(stage_dir, old) else None


def current(stage_dir: Path, *, inputs: dict[str, Path] | None = None, spec_sections: dict[str, str] | None = None,
            tools: tuple[str, ...] = ()) -> Manifest | None:
    """The manifest of ``stage_dir`` when ``run_stage`` with these arguments would keep it, else
    None: a caller can skip starting a process for nothing."""
    return kept(stage_dir, stage_key(inputs, spec_sections, tools))


def run_stage(
    name: str,
    stage_dir: Path,
    build: Callable[[Path], dict | None],
    *,
    release: str,
    inputs: dict[str, Path] | None = None,
    spec_sections: dict[str, str] | None = None,
    tools: tuple[str, ...] = (),
    force: bool = False,
) -> Manifest:
    """Run ``build(partial_dir)`` unless ``stage_dir`` holds a manifest with the same fingerprint
    and intact outputs. Returns the manifest; its ``built`` says whether this call built it.

    ``build`` writes its files into the folder it is given and may return figures for the
    manifest. Its folder replaces ``stage_dir`` only after the manifest is written and synced.
    """
    stage_dir = Path(stage_dir)
    digests = {k: input_digest(v) for k, v in (inputs or {}).items()}
    sections = dict(spec_sections or {})
    versions = tool_versions(toolchain(), *tools)
    fp = fingerprint(digests, sections, versions)  # as stage_key computes it

    old = None if force else kept(stage_dir, fp)
    if old is not None:
        return old

    partial = stage_dir.with_name(f".{stage_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    start = time.perf_counter()
    try:
        figures = build(partial) or {}
        outputs = []
        for f in sorted(p for p in partial.rglob("*") if p.is_file()):
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            digest = written_sha256(f) or sha256_file(f)  # hashed while written, or read once more
            outputs.append(FileEntry(f.relative_to(partial).as_posix(), f.stat().st_size, digest))
        manifest = Manifest(name, release, fp, digests, sections, versions, outputs, figures,
                            round(time.perf_counter() - start, 3))
        write_text(partial / MANIFEST, manifest.to_json())
        for d in {partial, *((partial / e.path).parent for e in outputs)}:
            fsync_dir(d)
        _swap_in(partial, stage_dir)
    except BaseException as e:
        full = disk_full(e, partial)
        shutil.rmtree(partial, ignore_errors=True)
        if full:
            free = shutil.disk_usage(stage_dir.parent).free
            raise DiskFull(f"{name}: the disk filled while writing {partial} ({human_bytes(free)} free now that "
                           "the unfinished stage is removed; earlier stages are kept); free space and run the same "
                           "command to resume") from e
        raise
    manifest.built = True
    return manifest


NEARLY_FULL = 16 << 20  # bytes: below this, a failed write is taken for a full disk


def full_disk_cause(folder: Path) -> OSError | None:
    """For a child process that failed writing into ``folder`` (llama.cpp's tools report a full
    disk only as an exit status): an ``ENOSPC`` error to chain when the disk is nearly full now,
    checked before the caller removes its unfinished file and so frees the space it took."""
    try:
        full = shutil.disk_usage(folder).free < NEARLY_FULL
    except OSError:
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder)) if full else None


def disk_full(error: BaseException, folder: Path) -> bool:
    """Whether ``error`` (or what caused it) is a full disk: ``ENOSPC`` anywhere in its chain, or
    any failure while ``folder``'s filesystem is nearly full. The second covers the writers that
    do not say ENOSPC: safetensors' and torch's writers, llama.cpp's tools (an exit status)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC or "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    if not isinstance(error, Exception):  # an interrupt is never a full disk
        return False
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL
    except OSError:
        return False


def remove_leftovers(build_dir: Path) -> list[Path]:
    """Remove what dead runs left in ``build_dir``: unfinished ``.<stage>.partial`` folders and
    retired ``.<stage>.old`` ones (their stages are rebuilt or were swapped in). Only the holder of
    the build folder's lock may call this: another run's partial folder is its work in progress."""
    found = sorted(p for pattern in (".*.partial", ".*.old") for p in Path(build_dir).glob(pattern) if p.is_dir())
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return found


def _swap_in(partial: Path, stage_dir: Path) -> None:
    """Replace ``stage_dir`` by ``partial``. At no moment does ``stage_dir`` hold a mix."""
    retired = stage_dir.with_name(f".{stage_dir.name}.old")
    shutil.rmtree(retired, ignore_errors=True)
    if stage_dir.exists():
        os.replace(stage_dir, retired)
    os.replace(partial, stage_dir)
    fsync_dir(stage_dir.parent)
    shutil.rmtree(retired, ignore_errors=True)
