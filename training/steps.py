"""The project's own datatrove pipeline steps for curation (training/data.py wires them).

- Readers: JSONL, Parquet and plain text (blank-line-separated documents), plain or gzip/zstd
  (fsspec infers the compression from the name), through datatrove's ``DataFolder``. datatrove's
  own ``JsonlReader`` logs a bad line and goes on, and stops a file at its first invalid UTF-8
  byte without saying where; here every bad record (not JSON, not UTF-8, no text field, text not
  a string) and every corrupt shard is named ``file:line`` and counted, then skipped or the stage
  refused, as ``data.on_bad_data`` says.
- The Urdu steps: normalisation, boilerplate lines, and the length, script-ratio and repetition
  filters (training/clean.py). Each counts documents and Llama 3 tokens in and out in datatrove's
  task stats (``docs_in``, ``tokens_in``, ``docs_out``, ``tokens_out``), which the retention
  report adds up per corpus; the current token count rides along in ``metadata["tokens"]``.
- Near duplicates: datatrove's MinHash stages with character 5-gram shingles (what the spec's
  threshold is about) and 32-bit multiply-add permutations (``CharMinhashSignature``, which also
  keeps each document's whole signature), and a step between datatrove's bucket and cluster
  stages that keeps only the candidate pairs whose estimated Jaccard similarity reaches the
  threshold (``VerifyPairs``): a shared LSH bucket alone never drops a document.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow
import zstandard
from datatrove.data import Document, DocumentsPipeline
from datatrove.executor import SlurmPipelineExecutor
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.pipeline.readers.jsonl import JsonlReader
from datatrove.pipeline.readers.parquet import ParquetReader
from datatrove.utils.word_tokenizers import WordTokenizer

from release.errors import CurationError
from training import clean
from training.tokens import Counter

# What the readers raise on a corrupt or truncated shard: gzip's BadGzipFile and truncation (OSError,
# EOFError), zlib's and zstd's stream errors, undecodable bytes (UnicodeDecodeError is a ValueError),
# parquet's ArrowException. Anything else is a bug and keeps its traceback.
UNREADABLE = (OSError, EOFError, ValueError, zlib.error, zstandard.ZstdError, pyarrow.ArrowException)

SHINGLE = 5  # characters per MinHash shingle
BAD_DATA = ("refuse", "skip")
STEP_TYPE = "QALB"


@dataclass(frozen=True)
class Source:
    """One input file of a corpus, or one range of its lines; the curation's task ``rank`` reads
    ``sources[rank]``."""

    corpus: str
    language: str | None
    format: str  # jsonl | parquet | text
    path: str  # the file
    fields: tuple[str, ...]  # fields[0] is required; the others are read when present
    start: int = 0  # a range: the byte offset of its first line
    end: int | None = None  # the offset just past its last line (None: the end of the file)
    first_line: int = 1  # the number of its first line in the file (records are named file:line)


# --- reading ----------------------------------------------------------------------------------


class Problems:
    """Bad input of one task: each named ``file:line: what``; refused at once or kept to report."""

    def __init__(self, policy: str):
        self.policy = policy
        self.lines: list[str] = []

    def __call__(self, where: str, what: str) -> None:
        line = f"{where}: {what}"
        if self.policy == "refuse":
            raise CurationError(f"{line}; fix the input, or set data.on_bad_data = \"skip\" to skip and count it")
        self.lines.append(line)


def check_record(record: object, fields: tuple[str, ...]) -> str | None:
    """What is wrong with a record (None when nothing): not an object, no ``fields[0]``, a
    field that is not a string."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if fields[0] not in record:
        return (f"no {fields[0]!r} field (fields: {', '.join(map(str, record)) or 'none'}); "
                "the corpus's text_field names it")
    for f in fields:
        value = record.get(f)
        if value is not None and not isinstance(value, str):
            return f"field {f!r} is {type(value).__name__}, expected a string"
    return None


def _lines(fh) -> Iterator[bytes]:
    """Lines of a binary stream; zstd's reader needs a buffer to iterate."""
    return iter(fh if hasattr(fh, "readline") and not _is_zstd(fh) else io.BufferedReader(fh, 1 << 20))


def _is_zstd(fh) -> bool:
    return type(fh).__module__.startswith("zstandard")


