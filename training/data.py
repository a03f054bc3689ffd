"""Stage ``data``: raw corpora -> cleaned, deduplicated training sets and a retention report.

The curation is a chain of datatrove pipelines (``plan``), run by datatrove's local executor on
every core by default, or handed unchanged to its Slurm or Ray executor (``executors``,
training/cluster.py). An input is a file, or a range of whole lines of a large plain one
(``ranges``):

  clean     (one task per input)       read -> normalize -> boilerplate -> length -> script
                                       -> repetition -> write the survivors (JSONL)
                                       -> exact-duplicate signature (64-bit xxhash of the text)
  exact     (1 task)                   datatrove's ExactFindDedups: every copy but the first
  minhash   (one task per input)       exact filter -> MinHash signature (character 5-grams)
  buckets   (one task per LSH band)    datatrove's MinhashDedupBuckets: candidate pairs
  verify    (1 task)                   candidate pairs kept when their estimated Jaccard
                                       similarity reaches the threshold
  cluster   (1 task)                   datatrove's MinhashDedupCluster: one document per cluster
  keep      (one task per input)       exact and near-duplicate filters -> the input's cpt.jsonl
                                       lines, their token counts, its filter counts
  assemble  (1 task)                   the files' lines in order (English: within the replay
                                       budget) -> cpt.jsonl; the instruct set -> sft.jsonl; report.json

Memory does not grow with the corpus: documents stream through each task, the dedup stages
work from sorted files on disk, and the only in-memory indexes are per task (about 0.2 KB per
document of its input) or per duplicate (the clusters). Datatrove's intermediate files live
in ``build/<release>/.checkpoints/data-<fingerprint>/``: a run that is interrupted starts again
from the tasks that had not finished (datatrove's completion marks), and every task's output
depends only on its input, so the result has the same bytes as an uninterrupted run's, on
any number of workers. The folder is removed after success.

Outputs (``build/<release>/data/``):
- ``cpt.jsonl``: ``{"text": ...}`` per document, the Urdu corpora then English replay at the
  share the spec's token counts give (``spec.data.replay_share``), in corpus, file and line order;
- ``sft.jsonl``: ``{"messages": [system, user, assistant]}`` per Alif Urdu-instruct example, with
  the release's Urdu system prompt;
- ``report.json``: documents and tokens in/out of every filter, per corpus, the kept share, and
  the bad input (``bad_data``: how many records, the first 100 named; all of them in
  ``bad_data.txt`` when there are any).

Tokens are counted with the base model's Llama 3 tokenizer (``base/tokenizer.json``), without
special tokens (training/tokens.py). Text normalisation and the filters' measures are in
training/clean.py, the pipeline steps in training/steps.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from release.artifacts import (
    Manifest,
    Traits,
    atomic_path,
    fingerprint,
    input_digest,
    run_stage,
    stage_dir,
    summary_console,
    tool_versions,
    write_json,
)
from release.errors import CurationError
from release.spec import Spec
from training import cluster
from training.clean import normalize, repetition, script_ratio  # noqa: F401  (the stage's measures, by name)
from training.cluster import LOCAL, Executor
from training.tokens import Counter, counter

if TYPE_CHECKING:
    from training.steps import Problems, Source

STAGE = "data"
TRAITS = Traits(image="train", clustered=True)  # datatrove and the tokenizers live in the train image
CPT_FILE = "cpt.jsonl"
SFT_FILE = "sft.jsonl"
REPORT_FILE = "report.json"
BAD_DATA_FILE = "bad_data.txt"
TOOLS = ("datatrove", "tiktoken", "tokenizers", "pyarrow", "numpy")
# Alif Urdu-instruct rows (Alpaca layout): instruction, optional input, output.
ALIF_FIELDS = ("instruction", "input", "output")
TEXT_FILTERS = ("normalize", "boilerplate", "length", "script", "repetition", "exact_dup", "near_dup")
CLEAN_FILTERS = TEXT_FILTERS[:5]
INSTRUCT_FILTERS = ("normalize", "empty", "exact_dup")
SUFFIXES = {"jsonl": (".jsonl", ".jsonl.gz", ".jsonl.zst"), "parquet": (".parquet",),
            "text": (".txt", ".txt.gz", ".txt.zst")}
MAX_FILES = 65534  # exact dedup ranks copies by input (a 16-bit priority): the first file (range) wins
# A large uncompressed file is read as ranges of about this size, one task each, so one big
# corpus file keeps every worker busy (local, Ray or Slurm); small enough for 8 or more tasks
# per 150 MB file, large enough that a task's start (ms) is nothing next to its work (~5 s).
RANGE_BYTES = 16 * 2**20
# Below this much raw input a pool of worker processes costs more to start than it saves
# (benchmarks/data.py --small, one file on 2 cores, one process vs two: 24 MB 8.0 s vs 8.9 s,
# 32 MB 10.0 s vs 8.9 s, 64 MB 18.0 s vs 13.4 s).
SMALL_INPUT = 32 * 2**20


# --- the corpora ------------------------------------------------------------------------------


def corpus_files(path: Path, fmt: str) -> list[Path]:
    """A corpus is a file or a folder of files (``*.jsonl[.gz|.zst]``, ``*.parquet``,
    ``*.txt[.gz|.zst]``), sorted by path."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES[fmt]))
        if files:
            return files
        raise CurationError(f"{path}: no {'/'.join('*' + s for s in SUFFIXES[fmt])} files in this corpus folder; "
                            "fix the corpus path or format in the spec")
    raise CurationError(f"{path}: no such corpus file or folder; fix the corpus path in the spec")


