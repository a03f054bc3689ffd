"""Safetensors files, read and written a block of rows at a time: the one module that knows the format.

``read_header`` parses a file's header (for ``SafetensorsReader``, ``count_parameters``); the reader
returns tensors or row ranges of them; ``ShardWriter`` writes one file and ``ShardedWriter`` a
sharded model with its index (merge, bnb4 and the scaffold write through them).

``safetensors.torch.save_file`` needs every tensor of a file in memory at once; a 5 GB shard of an
8B model would then cost 5 GB of RAM. The header only needs names, dtypes and shapes, so it is
written first and each tensor's bytes follow as soon as they exist. Files are read back by the
``safetensors`` library itself in the tests.
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import struct
import threading
import warnings
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from release.artifacts import HashingFile, write_json

DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
               torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64"}
INDEX = "model.safetensors.index.json"
MAX_HEADER = 100_000_000  # the safetensors library's own limit
QUEUE_BYTES = 64 << 20  # what a background writer may hold queued: a few blocks of rows


@dataclass(frozen=True)
class Entry:
    """A planned tensor. ``variable``: its length is known only once it is computed (a
    bitsandbytes quantization state) and ``shape[0]`` is its most; such tensors are laid out after
    the fixed-size ones (see ``ShardWriter``)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    variable: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


# --- layout -----------------------------------------------------------------------------------