class _Records:
    """What the three readers share: ``records(file)`` yields ``(where, record)`` for the good
    records of one file and reports the others to ``self.problems``. ``_read`` yields
    ``(where, record)`` and keeps ``self.line``, the line (or row) it is at."""

    fields: tuple[str, ...] = ("text",)
    problems: Problems
    line: int = 0
    span: tuple[int, int | None, int] = (0, None, 1)  # the lines read: start offset, end offset, first number

    def _spanned(self, fh) -> Iterator[tuple[int, bytes]]:
        """``(number, line)`` of the lines of ``self.span`` (an uncompressed file's range, or all)."""
        start, end, first = self.span
        if start:
            fh.seek(start)
        lines = enumerate(_lines(fh), first)
        if end is None:
            yield from lines
            return
        at = start
        for number, raw in lines:
            if at >= end:
                return
            at += len(raw)
            yield number, raw

    def records(self, filepath: str) -> Iterator[tuple[str, dict]]:
        path = self.data_folder.resolve_paths(filepath)
        self.line = 0
        try:
            for where, record in self._read(filepath, path):
                problem = check_record(record, self.fields)
                if problem:
                    self.problems(where, problem)
                    continue
                yield where, record
        except CurationError:
            raise
        except UNREADABLE as e:  # a corrupt or truncated shard: what its readers raise
            self.problems(f"{path}:{self.line + 1}", f"unreadable from this line on ({type(e).__name__}: {e}); "
                          "the shard is corrupt or truncated")

    def read_file(self, filepath: str) -> DocumentsPipeline:
        for where, record in self.records(filepath):
            yield Document(text=record[self.fields[0]] or "", id=where, metadata={})


class JsonlRecords(_Records, JsonlReader):
    """JSONL, one record per line; blank lines are skipped."""

    def __init__(self, folder: str, fields: tuple[str, ...], problems: Problems):
        super().__init__(folder, compression="infer", text_key=fields[0], add_file_path=False)
        self.fields, self.problems = fields, problems

    def _read(self, filepath: str, where: str):
        import orjson

        with self.data_folder.open(filepath, "rb", compression=self.compression) as fh:
            for number, raw in self._spanned(fh):
                self.line = number
                if not raw.strip():
                    continue
                try:
                    record = orjson.loads(raw)
                except orjson.JSONDecodeError as e:
                    try:
                        raw.decode("utf-8")
                    except UnicodeDecodeError as u:
                        self.problems(f"{where}:{number}", f"not UTF-8 ({u.reason} at byte {u.start})")
                        continue
                    self.problems(f"{where}:{number}", f"not valid JSON ({e})")
                    continue
                yield f"{where}:{number}", record


class ParquetRecords(_Records, ParquetReader):
    """Parquet; records are named by row (``file:row N``)."""

    def __init__(self, folder: str, fields: tuple[str, ...], problems: Problems):
        super().__init__(folder, text_key=fields[0])
        self.fields, self.problems = fields, problems

    def _read(self, filepath: str, where: str):
        import pyarrow.parquet as pq

        with self.data_folder.open(filepath, "rb") as fh, pq.ParquetFile(fh) as pf:
            names = set(pf.schema_arrow.names)
            if self.fields[0] not in names:
                self.problems(where, f"no column {self.fields[0]!r} (columns: {', '.join(sorted(names))}); "
                              "the corpus's text_field names it")
                return
            row = 0
            for batch in pf.iter_batches(batch_size=1024, columns=[f for f in self.fields if f in names]):
                for record in batch.to_pylist():
                    row += 1
                    self.line = row
                    yield f"{where}:row {row}", record


class TextRecords(_Records, BaseDiskReader):
    """Plain text: documents separated by blank lines, named by their first line."""

    def __init__(self, folder: str, fields: tuple[str, ...], problems: Problems):
        super().__init__(folder, text_key=fields[0], add_file_path=False)
        self.fields, self.problems = fields, problems

    def _read(self, filepath: str, where: str):
        lines: list[str] = []
        start, bad = 1, False
        with self.data_folder.open(filepath, "rb", compression="infer") as fh:
            for number, raw in self._spanned(fh):
                self.line = number
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as u:
                    self.problems(f"{where}:{number}", f"not UTF-8 ({u.reason} at byte {u.start}); "
                                  "the document holding this line is skipped")
                    line, bad = "\ufffd", True
                if line.strip():
                    if not lines:
                        start = number
                    lines.append(line)
                elif lines:
                    if not bad:
                        yield f"{where}:{start}", {self.fields[0]: "\n".join(lines)}
                    lines, bad = [], False
        if lines and not bad:
            yield f"{where}:{start}", {self.fields[0]: "\n".join(lines)}