def cpt_order(spec: Spec) -> list:
    """The text corpora in the order of the CPT set: the Urdu ones, then the English replay."""
    return [c for c in spec.data.corpora if c.language != "en"] + [c for c in spec.data.corpora if c.language == "en"]


def sources(spec: Spec, range_bytes: int | None = None) -> list[Source]:
    """Every input of the text corpora, in CPT order: the Urdu corpora, then the English replay
    corpora, each in spec order, files sorted, and a large uncompressed JSONL or text file as
    ranges of whole lines (``ranges``) so that every worker takes a share of it. Task ``rank``
    of a per-input job reads ``sources[rank]``."""
    from training.steps import Source  # datatrove: in the train image, not the release image

    size = range_bytes or RANGE_BYTES
    out = [Source(c.name, c.language, c.format, str(f), (c.text_field,), start, end, line)
           for c in cpt_order(spec) for f in corpus_files(spec.resolve(c.path), c.format)
           for start, end, line in ranges(f, c.format, size)]
    if len(out) > MAX_FILES:
        raise CurationError(f"{len(out)} inputs (files and ranges of {size // 2**20} MiB): at most {MAX_FILES}; "
                            "merge shards into bigger files")
    return out


def ranges(path: Path, fmt: str, size: int) -> list[tuple[int, int | None, int]]:
    """``(start, end, first line number)`` of the ranges of ``path``, about ``size`` bytes each,
    each starting at a line that begins a record: any line of JSONL, the line after a blank line
    of text (where a document ends anyway). The whole file (``(0, None, 1)``) when it is smaller,
    compressed or Parquet: those cannot be entered in the middle. The records each range yields
    are the file's, in order, under the same ``file:line`` names, so the output does not change."""
    if fmt not in ("jsonl", "text") or not path.name.endswith((".jsonl", ".txt")):
        return [(0, None, 1)]
    total = path.stat().st_size
    if total <= size:
        return [(0, None, 1)]
    starts = [0]
    with open(path, "rb") as fh:
        for target in range(size, total, size):
            if target <= starts[-1]:
                continue
            fh.seek(target - 1)
            fh.readline()  # to the start of the next line (target itself when a line ends before it)
            while fmt == "text" and (line := fh.readline()) and line.strip():
                pass  # text: past the next blank line
            at = fh.tell()
            if at >= total:
                break
            starts.append(at)
        numbers, at, seen = [], 0, 0
        fh.seek(0)
        for start in starts:  # line numbers: the newlines before each start, counted in one pass
            while at < start:
                block = fh.read(min(start - at, 1 << 24))
                seen += block.count(b"\n")
                at += len(block)
            numbers.append(seen + 1)
    return [(a, b, n) for a, b, n in zip(starts, [*starts[1:], None], numbers, strict=True)]


