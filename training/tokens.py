"""Counting Llama 3 tokens fast enough for curation at corpus scale.

The retention report counts tokens with the base model's tokenizer (``base/tokenizer.json``)
three times per document (raw, normalised, without boilerplate). The Hugging Face ``tokenizers``
BPE does ~3.5 MB of Urdu per CPU-second here, which alone would cap curation below 2 MB/s on two
cores; ``tiktoken`` runs the same byte-level BPE ~4x faster. So when the base's tokenizer is
Meta's Llama 3 tokenizer (same pre-tokenizer pattern, same 128,000 token byte strings at the
same ids, merges in rank order: what every Llama 3.x ``tokenizer.json`` is, and what
release/llama3.py builds), tokens are counted with ``tiktoken`` on Meta's ranks; otherwise with
``tokenizers``. Both give the same ids for every text (tests compare them on the demo corpora and
on the benchmark's), and so the same counts.

A ``Counter`` is a small picklable object (a path and a flag): worker processes load the
tokenizer on first use. The packing of the training sets (training/pack.py) encodes with it too.
"""

from __future__ import annotations

import base64
import json
from functools import cache
from pathlib import Path


class Counter:
    """``counter(text) -> int``: Llama 3 tokens of ``text`` without special tokens;
    ``counter.encode_batch(texts)``: their ids."""

    def __init__(self, tokenizer_json: Path, fast: bool):
        self.path, self.fast = Path(tokenizer_json), fast

    @property
    def engine(self) -> str:
        return "tiktoken" if self.fast else "tokenizers"

    def __call__(self, text: str) -> int:
        return len(self._encoder()[0](text)) if text else 0

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._encoder()[1](texts)

    def _encoder(self):
        return _tiktoken_encoders() if self.fast else _tokenizers_encoders(str(self.path))


def counter(tokenizer_json: Path) -> Counter:
    """The fastest exact counter for ``tokenizer_json`` (see the module docstring)."""
    return Counter(tokenizer_json, is_meta_llama3(Path(tokenizer_json)))


def is_meta_llama3(tokenizer_json: Path) -> bool:
    """True when ``tokenizer_json`` tokenizes exactly as Meta's Llama 3 tiktoken ranks do:
    byte-level BPE without normalizer, Meta's split pattern, whole-word lookup first
    (``ignore_merges``), the same byte string at every id below 128,000, and merges in the order
    of the ranks of the tokens they make (tiktoken always merges the lowest-ranked pair)."""
    from release import llama3
    from release.spec import VOCAB_BASE

    t = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    model, pre = t.get("model") or {}, t.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") or []
    if (model.get("type") != "BPE" or not model.get("ignore_merges") or t.get("normalizer") is not None
            or len(steps) != 2 or steps[0].get("type") != "Split" or steps[1].get("type") != "ByteLevel"
            or steps[0].get("pattern", {}).get("Regex") != llama3.SPLIT_PATTERN
            or steps[0].get("behavior") != "Isolated" or steps[1].get("use_regex")):
        return False
    ranks = _meta_ranks()
    decode = _byte_decoder()
    vocab = model.get("vocab") or {}
    ours = {i: tok for tok, i in vocab.items() if i < VOCAB_BASE}
    if len(ours) != VOCAB_BASE or len(ranks) != VOCAB_BASE:
        return False
    if any(bytes(decode[c] for c in ours[i]) != ranks[i] for i in range(VOCAB_BASE)):
        return False
    last = -1
    for merge in model.get("merges") or []:
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank = vocab.get(a + b, -1)
        if rank < last:
            return False
        last = rank
    return True


@cache
def _meta_ranks() -> list[bytes]:
    """Meta's token byte strings, by rank (the ``tokenizer.model`` file of ``llama-models``)."""
    from release import llama3

    out: list[bytes] = []
    for line in llama3.tiktoken_file().read_bytes().splitlines():
        if line:
            token, rank = line.split()
            assert int(rank) == len(out)
            out.append(base64.b64decode(token))
    return out


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


@cache
def _tiktoken_encoders():
    """(encode one, encode a batch) with tiktoken on Meta's ranks; loaded once per process."""
    import tiktoken

    from release import llama3

    ranks = {tok: i for i, tok in enumerate(_meta_ranks())}
    enc = tiktoken.Encoding("llama3", pat_str=llama3.SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    return enc.encode_ordinary, lambda texts: enc.encode_ordinary_batch(texts, num_threads=1)


@cache
def _tokenizers_encoders(path: str):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    return (lambda text: tok.encode(text, add_special_tokens=False).ids,
            lambda texts: [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)])