READERS = {"jsonl": JsonlRecords, "parquet": ParquetRecords, "text": TextRecords}


def reader(source: Source, problems: Problems) -> _Records:
    path = Path(source.path)
    out = READERS[source.format](str(path.parent), source.fields, problems)
    out.span = (source.start, source.end, source.first_line)
    return out


class SourceReader(PipelineStep):
    """First step of the cleaning job: task ``rank`` reads ``sources[rank]`` and tags each
    document with its corpus, language and source index; its bad input goes to
    ``problems/<rank>.txt`` (skip) or stops the stage (refuse)."""

    type, name = STEP_TYPE, "read"

    def __init__(self, sources: list[Source], on_bad_data: str, problems_folder: str):
        super().__init__()
        self.sources, self.on_bad_data = sources, on_bad_data
        self.problems_folder = problems_folder

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        source = self.sources[rank]
        problems = Problems(self.on_bad_data)
        meta = {"corpus": source.corpus, "language": source.language, "source": rank}
        docs = 0
        for doc in reader(source, problems).read_file(Path(source.path).name):
            doc.metadata = dict(meta)
            docs += 1
            yield doc
        self.stat_update("bad_data", value=len(problems.lines))
        folder = get_datafolder(self.problems_folder)
        with folder.open(f"{rank:05d}.txt", "w") as fh:
            fh.write("".join(line + "\n" for line in problems.lines))


# --- the Urdu steps ---------------------------------------------------------------------------


class Measured(PipelineStep):
    """A step that counts documents and tokens in and out (task stats ``docs_in``, ``tokens_in``,
    ``docs_out``, ``tokens_out``). Subclasses implement ``apply(doc) -> bool`` (keep it?)."""

    type = STEP_TYPE

    def __init__(self, name: str):
        self.name = name
        super().__init__()

    def apply(self, doc: Document) -> bool:
        raise NotImplementedError

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        n = [0, 0, 0, 0]
        for doc in data:
            before = doc.metadata.get("tokens", 0)
            keep = self.apply(doc)
            n[0] += 1
            n[1] += doc.metadata.pop("tokens_in", before)
            if keep:
                n[2] += 1
                n[3] += doc.metadata["tokens"]
                yield doc
        for key, value in zip(("docs_in", "tokens_in", "docs_out", "tokens_out"), n, strict=True):
            self.stat_update(key, value=value)


class Normalize(Measured):
    """Unicode and Urdu orthography (training/clean.py); a document left empty is dropped.
    Counts the raw tokens (``tokens_in``) and the normalised ones."""

    def __init__(self, count: Counter):
        super().__init__("normalize")
        self.count = count

    def apply(self, doc: Document) -> bool:
        raw = doc.text
        n = self.count(raw)
        doc.text = clean.normalize(raw)
        doc.metadata["tokens_in"] = n
        doc.metadata["tokens"] = n if doc.text == raw else self.count(doc.text)
        return bool(doc.text)


class Boilerplate(Measured):
    """Lines matching ``data.filters.boilerplate`` removed; a document left empty is dropped."""

    def __init__(self, patterns: list[str], count: Counter):
        super().__init__("boilerplate")
        self.patterns, self.count = [re.compile(p) for p in patterns], count
        self.whole = clean.whole_text(patterns)

    def apply(self, doc: Document) -> bool:
        text = clean.strip_boilerplate(doc.text, self.patterns, self.whole)
        if text != doc.text:
            doc.text, doc.metadata["tokens"] = text, self.count(text)
        return bool(text)


class MinLength(Measured):
    def __init__(self, min_chars: int):
        super().__init__("length")
        self.min_chars = min_chars

    def apply(self, doc: Document) -> bool:
        return len(doc.text) >= self.min_chars


