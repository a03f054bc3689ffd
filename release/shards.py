"""Sharded safetensors, written one tensor at a time.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once; a 5 GB shard of
an 8B model would then cost 5 GB of RAM. The safetensors header only needs names, dtypes and
shapes, so it is written first and each tensor's bytes follow as soon as the tensor exists.
Files are read back by the ``safetensors`` library itself in the tests.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from release.artifacts import write_json

DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
               torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64"}
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


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
        out[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(out, separators=(",", ":")).encode()
    return blob + b" " * (max(pad_to, len(blob) + (-len(blob) % 8)) - len(blob))


class ShardWriter:
    """Write one safetensors file tensor by tensor, in the order the entries were given."""

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.entries = list(entries)
        blob = header(self.entries, metadata)
        self._next = 0
        self._done = 0
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor``, or the next rows of it: a tensor may arrive in row blocks."""
        e = self.entries[self._next]
        if name != e.name or tensor.dtype != e.dtype or tuple(tensor.shape[1:]) != e.shape[1:]:
            raise ValueError(f"{self.path.name}: expected {e.name} {e.dtype} {e.shape}, "
                             f"got {name} {tensor.dtype} {tuple(tensor.shape)}")
        self._file.write(tensor.contiguous().view(torch.uint8).numpy().data)
        self._done += tensor.numel() * tensor.element_size()
        if self._done > e.nbytes:
            raise ValueError(f"{self.path.name}: more data than {e.name} {e.shape} holds")
        if self._done == e.nbytes:
            self._next += 1
            self._done = 0

    def close(self) -> None:
        if self._next != len(self.entries):
            self._file.close()
            raise ValueError(f"{self.path.name}: {len(self.entries) - self._next} tensors never written")
        self._file.close()  # the stage syncs every output once, before its manifest


class ShardedWriter:
    """A whole sharded model: tensors (or row blocks of them) go to their planned shard; ``close``
    writes the index.

    With ``background=True`` the bytes are written by a thread while the caller computes the next
    block (file writes release the GIL); at most ``queue`` blocks wait, which bounds the memory.
    """

    def __init__(self, folder: Path, entries: list[Entry], max_shard_bytes: int | None,
                 background: bool = False, queue: int = 2):
        self.folder = Path(folder)
        self.shards = plan(entries, max_shard_bytes)
        self.names = file_names(len(self.shards))
        self.where = {e.name: i for i, shard in enumerate(self.shards) for e in shard}
        self._open: tuple[int, ShardWriter] | None = None
        self.bytes = 0
        self._queue = None
        self._error: BaseException | None = None
        if background:
            import queue as queues
            import threading

            self._queue = queues.Queue(maxsize=queue)
            self._thread = threading.Thread(target=self._drain, daemon=True)
            self._thread.start()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.bytes += tensor.numel() * tensor.element_size()
        if self._queue is None:
            self._write(name, tensor)
            return
        if self._error is not None:
            raise self._error
        self._queue.put((name, tensor))

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._write(*item)
                except BaseException as e:  # handed to the caller on its next write or close
                    self._error = e

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        i = self.where[name]
        if self._open is None or self._open[0] != i:
            if self._open is not None:
                self._open[1].close()
            self._open = (i, ShardWriter(self.folder / self.names[i], self.shards[i]))
        self._open[1].write(name, tensor)

    def abort(self) -> None:
        """Stop the writer thread after a failure elsewhere (the partial files are the caller's)."""
        if self._queue is not None and self._thread.is_alive():
            self._error = self._error or RuntimeError("aborted")
            self._queue.put(None)
            self._thread.join()
        if self._open is not None:
            self._open[1]._file.close()

    def close(self) -> None:
        if self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            if self._error is not None:
                raise self._error
        if self._open is not None:
            self._open[1].close()
        if len(self.shards) > 1:
            total = sum(e.nbytes for s in self.shards for e in s)
            weight_map = {e.name: self.names[i] for i, s in enumerate(self.shards) for e in s}
            write_json(self.folder / INDEX, {"metadata": {"total_size": total},
                                             "weight_map": dict(sorted(weight_map.items()))})


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
    """Reads tensors, or row ranges of them, with plain file reads.

    ``safe_open`` memory-maps the file, and every page it touches then counts as resident memory
    of the process until the mapping goes; reading row blocks into fresh buffers keeps the
    merge's memory to the blocks it holds (the kernel's page cache is not the process's)."""

    _DTYPES = {v: k for k, v in DTYPE_NAMES.items()}

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > 100_000_000:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", None) or {}
        self.base = 8 + n
        self.header = header
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
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
        """The tensor, or rows ``[r0, r1)`` of it (first dimension)."""
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
        # Map just these bytes (page-aligned), pre-faulted; the mapping lives as long as the
        # tensor does, so memory holds only the blocks in use and nothing is copied twice.
        start = self.base + begin
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), start + (end - begin) - aligned, offset=aligned,
                           flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer: the tensor is never written to
            raw = torch.frombuffer(mm, dtype=torch.uint8, offset=start - aligned, count=end - begin)
        return raw.view(dtype).reshape(shape)
