"""Stage ``data``: raw corpora -> cleaned, deduplicated training sets and a retention report.

Documents stream through one pipeline, one at a time, so memory stays flat whatever the corpus
size; only the duplicate indexes (a sha256 per kept document, a MinHash signature plus LSH
buckets per kept document) grow with the number of kept documents.

  read -> normalize -> boilerplate -> length -> script -> repetition -> exact dup -> near dup
       [-> replay budget, English corpora only]

Outputs (``build/<release>/data/``):
- ``cpt.jsonl``: ``{"text": ...}`` per document, the Urdu corpora then English replay at the
  share the spec's token counts give (``spec.data.replay_share``);
- ``sft.jsonl``: ``{"messages": [system, user, assistant]}`` per Alif Urdu-instruct example, with
  the release's Urdu system prompt;
- ``report.json``: documents and tokens in/out of every filter, per corpus, and the kept share.

Tokens are counted with the base model's Llama 3 tokenizer (``base/tokenizer.json``), without
special tokens.

Normalisation choices (Urdu orthography):
- NFC; CR/LF and the Unicode line/paragraph separators to LF; control characters removed (tab
  becomes a space);
- format characters removed (zero-width space, BOM, soft hyphen, bidi marks and embeddings),
  except ZWNJ (U+200C) and ZWJ (U+200D) between two Arabic-script letters, where Urdu uses them
  to break or force a join (compounds, abbreviations); anywhere else they are junk;
- Arabic letter forms to Urdu ones: ي and ى -> ی, ك -> ک, Arabic-Indic digits -> Urdu digits;
- Arabic heh ه: Urdu writes ہ (heh goal) for /h/ and ھ (do-chashmi) only as the second half of
  an aspirated consonant (بھ، تھ، کھ ...). Text typed on an Arabic keyboard has ه for both, and
  no letter rule can tell them apart (كها is کہا "said" or کھا "eat"), so a word is looked up in
  a lexicon of common aspirated words (ASPIRATED) and otherwise gets ہ. Word-initial ھ, never
  right in Urdu, becomes ہ. Arabic quotations inside Urdu text get Urdu letter forms too.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from release import urdu
from release.artifacts import Manifest, atomic_path, run_stage, summary_console, write_json
from release.errors import CurationError
from release.spec import Corpus, Filters, Spec

STAGE = "data"
CPT_FILE = "cpt.jsonl"
SFT_FILE = "sft.jsonl"
REPORT_FILE = "report.json"
TOOLS = ("tokenizers", "datasketch", "pyarrow")
# Alif Urdu-instruct rows (Alpaca layout): instruction, optional input, output.
ALIF_FIELDS = ("instruction", "input", "output")
SHINGLE = 5  # characters per MinHash shingle
TEXT_FILTERS = ("normalize", "boilerplate", "length", "script", "repetition", "exact_dup", "near_dup")
INSTRUCT_FILTERS = ("normalize", "empty", "exact_dup")


# --- normalisation ----------------------------------------------------------------------------

_LETTERS = str.maketrans({
    "\u064a": "\u06cc",  # ARABIC YEH -> FARSI YEH (Urdu choti ye)
    "\u0649": "\u06cc",  # ALEF MAKSURA -> FARSI YEH
    "\u0643": "\u06a9",  # ARABIC KAF -> KEHEH (Urdu kaf)
    **{chr(0x0660 + i): chr(0x06F0 + i) for i in range(10)},  # Arabic-Indic -> Urdu digits
    "\u00a0": " ", "\t": " ", "\u2028": "\n", "\u2029": "\n",
})
_ARABIC_LETTER = r"[\u0620-\u064a\u066e-\u06d3\u06d5\u06fa-\u06ff\u0750-\u077f]"
_JOINER = re.compile(rf"(?<!{_ARABIC_LETTER})[\u200c\u200d]|[\u200c\u200d](?!{_ARABIC_LETTER})")
_KEEP_FORMAT = {"\u200c", "\u200d", *map(chr, range(0x0600, 0x0606)), "\u06dd", "\u08e2"}
_WORD_CHAR = r"[\u0620-\u065f\u066e-\u06d3\u06d5\u06fa-\u06ff\u0670\u0750-\u077f]"
_WORD_WITH_HEH = re.compile(rf"{_WORD_CHAR}*[\u0647\u06be]{_WORD_CHAR}*")
_SPACES = re.compile(r"[ \u2000-\u200a\u202f\u205f\u3000]+")

# Common Urdu words with do-chashmi heh (aspirates). The key of each is its Arabic-keyboard
# spelling (both hehs as ه). Words whose key is also a common word with heh goal are left out
# (کھا / کہا): those get ہ.
_ASPIRATED_WORDS = """
بھی بھائی بھائیوں بھر بھرا بھری بھارت بھاری بھاگ بھول بھوک بھیج بھیجا بھیجی بھیجیں بھلا
تھا تھی تھے تھیں ساتھ ہاتھ ہاتھوں اٹھا اٹھائے اٹھایا اٹھانا اٹھ ٹھیک ٹھہر ٹھنڈا ٹھنڈی ٹھنڈک
کچھ اچھا اچھی اچھے اچھائی پوچھ پوچھا پوچھیں مچھلی چھوٹا چھوٹی چھوٹے چھوڑ چھوڑا چھپی چھٹی چھٹیوں
مجھے مجھ تجھے تجھ سمجھ سمجھا سمجھتے سمجھنا بوجھ جھیل جھوٹ
دیکھ دیکھا دیکھی دیکھے دیکھنا دیکھیں رکھ رکھا رکھی رکھے رکھیں رکھنا کھانا کھانے کھیل کھیلا کھیلنا
کھلاڑی کھلاڑیوں کھڑا کھڑی کھڑے کھول کھولا کھلا لکھ لکھا لکھی لکھے لکھنا لکھیں آنکھ آنکھیں آنکھوں
گھر گھروں گھنٹہ گھنٹے گھنٹوں گھاس گھوم گھوڑا دکھ دکھا دکھائی دکھایا سکھ سیکھ سیکھا
پھر پھل پھول پھیلا پھیلی پھیلا پھینک پھینکا پھینکتا
دھوپ دھول دھواں دھیان دھوکا دودھ ڈھل ڈھانپ ڈھونڈ بیٹھ بیٹھا بیٹھی بیٹھے بیٹھنا
پڑھ پڑھا پڑھی پڑھے پڑھنا پڑھیں بوڑھا بوڑھی بڑھ بڑھا بڑھی بڑھتا چڑھ سیڑھی
""".split()
_HEHS = str.maketrans({"\u06be": "\u0647", "\u06c1": "\u0647"})
ASPIRATED: dict[str, str] = {w.translate(_HEHS): w for w in _ASPIRATED_WORDS}


def _fix_heh(match: re.Match) -> str:
    word = match.group(0)
    if word[0] == "\u06be":  # do-chashmi cannot start a word
        word = "\u06c1" + word[1:]
    if "\u0647" not in word:
        return word
    return ASPIRATED.get(word.translate(_HEHS)) or word.replace("\u0647", "\u06c1")


def normalize(text: str) -> str:
    """Clean one document: NFC, Urdu letter forms, no control or zero-width junk, tidy spaces."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.translate(_LETTERS)
    text = _JUNK.sub("", text)
    text = _JOINER.sub("", text)
    text = _WORD_WITH_HEH.sub(_fix_heh, text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return unicodedata.normalize("NFC", text)


def _junk_class() -> re.Pattern:
    """One character class of everything removed: control (but LF), format (but the joiners and
    Arabic number signs), surrogate, private-use and unassigned code points."""
    ranges: list[tuple[int, int]] = []
    for cp in range(0x110000):
        ch = chr(cp)
        if ch == "\n" or ch in _KEEP_FORMAT or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn"):
            continue
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1] = (ranges[-1][0], cp)
        else:
            ranges.append((cp, cp))
    return re.compile("[" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges) + "]")


