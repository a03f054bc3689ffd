"""Tokenizing and packing the curated sets with ``datasets``, for the CPT and SFT stages.

The curated JSONL is loaded as an Arrow dataset on disk (``load_dataset("json")``, converted in
blocks), tokenized by a batched ``map`` over ``num_proc`` worker processes (each writes its
share as Arrow), and the trainer memory-maps the result: no Python list of documents or of
tokens exists at any point, whatever the corpus size.

CPT packing is what it always was (``<|begin_of_text|> text <|end_of_text|>`` per document,
concatenated in file order and cut into full blocks of ``sequence_length``; the rest after the
last full block is dropped): the tokenized documents' id lists, laid end to end, are exactly the
flat values buffer of the Arrow list column, so the blocks are cut from it chunk by chunk (a
chunk's leftover carried into the next) and written as an Arrow stream file of fixed-length
rows. Token ids come from the base's tokenizer (training/tokens.py: tiktoken on Meta's ranks
when the base's ``tokenizer.json`` is Meta's Llama 3 tokenizer, else ``tokenizers``; the same
ids either way).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from training.tokens import Counter

BATCH = 1000  # documents per map batch


def _encode(batch: dict, counter: Counter, bos: int, eos: int, length: int | None) -> dict:
    """A map batch: each text as ``[bos, ids..., eos]`` (cut to ``length`` when given)."""
    ids = counter.encode_batch(batch["text"])
    rows = [[bos, *x, eos] for x in ids]
    if length is not None:
        rows = [r[:length] for r in rows]
    return {"input_ids": rows}


def load_json(path: Path, cache: Path):
    """A JSONL file as an Arrow dataset in ``cache`` (memory-mapped)."""
    from datasets import load_dataset

    return load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))


def tokenize(jsonl: Path, counter: Counter, work: Path, *, bos: int, eos: int, length: int | None = None,
             num_proc: int | None = None):
    """The documents of ``jsonl`` (``{"text"}`` rows) as ``input_ids`` rows, in file order."""
    from datasets import Features, Sequence, Value

    docs = load_json(jsonl, work / "hf")
    num_proc = _procs(num_proc, len(docs))
    return docs.map(_encode, batched=True, batch_size=BATCH, num_proc=num_proc, remove_columns=docs.column_names,
                    fn_kwargs={"counter": counter, "bos": bos, "eos": eos, "length": length},
                    features=Features({"input_ids": Sequence(Value("int32"))}),
                    cache_file_name=str(work / "tokens.arrow"), desc="tokenizing")


def pack_blocks(tokens, length: int, out: Path) -> tuple[int, int]:
    """Cut the concatenated ``input_ids`` of ``tokens`` into full blocks of ``length``, written
    to ``out`` (an Arrow stream file, as ``datasets`` writes); returns ``(blocks, tokens
    dropped after the last full block)``."""
    import pyarrow as pa

    schema = pa.schema([("input_ids", pa.list_(pa.int32()))])
    carry = np.empty(0, dtype=np.int32)
    blocks = 0
    tmp = out.with_name(out.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for chunk in tokens.data.column("input_ids").chunks:
            values = np.concatenate([carry, chunk.flatten().to_numpy(zero_copy_only=False)])
            n = len(values) // length
            if n:
                offsets = pa.array(np.arange(0, n * length + 1, length, dtype=np.int32))
                rows = pa.ListArray.from_arrays(offsets, pa.array(values[: n * length], type=pa.int32()))
                writer.write_batch(pa.record_batch([rows], schema=schema))
                blocks += n
            carry = values[n * length:]
    os.replace(tmp, out)
    return blocks, len(carry)


def pack_cpt(jsonl: Path, counter: Counter, length: int, work: Path, *, bos: int, eos: int, packing: bool = True,
             num_proc: int | None = None) -> tuple[object, dict]:
    """The CPT training set from ``data/cpt.jsonl``: packed blocks (``packing``) or one row per
    document cut to ``length``, memory-mapped from ``work``; and its figures (examples, tokens,
    tokens dropped). Done once: a resumed run finds it in ``work``."""
    from datasets import Dataset

    work.mkdir(parents=True, exist_ok=True)
    done, out = work / "cpt.json", work / ("blocks.arrow" if packing else "tokens.arrow")
    if not done.is_file():
        tokens = tokenize(jsonl, counter, work, bos=bos, eos=eos, length=None if packing else length,
                          num_proc=num_proc)
        if packing:
            blocks, dropped = pack_blocks(tokens, length, out)
            figures = {"examples": blocks, "tokens": blocks * length, "dropped": dropped}
        else:
            import pyarrow.compute as pc

            total = int(pc.sum(pc.list_value_length(tokens.data.column("input_ids"))).as_py() or 0)
            figures = {"examples": len(tokens), "tokens": total, "dropped": 0}
        done.write_text(json.dumps(figures) + "\n", encoding="utf-8")
    return Dataset.from_file(str(out)), json.loads(done.read_text(encoding="utf-8"))


def sft_chats(jsonl: Path, work: Path):
    """The SFT chats (``{"messages"}`` rows) as a memory-mapped Arrow dataset."""
    return load_json(jsonl, work / "hf")


def column_tokens(dataset, column: str = "input_ids", ignore: int | None = None) -> int:
    """Values in a list column (those not equal to ``ignore``), counted by Arrow."""
    import pyarrow.compute as pc

    flat = pc.list_flatten(dataset.data.column(column))
    if ignore is None:
        return len(flat)
    return int(pc.sum(pc.not_equal(flat, ignore)).as_py() or 0)


def _procs(num_proc: int | None, rows: int) -> int | None:
    """Worker processes for a map: every core, but none for a set of a few batches (starting
    processes would cost more than they save)."""
    n = num_proc if num_proc is not None else (os.cpu_count() or 1)
    n = min(n, max(1, rows // BATCH))
    return n if n > 1 else None