class ScriptRatio(Measured):
    """Letters in the corpus language's script (Urdu: release/urdu.py's definition)."""

    def __init__(self, min_ratio: float):
        super().__init__("script")
        self.min_ratio = min_ratio

    def apply(self, doc: Document) -> bool:
        return clean.script_ratio(doc.text, doc.metadata["language"]) >= self.min_ratio


class Repetition(Measured):
    def __init__(self, max_share: float):
        super().__init__("repetition")
        self.max_share = max_share

    def apply(self, doc: Document) -> bool:
        return clean.repetition(doc.text) <= self.max_share


def exact_text(doc: Document) -> bytes:
    """What exact deduplication compares: the cleaned text (as bytes: xxhash 4 hashes no str)."""
    return doc.text.encode("utf-8")


def first_source_wins(doc: Document) -> int:
    """datatrove keeps the highest-priority copy of a text, then the first in its file: a lower
    source index (file, or range of a file, in order) is a higher priority, so the copy kept is
    the first in corpus order."""
    return 65535 - doc.metadata["source"]


class Tally(PipelineStep):
    """Counts the documents and tokens passing (stats ``docs``, ``tokens``), after a datatrove
    step that does not count tokens."""

    type = STEP_TYPE

    def __init__(self, name: str):
        self.name = name
        super().__init__()

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        docs = tokens = 0
        for doc in data:
            docs += 1
            tokens += doc.metadata["tokens"]
            yield doc
        self.stat_update("docs", value=docs)
        self.stat_update("tokens", value=tokens)


# --- near duplicates --------------------------------------------------------------------------