def plan(entries: Iterable[Entry], max_shard_bytes: int | None) -> list[list[Entry]]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` (a single larger
    tensor gets a shard of its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if max_shard_bytes and shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def file_names(count: int) -> list[str]:
    """transformers' names: ``model.safetensors`` or ``model-00001-of-00003.safetensors``."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def header(entries: Iterable[Entry], metadata: dict[str, str] | None = None, pad_to: int = 0) -> bytes:
    """The safetensors header (without its 8-byte length) for ``entries`` laid out in order,
    padded with spaces to a multiple of 8, or to ``pad_to`` bytes when that is longer."""
    out: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for e in entries:
        out[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape),
                       "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(out, separators=(",", ":")).encode()
    return blob + b" " * (max(pad_to, len(blob) + (-len(blob) % 8)) - len(blob))


def row_blocks(rows: int, row_size: int, budget: int, min_rows: int = 1) -> list[tuple[int, int]]:
    """``[r0, r1)`` ranges splitting ``rows`` evenly into blocks of at most
    ``max(min_rows, budget // row_size)`` rows (``row_size`` and ``budget`` in one unit: bytes,
    elements), so each block has at least half that many rows, or all of them."""
    step = max(min_rows, budget // max(row_size, 1), 1)
    n = max(1, math.ceil(rows / step))
    edges = [round(i * rows / n) for i in range(n + 1)]
    return list(itertools.pairwise(edges))


# --- reading ----------------------------------------------------------------------------------


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """A file's tensors (name -> ``dtype``, ``shape``, ``data_offsets``), its ``__metadata__``,
    and where its data starts (8 + the header's length)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{len(raw)} bytes, shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise ValueError(f"header of {n} bytes")
        tensors = json.loads(f.read(n))
    if not isinstance(tensors, dict):
        raise ValueError("the header is not a JSON object")
    metadata = tensors.pop("__metadata__", None) or {}
    return tensors, metadata, 8 + n


def count_parameters(folder: Path) -> int | None:
    """Weights in a folder's safetensors files, from their headers (nothing loaded); None without any."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    return sum(math.prod(t["shape"]) for f in files for t in read_header(f)[0].values())


def model_files(folder: Path) -> dict[str, Path]:
    """tensor name -> safetensors file of a model folder (single file or index)."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: folder / f for name, f in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors or {INDEX}")
    return {name: single for name in SafetensorsReader(single).keys()}


class SafetensorsReader:
    """Reads tensors, or row ranges of them, each through its own small memory map.

    ``safe_open`` maps the whole file, and every page it touches then counts as resident memory of
    the process until the mapping goes: the whole model, by the end of a merge. Here each read maps
    just the bytes it returns, the mapping lives as long as the tensor does, and ``MAP_POPULATE``
    faults its pages in with one call rather than one fault per page during the arithmetic. So
    memory holds only the blocks in use, and no byte is copied into a second buffer as a plain
    ``read`` would."""

    _DTYPES = {v: k for k, v in DTYPE_NAMES.items()}

    def __init__(self, path: Path):
        self.path = Path(path)
        self.header, self.metadata, self.base = read_header(self.path)
        end = max((v["data_offsets"][1] for v in self.header.values()), default=0)
        size = self.path.stat().st_size
        if size < self.base + end:
            raise ValueError(f"truncated: {size} bytes, the header promises {self.base + end}")

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return self._DTYPES[self.header[name]["dtype"]]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or rows ``[r0, r1)`` of it (first dimension). Read-only: never write to it."""
        info = self.header[name]
        shape = list(info["shape"])
        dtype = self._DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        if rows is not None and shape:
            row_bytes = (end - begin) // max(shape[0], 1)
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape[0] = rows[1] - rows[0]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        start = self.base + begin
        aligned = start - start % mmap.ALLOCATIONGRANULARITY  # mmap offsets must be page-aligned
        with open(self.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), start + (end - begin) - aligned, offset=aligned,
                           flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that the buffer is read-only
            raw = torch.frombuffer(mm, dtype=torch.uint8, offset=start - aligned, count=end - begin)
        return raw.view(dtype).reshape(shape)


# --- writing ----------------------------------------------------------------------------------


def _raw(tensor: torch.Tensor):
    """The tensor's bytes, without a copy when it is contiguous."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


class ShardWriter:
    """Write one safetensors file tensor by tensor, or row block by row block, in any order.

    Fixed-size tensors are laid out in the order given, and each block is written at its place as
    it comes. Variable-size ones (``Entry.variable``) go after them: the header is written first
    with each at its most, and rewritten by ``close`` with the real sizes, padded with spaces to
    the same length (JSON allows the whitespace; safetensors pads its own headers the same way).
    Every data byte is written once; memory holds the block being written and the variable
    tensors, which are small. Without variable tensors the first header is the final one.
    """

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.entries = {e.name: e for e in entries}
        self.fixed = [e for e in entries if not e.variable]
        self.variable: dict[str, tuple[int, bytes] | None] = {e.name: None for e in entries if e.variable}
        self.metadata = metadata
        self.offsets: dict[str, int] = {}
        self.data_bytes = 0  # of the fixed-size tensors
        for e in self.fixed:
            self.offsets[e.name] = self.data_bytes
            self.data_bytes += e.nbytes
        self._done = dict.fromkeys(self.offsets, 0)
        blob = header([*self.fixed, *(self.entries[n] for n in self.variable)], metadata)
        self._start = 8 + len(blob)
        self._file = HashingFile(open(self.path, "wb"))  # hashed as written: the stage need not read it again
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor``, or the next rows of it (a fixed-size tensor may come in row blocks)."""
        e = self.entries.get(name)
        if e is None or tensor.dtype != e.dtype or tensor.dim() != len(e.shape) or \
                tuple(tensor.shape[1:]) != e.shape[1:]:
            planned = f"{e.dtype} {e.shape}" if e else "nothing by that name"
            raise ValueError(f"{self.path.name}: got {name} {tensor.dtype} {tuple(tensor.shape)}, planned {planned}")
        size = tensor.numel() * tensor.element_size()
        if e.variable:
            if self.variable[name] is not None or size > e.nbytes:
                raise ValueError(f"{self.path.name}: {name} written twice or longer than its {e.shape[0]} rows")
            self.variable[name] = (tensor.shape[0], _raw(tensor).tobytes())
            return
        done = self._done[name]
        if done + size > e.nbytes:
            raise ValueError(f"{self.path.name}: more data than {name} {e.shape} holds")
        self._file.seek(self._start + self.offsets[name] + done)
        self._file.write(_raw(tensor).data)
        self._done[name] = done + size

    def close(self) -> int:
        """Finish the file; returns its data bytes. (The stage syncs every output once, before
        its manifest.)"""
        unwritten = [n for n, done in self._done.items() if done != self.entries[n].nbytes]
        unwritten += [n for n, v in self.variable.items() if v is None]
        if unwritten:
            self._file.close()
            raise ValueError(f"{self.path.name}: {len(unwritten)} tensors never (fully) written: {unwritten[:3]}")
        if self.variable:
            self._write_variable()
        self._file.close()
        return self.data_bytes + sum(len(data) for _, data in self.variable.values())

    def _write_variable(self) -> None:
        self._file.seek(self._start + self.data_bytes)
        for _, data in self.variable.values():
            self._file.write(data)
        self._file.truncate()
        real = [Entry(n, self.entries[n].dtype, (rows, *self.entries[n].shape[1:]))
                for n, (rows, _) in self.variable.items()]
        blob = header([*self.fixed, *real], self.metadata, pad_to=self._start - 8)
        if len(blob) != self._start - 8:  # cannot happen: every size and offset is at most its placeholder
            self._file.close()
            raise ValueError(f"{self.path.name}: header grew from {self._start - 8} to {len(blob)} bytes")
        self._file.seek(8)
        self._file.write(blob)

    def abort(self) -> None:
        """Close the file as it is, after a failure elsewhere (the partial file is the caller's)."""
        self._file.close()


class ShardedWriter:
    """A whole model: tensors (or row blocks of them) go to their planned shard, shard after shard
    (a file is finished when the first tensor of the next arrives); ``close`` writes the index.

    With ``background=True`` one thread writes while the caller computes the next block (file writes
    release the GIL). The caller waits while more than ``queue_bytes`` are queued (a larger
    tensor still passes alone), which bounds the memory whatever the sizes of the tensors.
    """

    def __init__(self, folder: Path, entries: list[Entry], max_shard_bytes: int | None,
                 background: bool = False, queue_bytes: int = QUEUE_BYTES):
        self.folder = Path(folder)
        self.shards = plan(entries, max_shard_bytes)
        self.names = file_names(len(self.shards))
        self.where = {e.name: i for i, shard in enumerate(self.shards) for e in shard}
        self.bytes = 0  # given to ``write``
        self._written = 0  # in finished shards
        self._open: ShardWriter | None = None
        self._index = -1  # the shard being written
        self._queue: deque[tuple[str, torch.Tensor, int] | None] = deque()
        self._queued = 0
        self._queue_bytes = queue_bytes
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._drain, daemon=True)
            self._thread.start()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        self.bytes += size
        if self._thread is None:
            self._write(name, tensor)
            return
        with self._changed:
            self._changed.wait_for(lambda: self._error is not None or not self._queue
                                   or self._queued + size <= self._queue_bytes)
            if self._error is not None:
                raise self._error
            self._queue.append((name, tensor, size))
            self._queued += size
            self._changed.notify_all()

    def _drain(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._queue)
                item = self._queue[0]
            if item is None:
                return
            if self._error is None:
                try:
                    self._write(item[0], item[1])
                except BaseException as e:  # noqa: BLE001  re-raised in the caller's thread on its next write or close
                    self._error = e
            with self._changed:
                self._queue.popleft()
                self._queued -= item[2]
                self._changed.notify_all()
            item = None  # hold no tensor while waiting for the next

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        i = self.where.get(name)
        if i is None:
            raise ValueError(f"{self.folder}: {name} was not planned")
        if i != self._index:
            if i != self._index + 1:
                raise ValueError(f"{self.folder}: {name} of {self.names[i]} came while writing "
                                 f"{self.names[self._index] if self._index >= 0 else 'nothing'}; "
                                 "tensors must come shard after shard")
            self._finish_shard()
            self._index = i
            self._open = ShardWriter(self.folder / self.names[i], self.shards[i])
        self._open.write(name, tensor)

    def _finish_shard(self) -> None:
        if self._open is not None:
            shard, self._open = self._open, None
            self._written += shard.close()

    def _stop(self) -> None:
        with self._changed:
            self._queue.append(None)
            self._changed.notify_all()
        self._thread.join()

    def abort(self) -> None:
        """Stop the writer thread after a failure elsewhere (the partial files are the caller's)."""
        if self._thread is not None and self._thread.is_alive():
            self._error = self._error or RuntimeError("aborted")
            self._stop()
        if self._open is not None:
            self._open.abort()

    def close(self) -> None:
        """Finish the last shard and write the index (of a model of more than one shard)."""
        if self._thread is not None:
            self._stop()
            if self._error is not None:
                self.abort()
                raise self._error
        self._finish_shard()
        if self._index != len(self.shards) - 1 and self.where:
            raise ValueError(f"{self.folder}: {self.names[self._index + 1]} never written")
        if len(self.shards) > 1:
            weight_map = {name: self.names[i] for name, i in self.where.items()}
            write_json(self.folder / INDEX, {"metadata": {"total_size": self._written},
                                             "weight_map": dict(sorted(weight_map.items()))})
