"""The safetensors module against the ``safetensors`` library: headers, row reads, streamed
writes (fixed and variable-size tensors, any order, a background thread) and the index."""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from release import shards
from release.shards import Entry


def _tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"a.weight": torch.randn(37, 11, generator=gen).to(torch.bfloat16),
            "b.norm": torch.randn(5, generator=gen),
            "c.ids": torch.randint(0, 100, (3, 4, 2), generator=gen),
            "d.bytes": torch.randint(0, 255, (9,), generator=gen, dtype=torch.uint8)}


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _write(path: Path, tensors: dict[str, torch.Tensor], order: list[str], rows: int = 0) -> None:
    w = shards.ShardWriter(path, [Entry(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()])
    for k in order:
        t = tensors[k]
        for r in range(0, max(len(t), 1), rows or max(len(t), 1)):
            w.write(k, t[r:r + rows] if rows else t)
    assert w.close() == sum(t.numel() * t.element_size() for t in tensors.values())


def test_one_dtype_in_name_order_is_byte_identical_to_save_file(tmp_path):
    """Where safetensors' own layout is the order given (one dtype, sorted names), the bytes match."""
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(3 + i, 8, generator=gen) for i in range(5)}
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    _write(tmp_path / "ours.safetensors", tensors, list(tensors), rows=2)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.parametrize("rows", [0, 1, 4])
def test_any_order_and_row_blocks_read_back_by_safetensors(tmp_path, rows):
    tensors = _tensors(torch.Generator().manual_seed(1))
    _write(tmp_path / "m.safetensors", tensors, ["c.ids", "a.weight", "d.bytes", "b.norm"], rows)
    got, metadata = _read(tmp_path / "m.safetensors")
    assert metadata == {"format": "pt"} and list(got) == sorted(tensors)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k


def test_variable_entries_go_last_and_the_header_keeps_its_length(tmp_path):
    """A tensor whose length is known only when computed: planned at its most, laid out after the
    fixed ones; the header is rewritten in place, padded with spaces to its first length."""
    fixed = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    state = torch.tensor(list(b'{"quant_type": "nf4"}'), dtype=torch.uint8)
    entries = [Entry("w", torch.float32, (6, 4)), Entry("w.state", torch.uint8, (256,), variable=True),
               Entry("v", torch.bfloat16, (3,))]
    path = tmp_path / "q.safetensors"
    w = shards.ShardWriter(path, entries)
    first = len(shards.header([entries[0], entries[2], entries[1]]))  # the state at its most, last
    w.write("w.state", state)
    w.write("v", torch.ones(3, dtype=torch.bfloat16))
    w.write("w", fixed[:4])
    w.write("w", fixed[4:])
    assert w.close() == 96 + 6 + len(state)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    assert n == first and n % 8 == 0 and raw[8:8 + n].rstrip(b" ").endswith(b"}")
    assert head["w.state"] == {"dtype": "U8", "shape": [len(state)], "data_offsets": [102, 102 + len(state)]}
    assert 8 + n + 102 + len(state) == len(raw)
    got, _ = _read(path)
    assert torch.equal(got["w"], fixed) and torch.equal(got["w.state"], state)


def test_writer_refuses_what_was_not_planned(tmp_path):
    w = shards.ShardWriter(tmp_path / "x.safetensors",
                           [Entry("w", torch.float32, (4, 2)), Entry("s", torch.uint8, (8,), variable=True)])
    with pytest.raises(ValueError, match="planned"):
        w.write("w", torch.zeros(4, 3))
    with pytest.raises(ValueError, match="planned nothing"):
        w.write("other", torch.zeros(4, 2))
    with pytest.raises(ValueError, match="longer"):
        w.write("s", torch.zeros(9, dtype=torch.uint8))
    w.write("w", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="more data"):
        w.write("w", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="never"):
        w.close()


@pytest.mark.parametrize("background", [False, True])
def test_sharded_writer_files_and_index(tmp_path, background):
    gen = torch.Generator().manual_seed(2)
    tensors = {f"layer.{i}.w": torch.randn(16, 8, generator=gen).to(torch.bfloat16) for i in range(5)}
    entries = [Entry(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    w = shards.ShardedWriter(tmp_path, entries, max_shard_bytes=600, background=background, queue_bytes=300)
    for k, t in tensors.items():
        for r in range(0, 16, 5):
            w.write(k, t[r:r + 5])
    w.close()
    assert w.bytes == 5 * 16 * 8 * 2
    index = json.loads((tmp_path / shards.INDEX).read_text())
    names = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index == {"metadata": {"total_size": w.bytes},
                     "weight_map": {k: names[i // 2] for i, k in enumerate(tensors)}}
    assert shards.model_files(tmp_path) == {k: tmp_path / names[i // 2] for i, k in enumerate(tensors)}
    for name in names:
        got, _ = _read(tmp_path / name)
        assert all(torch.equal(t, tensors[k]) for k, t in got.items())


def test_one_shard_has_no_index(tmp_path):
    w = shards.ShardedWriter(tmp_path, [Entry("w", torch.float32, (2,))], max_shard_bytes=None)
    w.write("w", torch.ones(2))
    w.close()
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_background_errors_reach_the_caller_and_order_is_checked(tmp_path):
    entries = [Entry("a", torch.float32, (4,)), Entry("b", torch.float32, (4,))]
    w = shards.ShardedWriter(tmp_path, entries, max_shard_bytes=16, background=True)
    w.write("b", torch.ones(4))  # shard 2 before shard 1
    with pytest.raises(ValueError, match="shard after shard"):
        w.close()
    w = shards.ShardedWriter(tmp_path, entries, max_shard_bytes=16, background=True)
    w.write("a", torch.ones(4))
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors never written"):
        w.close()


def test_reader_rows_metadata_and_refusals(tmp_path):
    tensors = _tensors(torch.Generator().manual_seed(3))
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "x": "y"})
    r = shards.SafetensorsReader(path)
    assert sorted(r.keys()) == sorted(tensors) and r.metadata == {"format": "pt", "x": "y"}
    for k, t in tensors.items():
        assert r.shape(k) == tuple(t.shape) and r.dtype(k) == t.dtype
        assert torch.equal(r.read(k), t)
        assert torch.equal(r.read(k, (1, 3)), t[1:3])
    header, metadata, start = shards.read_header(path)
    assert set(header) == set(tensors) and metadata["x"] == "y" and start % 8 == 0
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        shards.SafetensorsReader(tmp_path / "cut.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="shorter"):
        shards.read_header(tmp_path / "tiny.safetensors")


def test_count_parameters(tmp_path):
    assert shards.count_parameters(tmp_path) is None
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"c": torch.zeros(2, 2, 2, dtype=torch.bfloat16)}, tmp_path / "model-00002-of-00002.safetensors")
    assert shards.count_parameters(tmp_path) == 12 + 5 + 8


@pytest.mark.parametrize("rows,row_size,budget,min_rows", [(100, 10, 250, 1), (1000, 256, 1795, 16),
                                                          (7, 1, 100, 1), (0, 4, 8, 1), (33, 3, 1, 1)])
def test_row_blocks_cover_evenly(rows, row_size, budget, min_rows):
    blocks = shards.row_blocks(rows, row_size, budget, min_rows)
    step = max(min_rows, budget // row_size, 1)
    assert blocks[0][0] == 0 and blocks[-1][1] == rows and all(a[1] == b[0] for a, b in itertools.pairwise(blocks))
    sizes = [b - a for a, b in blocks]
    assert max(sizes) <= step and max(sizes) - min(sizes) <= 1