def read_records(path: Path, fmt: str, fields: tuple[str, ...], problems: Problems | None = None
                 ) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` of every good record of a corpus, ``where`` = ``file:line`` (or
    ``file:row N``); bad ones go to ``problems`` (default: refused, one line)."""
    from training.steps import Problems, Source, reader  # datatrove: in the train image, not the release image

    problems = problems or Problems("refuse")
    for f in corpus_files(path, fmt):
        src = Source("", None, fmt, str(f), fields)
        yield from reader(src, problems).records(f.name)


# --- the datatrove plan -----------------------------------------------------------------------


@dataclass
class Job:
    """One datatrove pipeline and the number of tasks it runs."""

    name: str
    pipeline: list
    tasks: int


@dataclass
class Work:
    """The curation's working folder: datatrove's intermediate files (``at("clean")``, ...),
    and each job's logs, stats and completion marks (``logs(job)``)."""

    root: Path

    def at(self, sub: str) -> str:
        return str(self.root / sub)

    def logs(self, job: str) -> str:
        return str(self.root / "logs" / job)


def minhash_config(spec: Spec):
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig

    from training.steps import lsh_bands

    f = spec.data.filters
    bands, rows = lsh_bands(f.near_duplicate_jaccard, f.minhash_permutations)
    return MinhashConfig(num_buckets=bands, hashes_per_bucket=rows, seed=1, hash_config=HashConfig(precision=32))


def exact_config():
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
    from datatrove.utils.hashing import HashConfig

    from training.steps import exact_text, first_source_wins

    return ExactDedupConfig(content_getter=exact_text, document_priority=first_source_wins,
                            hash_config=HashConfig(precision=64, hash_fc="xxhash"))


def plan(spec: Spec, out: Path, work: Work, count: Counter, srcs: list[Source] | None = None) -> list[Job]:
    """The curation as datatrove jobs, in order; the last one writes ``out``. The per-input jobs
    run a task per file, or per range of a large file (``sources``)."""
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupSignature, ExactFindDedups
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupCluster
    from datatrove.pipeline.writers.jsonl import JsonlWriter

    from training import steps

    srcs, f = sources(spec) if srcs is None else srcs, spec.data.filters
    mh, ex = minhash_config(spec), exact_config()
    files = len(srcs)
    at = work.at
    clean = [
        steps.SourceReader(srcs, spec.data.on_bad_data, at("problems")),
        steps.Normalize(count), steps.Boilerplate(f.boilerplate, count), steps.MinLength(f.min_chars),
        steps.ScriptRatio(f.min_script_ratio), steps.Repetition(f.max_repetition),
        JsonlWriter(at("clean"), output_filename="${rank}.jsonl", compression=None, adapter=steps.intermediate_record),
        ExactDedupSignature(at("exact/sigs"), config=ex),
    ]
    minhash = [
        steps.Intermediate(at("clean")), _exact_filter(work, ex),
        steps.CharMinhashSignature(at("minhash/buckets"), at("minhash/full"), mh, f.minhash_permutations),
    ]
    verify = steps.VerifyPairs(at("minhash/pairs"), at("minhash/full"), at("minhash/verified"),
                               f.minhash_permutations, f.near_duplicate_jaccard)
    return [
        Job("clean", clean, files),
        Job("exact", [ExactFindDedups(at("exact/sigs"), at("exact/dups"), config=ex)], 1),
        Job("minhash", minhash, files),
        Job("buckets", [MinhashDedupBuckets(at("minhash/buckets"), at("minhash/pairs"), config=mh)], mh.num_buckets),
        Job("verify", [verify], 1),
        Job("cluster", [MinhashDedupCluster(at("minhash/verified"), at("minhash/remove"), config=mh)], 1),
        Job("keep", [Keep(str(work.root))], files),
        Job("assemble", [Assemble(spec, str(out), str(work.root), count, srcs)], 1),
    ]


def _exact_filter(work: Work, config):
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupFilter

    return ExactDedupFilter(work.at("exact/dups"), config=config)


def executors(jobs: list[Job], work: Work, kind: str = "local", workers: int | None = None, **options) -> list:
    """One datatrove executor per job, each depending on the one before, so that running the
    last runs them all in order. ``kind``: ``local`` (datatrove's LocalPipelineExecutor: up to
    ``workers`` tasks at a time, default every core), ``slurm`` (SlurmPipelineExecutor: pass its
    options, e.g. ``partition``, ``time``, ``cpus_per_task``, ``venv_path``) or ``ray``
    (RayPipelineExecutor, on the Ray cluster that ``ray.init()`` joined). The working folder
    must be on storage every node sees."""
    from datatrove.executor import LocalPipelineExecutor

    out: list = []
    for job in jobs:
        common = dict(pipeline=job.pipeline, tasks=job.tasks, logging_dir=work.logs(job.name),
                      depends=out[-1] if out else None, **options)
        if kind == "local":
            n = min(workers or os.cpu_count() or 1, job.tasks)
            out.append(LocalPipelineExecutor(workers=n, **common))
        elif kind == "slurm":
            from training.steps import SlurmJobs

            out.append(SlurmJobs(job_name=f"curate-{job.name}", **common))
        elif kind == "ray":
            from datatrove.executor import RayPipelineExecutor

            out.append(RayPipelineExecutor(**common))
        else:
            raise CurationError(f"executor {kind!r}: expected local, slurm or ray")
    return out


def task_stats(work: Work, job: str, rank: int) -> dict[str, dict[str, float]]:
    """datatrove's saved stats of one task (``logs/<job>/stats/<rank>.json``, a list of steps,
    each metric a total or a dict with one): step name -> metric -> total."""
    path = Path(work.logs(job)) / "stats" / f"{rank:05d}.json"
    out: dict[str, dict[str, float]] = {}
    for step in json.loads(path.read_text(encoding="utf-8")):
        metrics = step.get("stats") or {}
        out[step["name"].split(": ", 1)[-1]] = {k: v["total"] if isinstance(v, dict) else v for k, v in metrics.items()}
    return out


# --- the last job: filters, replay, outputs, report -------------------------------------------


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

    def add_step(self, step: Step) -> None:
        s = self.steps.setdefault(step.filter, Step(step.filter))
        for k in ("docs_in", "tokens_in", "docs_out", "tokens_out"):
            setattr(s, k, getattr(s, k) + getattr(step, k))

    def report(self, order: tuple[str, ...]) -> dict:
        steps = [vars(self.steps[n]) for n in order if n in self.steps and self.steps[n].docs_in]
        first, last = (steps[0], steps[-1]) if steps else ({}, {})
        docs_in, tokens_in = first.get("docs_in", 0), first.get("tokens_in", 0)
        docs_out, tokens_out = last.get("docs_out", 0), last.get("tokens_out", 0)
        return {
            "filters": steps,
            "docs_in": docs_in, "docs_out": docs_out, "tokens_in": tokens_in, "tokens_out": tokens_out,
            "kept_docs": round(docs_out / docs_in, 6) if docs_in else 0.0,
            "kept_tokens": round(tokens_out / tokens_in, 6) if tokens_in else 0.0,
        }


def _counted(docs: Iterable, step: Step, side: str) -> Iterator:
    """Pass documents on, adding each to ``step``'s documents and tokens ``in`` or ``out``."""
    for doc in docs:
        setattr(step, f"docs_{side}", getattr(step, f"docs_{side}") + 1)
        setattr(step, f"tokens_{side}", getattr(step, f"tokens_{side}") + doc.metadata["tokens"])
        yield doc


def kept_documents(work: Work, rank: int, files: int, tally: Tally) -> Iterator:
    """The documents of input file ``rank`` that both duplicate filters keep, in file order;
    the cleaning filters (from the task's stats) and the two duplicate filters are added to
    ``tally`` once the file is read."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupFilter

    from training import steps

    stats = task_stats(work, "clean", rank)
    counts = [Step(n, *(int(stats.get(n, {}).get(k, 0)) for k in ("docs_in", "tokens_in", "docs_out", "tokens_out")))
              for n in CLEAN_FILTERS]
    exact, near = Step("exact_dup", counts[-1].docs_out, counts[-1].tokens_out), Step("near_dup")
    docs = steps.Intermediate(work.at("clean")).run(None, rank, files)
    docs = _counted(_exact_filter(work, exact_config()).run(docs, rank, files), exact, "out")
    docs = _counted(docs, near, "in")
    yield from _counted(MinhashDedupFilter(work.at("minhash/remove")).run(docs, rank, files), near, "out")
    for step in (*counts, exact, near):
        tally.add_step(step)


def cpt_line(text: str) -> bytes:
    """One line of cpt.jsonl: the bytes of ``json.dumps({"text": text}, ensure_ascii=False)``
    (a test checks them equal on every code point), at orjson's speed."""
    import orjson

    return b'{"text": ' + orjson.dumps(text) + b"}\n"


class Keep:
    """The ``keep`` job (one task per input): the documents of input ``rank`` that both
    duplicate filters keep, as cpt.jsonl lines (``kept/<rank>.jsonl``), their token counts
    (``kept/<rank>.tokens``, uint32 per line) and the file's filter counts (``kept/<rank>.json``).
    Each is written under a temporary name and renamed, so ``assemble`` never reads half a file;
    a task cut short has no datatrove completion mark and runs again from the start."""

    def __init__(self, work: str):
        self.work = work

    def __call__(self, data=None, rank: int = 0, world_size: int = 1):
        from array import array

        work, tally = Work(Path(self.work)), Tally()
        folder = Path(work.at("kept"))
        folder.mkdir(parents=True, exist_ok=True)
        counts = array("I")  # 4 bytes per kept document of this one file
        assert counts.itemsize == 4
        with atomic_path(folder / f"{rank:05d}.jsonl") as tmp, open(tmp, "wb") as fh:
            for doc in kept_documents(work, rank, world_size, tally):
                fh.write(cpt_line(doc.text))
                counts.append(doc.metadata["tokens"])
        with atomic_path(folder / f"{rank:05d}.tokens") as tmp, open(tmp, "wb") as fh:
            counts.tofile(fh)
        write_json(folder / f"{rank:05d}.json", {"docs": len(counts), "steps": [vars(x) for x in tally.steps.values()]})
        return data


class Assemble:
    """The last job (one task): the kept documents of every input file, in order, with the
    English replay budget -> ``cpt.jsonl``; the instruct set -> ``sft.jsonl``; the report. A
    datatrove pipeline step in the form of a callable ``(data, rank, world_size)``."""

    def __init__(self, spec: Spec, out: str, work: str, count: Counter, srcs: list[Source]):
        self.spec, self.out, self.work, self.count, self.srcs = spec, out, work, count, srcs

    def __call__(self, data=None, rank: int = 0, world_size: int = 1):
        assemble(self.spec, Path(self.out), Work(Path(self.work)), self.count, self.srcs)
        return data


def assemble(spec: Spec, out: Path, work: Work, count: Counter, srcs: list[Source] | None = None) -> dict:
    """Write cpt.jsonl, sft.jsonl, report.json (and bad_data.txt) into ``out``; return the report.
    A file without a replay budget is copied as the ``keep`` job wrote it; only the English
    replay files are read line by line, to spend the budget."""
    import numpy as np

    srcs = sources(spec) if srcs is None else srcs
    share = spec.data.replay_share
    report: dict = {"corpora": {}, "replay": {}, "instruct": {}}
    tallies = {c.name: Tally() for c in spec.data.corpora}
    kept = {"ur": 0, "en": 0}
    docs = 0
    folder = Path(work.at("kept"))
    with atomic_path(out / CPT_FILE) as tmp, open(tmp, "wb") as fh:
        for rank, src in enumerate(srcs):
            tally = tallies[src.corpus]
            info = json.loads((folder / f"{rank:05d}.json").read_text(encoding="utf-8"))
            for step in info["steps"]:
                tally.add_step(Step(**step))
            tokens = np.fromfile(folder / f"{rank:05d}.tokens", dtype=np.uint32)
            lang = "en" if src.language == "en" else "ur"
            with open(folder / f"{rank:05d}.jsonl", "rb") as lines:
                if src.language != "en" or share >= 1:
                    shutil.copyfileobj(lines, fh, 1 << 20)
                    kept[lang] += int(tokens.sum(dtype=np.uint64))
                    docs += len(tokens)
                    continue
                budget = int(kept["ur"] * share / (1 - share)) - kept["en"]
                for line, n in zip(lines, map(int, tokens), strict=True):
                    if n > budget:
                        tally.add("replay", n, None)
                        continue
                    budget -= n
                    tally.add("replay", n, n)
                    kept[lang] += n
                    fh.write(line)
                    docs += 1
        fh.flush()
    for c in cpt_order(spec):
        order = TEXT_FILTERS + (("replay",) if c.language == "en" and share < 1 else ())
        report["corpora"][c.name] = {"language": c.language, "path": c.path, **tallies[c.name].report(order)}
    instruct_problems: list[str] = []
    report["instruct"] = _write_sft(spec, out, count, instruct_problems)
    _totals(spec, report, kept, docs)
    report["bad_data"] = _bad_data(spec, out, work, len(srcs), instruct_problems)
    write_json(out / REPORT_FILE, report)
    return report


def _bad_data(spec: Spec, out: Path, work: Work, files: int, instruct: list[str]) -> dict:
    """Every task's bad input (then the instruct set's), in order, into ``bad_data.txt`` when
    there is any; the report gets the count and the first 100."""
    first: list[str] = []
    count = 0

    def lines():
        for rank in range(files):
            path = Path(work.at("problems")) / f"{rank:05d}.txt"
            if path.is_file():
                with open(path, encoding="utf-8") as f:
                    yield from f
        yield from (x + "\n" for x in instruct)

    with atomic_path(out / BAD_DATA_FILE) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for line in lines():
            fh.write(line)
            count += 1
            if len(first) < 100:
                first.append(line.rstrip("\n"))
        fh.flush()
    if not count:
        (out / BAD_DATA_FILE).unlink()
    return {"policy": spec.data.on_bad_data, "count": count, "first": first}


def _totals(spec: Spec, report: dict, kept: dict[str, int], docs: int) -> None:
    total_in = sum(c["tokens_in"] for c in report["corpora"].values())
    total_out = kept["ur"] + kept["en"]
    report["replay"] = {
        "target_share": round(spec.data.replay_share, 6),
        "share": round(kept["en"] / total_out, 6) if total_out else 0.0,
        "urdu_tokens": kept["ur"], "english_tokens": kept["en"],
    }
    report["total"] = {
        "docs_in": sum(c["docs_in"] for c in report["corpora"].values()), "docs_out": docs,
        "tokens_in": total_in, "tokens_out": total_out,
        "kept_tokens": round(total_out / total_in, 6) if total_in else 0.0,
        "card_kept_tokens": spec.data.retained_fraction,
    }


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


def _write_sft(spec: Spec, out: Path, count: Counter, problems: list[str]) -> dict:
    """The instruct set, read in one pass (it is small next to the CPT corpora): Alif rows as
    chats, the exact duplicates (of the user and assistant text) dropped."""
    corpus = spec.data.instruct
    tally = Tally()
    seen: set[bytes] = set()
    from training.steps import Problems

    bad = Problems(spec.data.on_bad_data)
    with atomic_path(out / SFT_FILE) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for _, record in read_records(spec.resolve(corpus.path), corpus.format, ALIF_FIELDS, bad):
            raw = "\n\n".join(record.get(f) or "" for f in ALIF_FIELDS)
            n = count(raw)
            messages = instruct_messages(record, spec.chat.system_prompt)
            text = "\n\n".join(m["content"] for m in messages[1:]) if messages else ""
            m = count(text)
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
    problems += bad.lines
    return {"name": corpus.name, "path": corpus.path, **tally.report(INSTRUCT_FILTERS)}


# --- running it -------------------------------------------------------------------------------


def curate(spec: Spec, out: Path, *, work: Path, count: Counter, workers: int | None = None,
           progress: bool = True, range_bytes: int | None = None, executor: Executor = LOCAL) -> dict:
    """Run the curation plan and return the manifest's figures: with datatrove's local executor
    (``workers`` processes, default every core; one, in this process, for inputs under
    ``SMALL_INPUT``), or on the Ray or Slurm cluster ``executor`` names (training/cluster.py)."""
    start = time.perf_counter()
    w = Work(work)
    srcs = sources(spec, range_bytes)
    jobs = plan(spec, out, w, count, srcs)
    if executor.kind != "local":
        workers = None
    elif workers is None:
        small = sum(Path(p).stat().st_size for p in {s.path for s in srcs}) < SMALL_INPUT
        workers = 1 if small else (os.cpu_count() or 1)
    seconds: dict[str, float] = {}
    with _quiet(work / "console.log"), _Progress(progress) as bar:

        @contextmanager
        def timed(job: Job):
            t = time.perf_counter()
            with bar.job(job, Path(w.logs(job.name))):
                yield
            seconds[job.name] = round(time.perf_counter() - t, 2)

        if executor.kind == "ray":
            cluster.ray_jobs(jobs, w, executor, timed)
        elif executor.kind == "slurm":
            cluster.slurm_jobs(jobs, w, executor, timed, executors)
        else:
            for job, ex in zip(jobs, executors(jobs, w, "local", workers), strict=True):
                with timed(job):
                    ex.run()
    report = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
    r, t, sft = report["replay"], report["total"], report["instruct"]
    return {
        "cpt_documents": t["docs_out"], "cpt_tokens": t["tokens_out"], "urdu_tokens": r["urdu_tokens"],
        "english_tokens": r["english_tokens"], "replay_share": r["share"], "kept_tokens": t["kept_tokens"],
        "tokens_in": t["tokens_in"], "sft_examples": sft["docs_out"], "sft_tokens": sft["tokens_out"],
        "bad_data": report["bad_data"]["count"], "input_files": len({s.path for s in srcs}), "tasks": len(srcs),
        "workers": workers, "executor": executor.kind,
        "seconds": round(time.perf_counter() - start, 2), "job_seconds": seconds,
    }


@contextmanager
def _quiet(log: Path):
    """datatrove logs every task (loguru, tqdm) to stderr; send that to ``log`` instead: this
    process's ``sys.stderr`` and file descriptor 2, which worker processes inherit. Errors still
    reach the user as one line."""
    import sys

    from datatrove.utils.logging import setup_default_logger

    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved_fd, saved = os.dup(2), sys.stderr
    sink = open(log, "a", buffering=1, encoding="utf-8")
    os.dup2(sink.fileno(), 2)
    sys.stderr = sink
    setup_default_logger()
    try:
        yield
    finally:
        sys.stderr = saved
        setup_default_logger()  # loguru's handler back on the real stderr
        sink.close()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)


class _Progress:
    """A rich progress line per job (tasks completed, from datatrove's completion marks), or nothing."""

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

    @contextmanager
    def job(self, job: Job, logs: Path):
        if self.bar is None:
            yield
            return
        task = self.bar.add_task(f"curating: {job.name}", total=job.tasks)
        done = threading.Event()

        def poll() -> None:
            while not done.wait(0.5):
                marks = logs / "completions"
                self.bar.update(task, completed=len(list(marks.iterdir())) if marks.is_dir() else 0)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.bar.update(task, completed=job.tasks)


# --- the stage --------------------------------------------------------------------------------


def corpora(spec: Spec, inputs: Mapping[str, Path]) -> dict[str, Path]:
    """``inputs`` (the base's ``tokenizer``) and every corpus the spec names: what the stage reads."""
    found = dict(inputs)
    for c in (*spec.data.corpora, spec.data.instruct):
        path = spec.resolve(c.path)
        if not path.exists():
            raise CurationError(f"{path}: no such corpus file or folder; fix data corpus {c.name!r} path in "
                                f"{spec.path}")
        found[f"corpus:{c.name}"] = path
    return found


def _sections(spec: Spec) -> dict[str, str]:
    return {k: spec.section_hash(k) for k in ("data", "chat.system_prompt")}


def work_folder(spec: Spec, found: dict[str, Path]) -> Path:
    """Where datatrove's intermediate files go: keyed like the stage, so a changed input or spec
    section starts afresh and an interrupted run of the same inputs resumes."""
    key = fingerprint({k: input_digest(v) for k, v in found.items()}, _sections(spec), tool_versions(*TOOLS))
    return spec.build_dir / ".checkpoints" / f"{STAGE}-{key[:16]}"


def run(spec: Spec, inputs: Mapping[str, Path], *, force: bool = False, progress: bool = True) -> Manifest:
    """Stage ``data`` with a worker per core; ``inputs["tokenizer"]``: the base's tokenizer.json.
    On a Ray or Slurm cluster: ``run_with(..., executor=)`` (the pipeline's choice, by ``TRAITS``)."""
    return run_with(spec, inputs, force=force, progress=progress)


def run_with(spec: Spec, inputs: Mapping[str, Path], *, workers: int | None = None, force: bool = False,
             progress: bool = True, executor: Executor = LOCAL) -> Manifest:
    """Stage ``data``: skipped when the corpora, the tokenizer and the spec's data/chat facts are
    unchanged; an interrupted run resumes from its finished datatrove tasks. ``workers``: processes
    on this machine (default: one per core); ``executor``: a Ray or Slurm cluster instead."""
    found = corpora(spec, inputs)
    work = work_folder(spec, found)

    def build(out: Path) -> dict:
        for stale in work.parent.glob(f"{STAGE}-*"):
            if stale != work or force:
                shutil.rmtree(stale, ignore_errors=True)
        return curate(spec, out, work=work, count=counter(found["tokenizer"]), workers=workers, progress=progress,
                      executor=executor)

    manifest = run_stage(STAGE, stage_dir(spec.build_dir, STAGE), build, release=spec.release.name, inputs=found,
                         spec_sections=_sections(spec), tools=TOOLS, force=force)
    if manifest.built:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def summary(spec: Spec, manifest: Manifest, console=None) -> None:
    """The retention table: documents and tokens in and out per corpus, and the kept share."""
    from rich.table import Table

    report = json.loads((stage_dir(spec.build_dir, STAGE) / REPORT_FILE).read_text(encoding="utf-8"))
    table = Table(title=f"data: {spec.release.name} ({'built' if manifest.built else 'up to date'})")
    for col in ("corpus", "docs in", "docs out", "tokens in", "tokens out", "kept tokens", "dropped most by"):
        table.add_column(col, justify="left" if col in ("corpus", "dropped most by") else "right")
    rows = [*report["corpora"].items(), (report["instruct"]["name"], report["instruct"])]
    for name, c in rows:
        worst = max(c["filters"], key=lambda s: s["tokens_in"] - s["tokens_out"], default=None)
        table.add_row(name, f"{c['docs_in']:,}", f"{c['docs_out']:,}", f"{c['tokens_in']:,}", f"{c['tokens_out']:,}",
                      f"{100 * c['kept_tokens']:.1f}%", worst["filter"] if worst else "")
    console = console or summary_console()
    console.print(table)
    f = manifest.figures
    bad = report.get("bad_data", {}).get("count", 0)
    console.print(
        f"CPT set: {f['cpt_documents']:,} documents, {f['cpt_tokens']:,} tokens "
        f"({100 * f['replay_share']:.1f}% English "
        f"replay, target {100 * spec.data.replay_share:.1f}%); kept {100 * f['kept_tokens']:.1f}% of the raw tokens "
        f"(card: {100 * spec.data.retained_fraction:.1f}%). SFT set: {f['sft_examples']:,} chats. "
        + (f"Bad input skipped: {bad:,} "
           f"(listed in {stage_dir(spec.build_dir, STAGE) / BAD_DATA_FILE}). " if bad else "")
        + f"Report: {stage_dir(spec.build_dir, STAGE) / REPORT_FILE}")