def lsh_bands(threshold: float, permutations: int, fp_weight: float = 0.1, fn_weight: float = 0.9) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows <= permutations`` that minimise the weighted chance
    of a false candidate below ``threshold`` and of a missed pair above it (datasketch's rule;
    recall weighs 9x because candidates are verified)."""
    best, best_cost = (1, 1), float("inf")
    lo, hi = np.linspace(0.0, threshold, 401), np.linspace(threshold, 1.0, 401)
    for b in range(1, permutations + 1):
        for r in range(1, permutations // b + 1):
            fp = np.trapezoid(1 - (1 - lo ** r) ** b, lo)
            fn = np.trapezoid((1 - hi ** r) ** b, hi)
            cost = fp_weight * fp + fn_weight * fn
            if cost < best_cost - 1e-12:
                best, best_cost = (b, r), cost
    return best


def shingle_hashes(text: str) -> np.ndarray:
    """64-bit hashes of the character 5-grams of ``text`` with runs of whitespace as one space
    (a text shorter than 5 characters is one shingle); a polynomial over the code points,
    finished with splitmix64's mixer. Duplicates are left in: MinHash takes minima."""
    cps = np.frombuffer(" ".join(text.split()).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = max(1, len(cps) - SHINGLE + 1)
    if len(cps) < SHINGLE:
        cps = np.concatenate([cps, np.zeros(SHINGLE - len(cps), dtype=np.uint64)])
    with np.errstate(over="ignore"):
        h = cps[:n].copy()
        for k in range(1, SHINGLE):
            h = h * _POLY + cps[k:k + n]
        h ^= h >> np.uint64(30)
        h *= _MIX1
        h ^= h >> np.uint64(27)
        h *= _MIX2
        h ^= h >> np.uint64(31)
    return h


_POLY, _MIX1, _MIX2 = np.uint64(0x100000001B3), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def permutations(count: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random permutations of 32-bit values, ``x -> a*x + b mod 2**32`` with odd ``a``."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**32, size=count, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    b = rng.integers(0, 2**32, size=count, dtype=np.uint64).astype(np.uint32)
    return a, b


def signature(shingles: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The MinHash signature of a document's shingle hashes: per permutation, the least permuted
    value (of each hash's top 32 bits)."""
    x = (shingles >> np.uint64(32)).astype(np.uint32)
    with np.errstate(over="ignore"):
        m = np.multiply.outer(a, x)  # permutations x shingles: the minimum runs along memory
        m += b[:, None]
        return m.min(axis=1)


class _Whitespace(WordTokenizer):
    """datatrove's signature step wants a word tokenizer (spaCy for most languages); shingles
    here are characters, so it never runs."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return text.split("\n")

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in re.finditer(r"\S+", text)]


class CharMinhashSignature(MinhashDedupSignature):
    """datatrove's MinHash stage 1 on character 5-gram shingles: writes each document's bands to
    the bucket files datatrove's later stages read, and its whole signature (``permutations``
    32-bit values, one record per document) to ``full_folder/<rank>.sig`` for ``VerifyPairs``."""

    name = "MinHash signatures (character 5-grams)"

    def __init__(self, output_folder: str, full_folder: str, config: MinhashConfig, permutations_: int):
        super().__init__(output_folder, config=config, language=_Whitespace())
        self.full_folder = full_folder
        self.a, self.b = permutations(permutations_, config.seed)
        self._full = None

    def get_shingles(self, text: str) -> np.ndarray:
        return shingle_hashes(text)

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        full = signature(shingles, self.a, self.b)
        self._full.write(full.tobytes())
        bands = full[: self.config.num_buckets * self.config.hashes_per_bucket]
        return bands.reshape(self.config.num_buckets, self.config.hashes_per_bucket).tolist()

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        with get_datafolder(self.full_folder).open(f"{rank:05d}.sig", "wb") as fh:
            self._full = fh
            try:
                super().run(data, rank, world_size)
            finally:
                self._full = None


class VerifyPairs(PipelineStep):
    """Between datatrove's MinHash stages 2 and 3: of the candidate pairs (documents sharing a
    band), keep those whose whole signatures agree in at least ``threshold`` of the positions
    (the estimated Jaccard similarity); datatrove then clusters the pairs kept and drops all but
    one document of each cluster."""

    type, name = STEP_TYPE, "verify near-duplicate pairs"

    def __init__(self, pairs_folder: str, full_folder: str, output_folder: str, permutations_: int, threshold: float):
        super().__init__()
        self.pairs_folder, self.full_folder, self.output_folder = pairs_folder, full_folder, output_folder
        self.permutations, self.threshold = permutations_, threshold

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        pairs, full, out = (get_datafolder(f) for f in (self.pairs_folder, self.full_folder, self.output_folder))
        signatures: dict[int, np.ndarray] = {}

        def sig(file: int) -> np.ndarray:
            if file not in signatures:
                path = full.resolve_paths(f"{file:05d}.sig")
                signatures[file] = np.memmap(path, dtype=np.uint32, mode="r").reshape(-1, self.permutations)
            return signatures[file]

        for name in pairs.list_files(glob_pattern="*.dups")[rank::world_size]:
            with pairs.open(name, "rb") as fh:
                raw = np.frombuffer(fh.read(), dtype="<u4").reshape(-1, 4)
            keep = [row for row in raw
                    if float(np.mean(sig(int(row[0]))[row[1]] == sig(int(row[2]))[row[3]])) >= self.threshold]
            self.stat_update("candidates", value=len(raw))
            self.stat_update("verified", value=len(keep))
            with out.open(name, "wb") as fh:
                fh.write(b"".join(struct.pack("<4I", *map(int, row)) for row in keep))


def intermediate_record(self, doc: Document) -> dict:
    """How the cleaning job writes a surviving document (a JsonlWriter adapter): text, id and
    metadata (corpus, language, source, tokens), without dataclasses.asdict's deep copy."""
    return {"text": doc.text, "id": doc.id, "metadata": doc.metadata}


class Intermediate(JsonlReader):
    """The cleaning job's output for task ``rank`` (no file when it kept nothing). Written
    uncompressed: fsspec's zstd writer compresses at level 10, which would cost more CPU than
    any filter."""

    def __init__(self, folder: str):
        super().__init__(folder, compression=None, add_file_path=False)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        name = f"{rank:05d}.jsonl"
        if self.data_folder.exists(name):
            yield from self.read_files_shard([name])


# --- executors --------------------------------------------------------------------------------


class SlurmJobs(SlurmPipelineExecutor):
    """datatrove's ``SlurmPipelineExecutor`` without its stats-merging job per job: the stage reads
    each task's stats itself, and an extra job that depends on a failed one would wait in the
    queue forever on a cluster that keeps such jobs (training/cluster.py)."""

    def launch_merge_stats(self) -> None:
        return None