_JUNK = _junk_class()


# --- filters ----------------------------------------------------------------------------------

_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")


def script_ratio(text: str, language: str | None) -> float:
    """Share of the letters (Unicode category L*) that are in the language's script. Urdu: the
    script of release/urdu.py, the one verify's Urdu purity measures; English: Latin."""
    if language is None:
        return 1.0
    if language == "ur":
        script, letters = urdu.count_letters(text)
    else:
        script, letters = sum(map(str.isalpha, _LATIN.findall(text))), sum(map(str.isalpha, text))
    return script / letters if letters else 0.0


def repetition(text: str) -> float:
    """Share of words inside word 3-grams that occur more than once (Gopher's duplicate n-gram
    measure): spam and crawl loops score high, prose stays low."""
    words = text.split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    if not grams:
        return 0.0
    counts = Counter(grams)
    covered = bytearray(len(words))
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i:i + 3] = b"\x01\x01\x01"
    return sum(covered) / len(words)


def strip_boilerplate(text: str, patterns: list[re.Pattern]) -> str:
    return "\n".join(line for line in text.split("\n") if not any(p.search(line) for p in patterns)).strip()


class NearDuplicates:
    """MinHash LSH over character 5-gram shingles; a document is a near duplicate when a kept one
    has estimated Jaccard similarity >= the threshold (LSH candidates are checked, so a bucket
    collision alone never drops a document). Per kept document the index holds its signature
    (``permutations`` 64-bit values) and its LSH bucket keys."""

    def __init__(self, threshold: float, permutations: int, seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        template = MinHash(num_perm=permutations, seed=seed)
        self._make = lambda: MinHash(num_perm=permutations, seed=seed, permutations=template.permutations,
                                     scheme=template.scheme)
        self.threshold = threshold
        # Buckets tuned for recall (false negatives weigh 9x): candidates are verified below.
        self.lsh = MinHashLSH(threshold=threshold, num_perm=permutations, weights=(0.1, 0.9))
        self.signatures: list = []

    def signature(self, text: str):
        m = self._make()
        text = " ".join(text.split())
        shingles = {text[i:i + SHINGLE] for i in range(max(1, len(text) - SHINGLE + 1))}
        m.update_batch([s.encode("utf-8") for s in shingles])
        return m

    def seen(self, text: str) -> bool:
        """True when ``text`` nearly duplicates a kept text; otherwise keep it in the index."""
        m = self.signature(text)
        for key in self.lsh.query(m):
            if float((self.signatures[key] == m.hashvalues).mean()) >= self.threshold:
                return True
        self.lsh.insert(len(self.signatures), m)
        self.signatures.append(m.hashvalues)
        return False


@dataclass
class Step:
    """Documents and tokens into and out of one filter."""

    filter: str
    docs_in: int = 0
    tokens_in: int = 0
    docs_out: int = 0
    tokens_out: int = 0


@dataclass
class Tally:
    steps: dict[str, Step] = field(default_factory=dict)

    def add(self, name: str, tokens_in: int, tokens_out: int | None) -> None:
        s = self.steps.setdefault(name, Step(name))
        s.docs_in += 1
        s.tokens_in += tokens_in
        if tokens_out is not None:
            s.docs_out += 1
            s.tokens_out += tokens_out

    def report(self, order: tuple[str, ...]) -> dict:
        steps = [vars(self.steps.get(n, Step(n))) for n in order if n in self.steps]
        first, last = (steps[0], steps[-1]) if steps else ({}, {})
        docs_in, tokens_in = first.get("docs_in", 0), first.get("tokens_in", 0)
        docs_out, tokens_out = last.get("docs_out", 0), last.get("tokens_out", 0)
        return {
            "filters": steps,
            "docs_in": docs_in, "docs_out": docs_out, "tokens_in": tokens_in, "tokens_out": tokens_out,
            "kept_docs": round(docs_out / docs_in, 6) if docs_in else 0.0,
            "kept_tokens": round(tokens_out / tokens_in, 6) if tokens_in else 0.0,
        }


class Cleaner:
    """The per-document pipeline shared by all corpora (the duplicate indexes span corpora)."""

    def __init__(self, filters: Filters, count_tokens: Callable[[str], int]):
        self.f = filters
        self.count = count_tokens
        self.boilerplate = [re.compile(p) for p in filters.boilerplate]
        self.exact: set[bytes] = set()
        self.near = NearDuplicates(filters.near_duplicate_jaccard, filters.minhash_permutations)

    def document(self, text: str, language: str | None, tally: Tally) -> str | None:
        """The cleaned text, or None when a filter drops it; every step is tallied."""
        n = self.count(text)
        text = normalize(text)
        m = self.count(text)
        tally.add("normalize", n, m if text else None)
        if not text:
            return None
        text = strip_boilerplate(text, self.boilerplate)
        n, m = m, self.count(text)
        tally.add("boilerplate", n, m if text else None)
        if not text:
            return None
        checks = (
            ("length", lambda: len(text) >= self.f.min_chars),
            ("script", lambda: script_ratio(text, language) >= self.f.min_script_ratio),
            ("repetition", lambda: repetition(text) <= self.f.max_repetition),
            ("exact_dup", lambda: self._new_exact(text)),
            ("near_dup", lambda: not self.near.seen(text)),
        )
        for name, ok in checks:
            keep = ok()
            tally.add(name, m, m if keep else None)
            if not keep:
                return None
        return text

    def _new_exact(self, text: str) -> bool:
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest in self.exact:
            return False
        self.exact.add(digest)
        return True


# --- reading ----------------------------------------------------------------------------------


def corpus_files(path: Path, fmt: str) -> list[Path]:
    """A corpus is a file or a folder of files (``*.jsonl``/``*.parquet``/``*.txt``), sorted."""
    if path.is_file():
        return [path]
    if path.is_dir():
        suffix = {"jsonl": ".jsonl", "parquet": ".parquet", "text": ".txt"}[fmt]
        files = sorted(p for p in path.rglob(f"*{suffix}") if p.is_file())
        if files:
            return files
        raise CurationError(f"{path}: no *{suffix} files in this corpus folder; fix the corpus path or format in the spec")
    raise CurationError(f"{path}: no such corpus file or folder; fix the corpus path in the spec")


def read_records(path: Path, fmt: str, fields: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    """Yield ``(where, record)`` with ``where`` = ``file:line`` (or ``file:row``), one at a time.
    ``fields[0]`` must be present in every record; a bad record stops the run with one line."""
    for file in corpus_files(path, fmt):
        if fmt == "jsonl":
            yield from _jsonl(file, fields)
        elif fmt == "parquet":
            yield from _parquet(file, fields)
        else:
            yield from _text(file, fields[0])


def _jsonl(file: Path, fields: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    with open(file, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            where = f"{file}:{number}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise CurationError(f"{where}: not UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8") from None
            except ValueError as e:
                raise CurationError(f"{where}: not valid JSON ({e}); fix or remove this line") from None
            yield where, _check_record(record, where, fields)


def _parquet(file: Path, fields: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise CurationError(f"{file}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    names = set(pf.schema_arrow.names)
    if fields[0] not in names:
        raise CurationError(f"{file}: no column {fields[0]!r} (columns: {', '.join(sorted(names))}); "
                            "set the corpus's text_field in the spec")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[f for f in fields if f in names]):
        for record in batch.to_pylist():
            row += 1
            yield f"{file}:row {row}", _check_record(record, f"{file}:row {row}", fields)


def _text(file: Path, text_field: str) -> Iterator[tuple[str, dict]]:
    """Plain text: documents separated by blank lines."""
    lines: list[str] = []
    start = 1
    with open(file, encoding="utf-8", errors="strict") as fh:
        try:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    if not lines:
                        start = number
                    lines.append(line.rstrip("\n"))
                elif lines:
                    yield f"{file}:{start}", {text_field: "\n".join(lines)}
                    lines = []
        except UnicodeDecodeError as e:
            raise CurationError(f"{file}: not UTF-8 ({e.reason}); re-encode the file as UTF-8") from None
    if lines:
        yield f"{file}:{start}", {text_field: "\n".join(lines)}


def _check_record(record: object, where: str, fields: tuple[str, ...]) -> dict:
    if not isinstance(record, dict):
        raise CurationError(f"{where}: expected a JSON object, got {type(record).__name__}")
    need = fields[0]
    if need not in record:
        raise CurationError(f"{where}: no {need!r} field (fields: {', '.join(map(str, record)) or 'none'}); "
                            "set the corpus's text_field in the spec or fix the record")
    for f in fields:
        value = record.get(f)
        if value is not None and not isinstance(value, str):
            raise CurationError(f"{where}: field {f!r} is {type(value).__name__}, expected a string")
    return record


# --- the stage --------------------------------------------------------------------------------


def load_counter(path: Path) -> Callable[[str], int]:
    """Token counter with the real Llama 3 tokenizer (no special tokens)."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise CurationError(f"{path}: tokenizer not found; build the base stage first (./inv release --only base)")
    tok = Tokenizer.from_file(str(path))
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids) if text else 0


def curate_texts(records: Iterable[str], language: str | None, cleaner: Cleaner, tally: Tally,
                 budget: int | None = None) -> Iterator[str]:
    """Stream cleaned texts; with ``budget`` stop keeping once that many tokens are kept (the
    English replay share), tallying the rest as dropped by ``replay``."""
    kept = 0
    for text in records:
        clean = cleaner.document(text, language, tally)
        if clean is None:
            continue
        if budget is not None:
            n = cleaner.count(clean)
            if kept + n > budget:
                tally.add("replay", n, None)
                continue
            kept += n
            tally.add("replay", n, n)
        yield clean


def instruct_messages(record: dict, system_prompt: str) -> list[dict] | None:
    """An Alif row as a chat: system prompt, user (instruction + input), assistant (output)."""
    instruction = normalize(record.get("instruction") or "")
    extra = normalize(record.get("input") or "")
    output = normalize(record.get("output") or "")
    if not instruction or not output:
        return None
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": user},
            {"role": "assistant", "content": output}]


def curate(spec: Spec, out: Path, *, count_tokens: Callable[[str], int], progress: bool = True) -> dict:
    """Write cpt.jsonl, sft.jsonl and report.json into ``out``; return the headline figures."""
    start = time.perf_counter()
    cleaner = Cleaner(spec.data.filters, count_tokens)
    main = [c for c in spec.data.corpora if c.language != "en"]
    replay = [c for c in spec.data.corpora if c.language == "en"]
    report: dict = {"corpora": {}, "replay": {}, "instruct": {}}
    kept_main = kept_replay = docs = 0
    with atomic_path(out / CPT_FILE) as tmp, open(tmp, "w", encoding="utf-8") as fh, _Progress(progress) as bar:
        for group in (main, replay):
            for corpus in group:
                budget = None
                if corpus.language == "en":
                    share = spec.data.replay_share
                    budget = int(kept_main * share / (1 - share)) - kept_replay if share < 1 else None
                tally = Tally()
                texts = (r[corpus.text_field] or "" for _, r in bar.track(
                    read_records(spec.resolve(corpus.path), corpus.format, (corpus.text_field,)), corpus.name))
                for text in curate_texts(texts, corpus.language, cleaner, tally, budget):
                    fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                    docs += 1
                order = TEXT_FILTERS + (("replay",) if budget is not None else ())
                report["corpora"][corpus.name] = {"language": corpus.language, "path": corpus.path,
                                                  **tally.report(order)}
                kept = report["corpora"][corpus.name]["tokens_out"]
                if corpus.language == "en":
                    kept_replay += kept
                else:
                    kept_main += kept
        fh.flush()
        sft = _write_sft(spec, out, cleaner, bar)
    total_in = sum(c["tokens_in"] for c in report["corpora"].values())
    total_out = kept_main + kept_replay
    report["replay"] = {
        "target_share": round(spec.data.replay_share, 6),
        "share": round(kept_replay / total_out, 6) if total_out else 0.0,
        "urdu_tokens": kept_main, "english_tokens": kept_replay,
    }
    report["instruct"] = sft
    report["total"] = {
        "docs_in": sum(c["docs_in"] for c in report["corpora"].values()), "docs_out": docs,
        "tokens_in": total_in, "tokens_out": total_out,
        "kept_tokens": round(total_out / total_in, 6) if total_in else 0.0,
        "card_kept_tokens": spec.data.retained_fraction,
    }
    write_json(out / REPORT_FILE, report)
    return {
        "cpt_documents": docs, "cpt_tokens": total_out, "urdu_tokens": kept_main, "english_tokens": kept_replay,
        "replay_share": report["replay"]["share"], "kept_tokens": report["total"]["kept_tokens"],
        "tokens_in": total_in, "sft_examples": sft["docs_out"], "sft_tokens": sft["tokens_out"],
        "seconds": round(time.perf_counter() - start, 2),
    }


def _write_sft(spec: Spec, out: Path, cleaner: Cleaner, bar: "_Progress") -> dict:
    corpus: Corpus = spec.data.instruct
    tally = Tally()
    seen: set[bytes] = set()
    with atomic_path(out / SFT_FILE) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for _, record in bar.track(read_records(spec.resolve(corpus.path), corpus.format, ALIF_FIELDS), corpus.name):
            raw = "\n\n".join(record.get(f) or "" for f in ALIF_FIELDS)
            n = cleaner.count(raw)
            messages = instruct_messages(record, spec.chat.system_prompt)
            text = "\n\n".join(m["content"] for m in messages[1:]) if messages else ""
            m = cleaner.count(text)
            tally.add("normalize", n, m)
            tally.add("empty", m, m if messages else None)
            if messages is None:
                continue
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            tally.add("exact_dup", m, None if digest in seen else m)
            if digest in seen:
                continue
            seen.add(digest)
            fh.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        fh.flush()
    return {"name": corpus.name, "path": corpus.path, **tally.report(INSTRUCT_FILTERS)}


class _Progress:
    """A rich progress line per corpus (records read), or nothing."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.progress import Progress

            self.bar = Progress(transient=True)
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def track(self, items: Iterable, name: str) -> Iterator:
        if self.bar is None:
            yield from items
            return
        task = self.bar.add_task(f"curating {name}", total=None)
        for item in items:
            yield item
            self.bar.advance(task)


def folder(spec: Spec) -> Path:
    return spec.build_dir / STAGE


def inputs(spec: Spec) -> dict[str, Path]:
    """The base's tokenizer (from the pipeline) and every corpus the spec names."""
    from release import pipeline  # imported here: the pipeline imports the stages

    found = dict(pipeline.upstream(spec, STAGE))
    for c in (*spec.data.corpora, spec.data.instruct):
        path = spec.resolve(c.path)
        if not path.exists():
            raise CurationError(f"{path}: no such corpus file or folder; fix data corpus {c.name!r} path in {spec.path}")
        found[f"corpus:{c.name}"] = path
    return found


def run(spec: Spec, *, force: bool = False, progress: bool = True) -> Manifest:
    """Stage ``data``: skipped when the corpora, the tokenizer and the spec's data/chat facts are
    unchanged."""
    found = inputs(spec)
    sections = {k: spec.section_hash(k) for k in ("data", "chat.system_prompt")}

    def build(out: Path) -> dict:
        return curate(spec, out, count_tokens=load_counter(found["tokenizer"]), progress=progress)

    return run_stage(STAGE, folder(spec), build, release=spec.release.name, inputs=found,
                     spec_sections=sections, tools=TOOLS, force=force)


def summary(spec: Spec, manifest: Manifest, console=None) -> None:
    """The retention table: documents and tokens in and out per corpus, and the kept share."""
    from rich.table import Table

    report = json.loads((folder(spec) / REPORT_FILE).read_text(encoding="utf-8"))
    table = Table(title=f"data: {spec.release.name} ({'built' if manifest.built else 'up to date'})")
    for col in ("corpus", "docs in", "docs out", "tokens in", "tokens out", "kept tokens", "dropped most by"):
        table.add_column(col, justify="left" if col in ("corpus", "dropped most by") else "right")
    rows = [*report["corpora"].items(), (report["instruct"]["name"], report["instruct"])]
    for name, c in rows:
        worst = max(c["filters"], key=lambda s: s["tokens_in"] - s["tokens_out"], default=None)
        table.add_row(name, f"{c['docs_in']:,}", f"{c['docs_out']:,}", f"{c['tokens_in']:,}", f"{c['tokens_out']:,}",
                      f"{100 * c['kept_tokens']:.1f}%", worst["filter"] if worst else "")
    (console or summary_console()).print(table)
    f = manifest.figures
    (console or summary_console()).print(
        f"CPT set: {f['cpt_documents']:,} documents, {f['cpt_tokens']:,} tokens ({100 * f['replay_share']:.1f}% English "
        f"replay, target {100 * spec.data.replay_share:.1f}%); kept {100 * f['kept_tokens']:.1f}% of the raw tokens "
        f"(card: {100 * spec.data.retained_fraction:.1f}%). SFT set: {f['sft_examples']:,} chats. "
        f"Report: {folder(spec) / REPORT_FILE}")
