"""Curation: normalisation, filters, deduplication, the retention report, the datatrove plan
(local workers, resume, cluster executors), input formats, bad input, streaming."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from conftest import ROOT, demo_release
from release import pipeline, urdu
from release.errors import CurationError, SpecError
from training import data, steps, tokens
from training.clean import normalize, repetition, script_ratio

# --- normalisation ----------------------------------------------------------------------------


def test_arabic_letter_forms_become_urdu():
    assert normalize("\u064a\u0649\u0643") == "\u06cc\u06cc\u06a9"  # ي ى ك -> ی ی ک
    # Arabic-keyboard Urdu: every heh typed as ه, yeh as ي, kaf as ك
    typed = "كتابوں كي اس پراني دكان ميں وقت جيسے ٹههر گيا تها۔ بوڑها دكاندار پڑه رها تها"
    assert normalize(typed) == "کتابوں کی اس پرانی دکان میں وقت جیسے ٹھہر گیا تھا۔ بوڑھا دکاندار پڑھ رہا تھا"
    assert normalize("٢٠٢٤") == "۲۰۲۴"  # Arabic-Indic digits -> Urdu (Extended Arabic-Indic) digits


def test_heh_goal_by_default_do_chashmi_only_in_aspirates():
    # final and medial /h/: heh goal (یہ، وہ، کہ، کہنا، بہت)
    assert normalize("يه وه كه كهنا بهت") == "یہ وہ کہ کہنا بہت"
    # aspirates: do-chashmi (بھی، تھے، ساتھ، ہاتھ has both)
    assert normalize("بهي تهے ساته هاته") == "بھی تھے ساتھ ہاتھ"
    # ambiguous Arabic-typed word: کہا 'said' and کھا 'eat' are both كها -> heh goal
    assert normalize("كها") == "کہا"
    # do-chashmi never starts a word
    assert normalize("ھم") == "ہم"
    # correct Urdu is left alone
    text = "ہم نے بھی کہا تھا کہ وہ کچھ نہیں کھائے گا۔"
    assert normalize(text) == text


def test_nfc_and_junk_removal():
    assert normalize("\u06c1\u0654") == "\u06c2"  # heh goal + hamza above composes (NFC)
    junk = "\ufeffگا\u200bؤں \u200eبچے\u200f انت\u00adظار\x07 \u202bمیں\u202c"
    assert normalize(junk) == "گاؤں بچے انتظار میں"
    assert normalize("a\r\nb\tc  d\u00a0e\n\n\n\nf\u2028g") == "a\nb c d e\n\nf\ng"


def test_zwnj_kept_only_between_arabic_letters():
    legit = "نام\u200cور"  # ZWNJ between two Urdu letters stops the join: kept
    assert normalize(legit) == legit
    assert normalize("\u200cنام \u200cور\u200c hello\u200cworld") == "نام ور hello" + "world"


def test_normalize_is_idempotent_on_the_demo_corpus():
    for line in (ROOT / "specs/demo/urdu.jsonl").read_text(encoding="utf-8").splitlines():
        once = normalize(json.loads(line)["text"])
        assert normalize(once) == once
        assert unicodedata.is_normalized("NFC", once)


# --- filters ----------------------------------------------------------------------------------


def test_script_ratio_and_repetition():
    assert script_ratio("یہ اردو ہے", "ur") == 1.0
    assert script_ratio("Click here to subscribe", "ur") == 0.0
    assert script_ratio("یہ اردو text ہے", "ur") == pytest.approx(8 / 12)
    assert script_ratio("English text", "en") == 1.0
    assert repetition("سستے داموں موبائل خریدیں " * 10) == 1.0
    assert repetition("ایک دو تین چار پانچ چھ سات") == 0.0
    # "a b c" twice in 8 words: 6 words covered
    assert repetition("a b c x a b c y") == pytest.approx(6 / 8)


def test_boilerplate_prefilter_is_exact():
    """The whole-text prefilter (a text none of the patterns matches is returned as it is) gives
    what the line-by-line removal gives, for the spec's patterns and for constructs that behave
    differently on a line and inside a text (^ and $, lookbehinds, \\b); the constructs that could
    match a line but not the text (\\A, \\Z, negative lookarounds) turn the prefilter off."""
    import random
    import re

    from release import spec as spec_mod
    from training.clean import strip_boilerplate, whole_text

    patterns = list(spec_mod.load(ROOT / "specs" / "qalb.toml").data.filters.boilerplate)
    patterns += [r"^ends here$", r"(?<=\s)tail\b", r"\bword\B", r"(?s)a.b", r"\s$"]
    assert whole_text(patterns) is not None
    for unsafe in (r"\Aintro", r"outro\Z", r"x(?!\s)", r"(?<!\S)y", r"(?(1)a|b)"):
        assert whole_text([*patterns, unsafe]) is None
    compiled, whole = [re.compile(p) for p in patterns], whole_text(patterns)
    pieces = ["مزید پڑھیں: یہاں", "شیئر کریں", "جملہ حقوق محفوظ ہیں", "Read more", "ALL RIGHTS RESERVED", "©",
              "ends here", "tail", " tail", "wordy", "word", "a", "b", "x", " ", "", "یہ اردو ہے۔", "  "]
    rng = random.Random(0)
    changed = 0
    for _ in range(3000):
        text = "".join(rng.choice(pieces) + rng.choice(["\n", " ", "", "\n\n"]) for _ in range(rng.randint(0, 8)))
        expected = strip_boilerplate(text, compiled)
        assert strip_boilerplate(text, compiled, whole) == expected, repr(text)
        changed += expected != text.strip()
    assert changed > 500  # the texts exercise removal, not only the prefilter's early return


def test_script_ratio_counts_as_release_urdu_does():
    """The filter counts letters with character classes (for speed); release/urdu.py's
    count_letters (str.isalpha over its script's blocks) is the definition: equal on the demo
    corpora and on the edge cases (presentation forms, BOM, digits, astral letters)."""
    texts = [json.loads(x)["text"] for f in ("urdu", "english")
             for x in (ROOT / f"specs/demo/{f}.jsonl").read_text(encoding="utf-8").splitlines()]
    texts += ["ﻻ ﷲ \ufeff ۱۲۳ abc ×÷ é", "\U0001d400\U0001d401 کتاب", "", "123 !!", "\u0780\u0710 ٹھیک"]
    for t in texts:
        script, letters = urdu.count_letters(t)
        assert script_ratio(t, "ur") == (script / letters if letters else 0.0), t
        latin = sum(c.isalpha() and ("a" <= c.lower() <= "z" or "\u00c0" <= c <= "\u024f") for c in t)
        assert script_ratio(t, "en") == (latin / letters if letters else 0.0), t


def _pipeline(docs: list[str], language: str = "ur", **kw) -> tuple[list[str], dict[str, list[int]]]:
    """The cleaning steps on ``docs`` (a word count as the token counter): the texts kept, and
    per filter [docs in, tokens in, docs out, tokens out] from the steps' datatrove stats."""
    from datatrove.data import Document

    class Words(tokens.Counter):
        def __call__(self, text: str) -> int:
            return len(text.split())

    count = Words(Path("unused"), False)
    chain = [steps.Normalize(count), steps.Boilerplate(kw.get("boilerplate", ["^مزید پڑھیں", "©"]), count),
             steps.MinLength(kw.get("min_chars", 20)), steps.ScriptRatio(0.8), steps.Repetition(0.3)]
    data = iter([Document(text=t, id=str(i), metadata={"language": language}) for i, t in enumerate(docs)])
    for step in chain:
        data = step.run(data)
    kept = [d.text for d in data]
    stats = {st.name: [int(st.stats[k].total) for k in ("docs_in", "tokens_in", "docs_out", "tokens_out")]
             for st in (step.stats for step in chain)}
    return kept, {k.split(": ")[-1]: v for k, v in stats.items()}


def test_each_filter_drops_what_it_should():
    urdu_text = "لاہور میں گزشتہ رات ہونے والی بارش کے بعد کئی علاقے زیرِ آب آ گئے اور ٹریفک متاثر ہوئی۔"
    cases = {
        "boilerplate": "مزید پڑھیں: example.pk\n© 2024",
        "length": "ٹھیک ہے",
        "script": "Click here to subscribe to our newsletter for the latest updates and offers.",
        "repetition": "سستے داموں موبائل خریدیں " * 10,
    }
    for name, text in cases.items():
        kept, stats = _pipeline([text])
        assert kept == [] and stats[name][0] == 1 and stats[name][2] == 0, (name, stats)
    kept, stats = _pipeline([urdu_text + "\nمزید پڑھیں: example.pk", " \u200b "])
    assert kept == [urdu_text]  # the boilerplate line is cut, the article kept; a blank one dropped
    words = len(urdu_text.split())  # the counter here counts words: 3 more with the boilerplate line, 1 blank
    assert stats["normalize"] == [2, words + 4, 1, words + 3] and stats["boilerplate"] == [1, words + 3, 1, words]


def test_minhash_estimates_the_jaccard_similarity():
    """Near duplicates: the planted edited copy of a demo article is >= 0.8 similar (MinHash of
    character 5-grams), the other articles (same style, distinct content) well below. The
    estimate is within 0.15 of the exact shingle Jaccard: with 128 permutations its standard
    deviation is at most 0.044, so 0.15 is over 3 of them."""
    rows = [json.loads(x)["text"] for x in (ROOT / "specs/demo/urdu.jsonl").read_text(encoding="utf-8").splitlines()]
    article = normalize(rows[1]).split("\n")[0]
    edited = article.replace("ایک سو بیس ملی میٹر", "ایک سو اٹھارہ ملی میٹر").replace("رات بھر", "ساری رات")
    others = [normalize(t) for t in rows[2:20]]
    a, b = steps.permutations(128)

    def sig(text: str):
        return steps.signature(steps.shingle_hashes(text), a, b)

    def exact(x: str, y: str) -> float:
        grams = [{" ".join(t.split())[i:i + 5] for i in range(len(" ".join(t.split())) - 4)} for t in (x, y)]
        return len(grams[0] & grams[1]) / len(grams[0] | grams[1])

    estimate = float((sig(article) == sig(edited)).mean())
    assert estimate > 0.8 > max(float((sig(article) == sig(t)).mean()) for t in others)
    for other in [edited, *others]:
        assert abs(float((sig(article) == sig(other)).mean()) - exact(article, other)) < 0.15
    # LSH bands for the spec's threshold and permutations: datasketch's choice for the same weights
    assert steps.lsh_bands(0.8, 128) == (14, 9)


# --- the stage --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory, tiny_model):
    from release import spec

    s = spec.load(demo_release(tmp_path_factory.mktemp("curate"), tiny_model))
    manifest = pipeline.run_one(s, "data", progress=False)
    ran = manifest.built
    assert ran
    return s, manifest


def _outputs(folder: Path) -> dict[str, str]:
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in ("cpt.jsonl", "sft.jsonl", "report.json")}


def test_demo_stage_outputs_and_report_arithmetic(demo_data):
    s, manifest = demo_data
    out = pipeline.folder(s, "data")
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    for name, corpus in [*report["corpora"].items(), ("instruct", report["instruct"])]:
        filters = corpus["filters"]
        for a, b in itertools.pairwise(filters):  # each filter takes what the previous one let out
            assert (a["docs_out"], a["tokens_out"]) == (b["docs_in"], b["tokens_in"]), (name, a, b)
        for st in filters:
            assert st["docs_out"] <= st["docs_in"], (name, st)
        assert corpus["docs_in"] == filters[0]["docs_in"] and corpus["docs_out"] == filters[-1]["docs_out"]
        assert corpus["kept_tokens"] == round(corpus["tokens_out"] / corpus["tokens_in"], 6)
    urdu_ = {st["filter"]: st for st in report["corpora"]["urdu"]["filters"]}
    # the demo's planted dirt: 2 exact copies, 1 edited copy, 2 short posts, 1 English ad, 1 spam, 1 blank
    assert urdu_["exact_dup"]["docs_in"] - urdu_["exact_dup"]["docs_out"] == 2
    assert urdu_["near_dup"]["docs_in"] - urdu_["near_dup"]["docs_out"] == 1
    assert urdu_["length"]["docs_in"] - urdu_["length"]["docs_out"] == 2
    assert urdu_["script"]["docs_in"] - urdu_["script"]["docs_out"] == 1
    assert urdu_["repetition"]["docs_in"] - urdu_["repetition"]["docs_out"] == 1
    assert urdu_["normalize"]["docs_in"] - urdu_["normalize"]["docs_out"] == 1
    # replay: English at (at most) the spec's share of the CPT tokens, and some of it
    replay = report["replay"]
    assert replay["target_share"] == pytest.approx(s.data.replay_share, abs=1e-6)
    assert 0 < replay["share"] <= s.data.replay_share
    # the figures of the implementation before datatrove (one process, in-memory LSH), which
    # wrote the same cpt.jsonl and sft.jsonl bytes for the demo: 26 documents, 3,659 of 4,807
    # raw tokens kept (76.1%), 254 English replay tokens
    assert (report["total"]["docs_out"], report["total"]["tokens_out"],
            report["total"]["tokens_in"]) == (26, 3659, 4807)
    assert (replay["english_tokens"], report["total"]["kept_tokens"]) == (254, 0.761182)
    assert report["bad_data"] == {"policy": "refuse", "count": 0, "first": []}
    # outputs agree with the report; every line is clean, NFC text
    lines = [json.loads(x) for x in (out / "cpt.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == report["total"]["docs_out"] == manifest.figures["cpt_documents"]
    assert all(unicodedata.is_normalized("NFC", x["text"]) and "\u200b" not in x["text"] and "\u064a" not in x["text"]
               for x in lines)
    sft = [json.loads(x) for x in (out / "sft.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(sft) == report["instruct"]["docs_out"] == 25  # 27 rows, one duplicate, one empty answer
    for row in sft:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == s.chat.system_prompt
    with_input = next(r for r in sft if "The weather is very pleasant today." in r["messages"][1]["content"])
    assert with_input["messages"][1]["content"] == ("درج ذیل جملے کا اردو میں ترجمہ کریں۔\n\n"
                                                    "The weather is very pleasant today.")
    # the working folder (datatrove's intermediate files) is removed after success
    assert not list((s.build_dir / ".checkpoints").glob("data-*"))


def test_tokens_are_llama3_tokens(demo_data, tiny_model):
    """Counts come from tiktoken on Meta's ranks (the tiny model has Meta's Llama 3 tokenizer):
    the same ids as the base's tokenizer.json through ``tokenizers``, on every demo text, raw and
    curated. A tokenizer.json with another pre-tokenizer pattern is counted with ``tokenizers``."""
    from tokenizers import Tokenizer

    s, manifest = demo_data
    path = tiny_model / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    fast = tokens.counter(path)
    assert fast.engine == "tiktoken"
    lines = [json.loads(x)["text"]
             for x in (pipeline.folder(s, "data") / "cpt.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sum(len(tok.encode(t, add_special_tokens=False).ids) for t in lines) == manifest.figures["cpt_tokens"]
    raw = [json.loads(x).get("text", "") for f in ("urdu", "english", "instruct")
           for x in (ROOT / f"specs/demo/{f}.jsonl").read_text(encoding="utf-8").splitlines()]
    for t in raw + lines + ["  a\r\n\n\tb ﷺ ﻻ 123456 's 'LL", "\u200b\ufeff"]:
        assert fast.encode_batch([t])[0] == tok.encode(t, add_special_tokens=False).ids, t[:40]
    other = json.loads(path.read_text(encoding="utf-8"))
    other["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    (Path(s.build_dir) / "other.json").write_text(json.dumps(other), encoding="utf-8")
    assert tokens.counter(Path(s.build_dir) / "other.json").engine == "tokenizers"


def test_stage_is_skipped_when_unchanged(demo_data):
    s, manifest = demo_data
    again = pipeline.run_one(s, "data", progress=False)
    ran = again.built
    assert not ran and again.fingerprint == manifest.fingerprint


def _sharded_urdu(folder: Path) -> None:
    """The demo's Urdu corpus as three shards in a folder: gzip, zstd and plain JSONL."""
    import zstandard

    lines = (ROOT / "specs/demo/urdu.jsonl").read_bytes().splitlines(keepends=True)
    shards = folder / "specs" / "demo" / "urdu-shards"
    shards.mkdir(parents=True)
    (shards / "part-0.jsonl.gz").write_bytes(gzip.compress(b"".join(lines[:10])))
    (shards / "part-1.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"".join(lines[10:20])))
    (shards / "part-2.jsonl").write_bytes(b"".join(lines[20:]))


def test_two_workers_on_compressed_shards_give_the_same_bytes(demo_data, tmp_path, tiny_model):
    """datatrove's local executor with 2 worker processes, the Urdu corpus as a folder of
    gzip/zstd/plain shards (one task each): the same cpt.jsonl and sft.jsonl bytes and the same
    retention figures as one process on the single file. Copies are told apart across shards
    (the first in corpus order is kept)."""
    from release import spec

    s0, _ = demo_data
    text = (ROOT / "specs/demo.toml").read_text(encoding="utf-8").replace('"demo/urdu.jsonl"', '"demo/urdu-shards"')
    s = spec.load(demo_release(tmp_path, tiny_model, text))
    _sharded_urdu(tmp_path)
    m = data.run_with(s, pipeline.upstream(s, "data"), progress=False, workers=2)
    assert m.figures["workers"] == 2 and m.figures["input_files"] == 4
    a, b = _outputs(pipeline.folder(s0, "data")), _outputs(pipeline.folder(s, "data"))
    assert a["cpt.jsonl"] == b["cpt.jsonl"] and a["sft.jsonl"] == b["sft.jsonl"]
    ra, rb = (json.loads((pipeline.folder(x, "data") / "report.json").read_text(encoding="utf-8")) for x in (s0, s))
    for r in (ra, rb):
        r["corpora"]["urdu"].pop("path")
    assert ra == rb


def test_ranges_of_a_large_file_read_the_same_records_under_the_same_names(tmp_path):
    """A large uncompressed file is read as ranges of whole lines (JSONL: any line; text: after a
    blank line): read range by range, the records, their ``file:line`` names and the bad input
    are the whole file's, in order; compressed files and Parquet stay whole."""
    rng = __import__("random").Random(7)
    words = (ROOT / "specs/demo/urdu.jsonl").read_text(encoding="utf-8").split()
    lines = [json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(1, 60)))}, ensure_ascii=False).encode()
             for _ in range(400)]
    lines[17], lines[230], lines[231] = b'{"text": ', b"", b'{"text": "\xff"}'
    (tmp_path / "big.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    paras = [" ".join(rng.choices(words, k=rng.randint(1, 30))) for _ in range(300)]
    text = "\n\n".join(p.replace(" ", "\n", rng.randint(0, 2)) for p in paras).encode()
    text = text.replace("\n\n".encode(), "\n \n\n".encode(), 5).replace(words[3].encode(), b"\xff", 1)
    (tmp_path / "big.txt").write_bytes(text)
    for name, fmt in (("big.jsonl", "jsonl"), ("big.txt", "text")):
        path = tmp_path / name
        parts = data.ranges(path, fmt, 1000)
        assert len(parts) > 10 and parts[0][:1] == (0,) and parts[-1][1] is None
        raw = path.read_bytes()
        for (start, end, first), (nxt, _, _) in zip(parts, [*parts[1:], (len(raw), None, 0)], strict=True):
            assert end in (nxt, None) and raw[start - 1:start] in (b"", b"\n")  # whole lines, end to end
            assert first == raw[:start].count(b"\n") + 1
            if fmt == "text" and start:
                assert not raw[:start - 1].rsplit(b"\n", 1)[-1].strip()  # just after a blank line
        whole_problems, part_problems = steps.Problems("skip"), steps.Problems("skip")
        whole = list(steps.reader(steps.Source("c", "ur", fmt, str(path), ("text",)), whole_problems)
                     .records(path.name))
        pieces = [r for a, b, n in parts
                  for r in steps.reader(steps.Source("c", "ur", fmt, str(path), ("text",), a, b, n), part_problems)
                  .records(path.name)]
        assert pieces == whole and len(whole) > 250
        assert part_problems.lines == whole_problems.lines and whole_problems.lines
    assert data.ranges(tmp_path / "big.jsonl", "jsonl", 10**9) == [(0, None, 1)]
    (tmp_path / "big.jsonl.gz").write_bytes(gzip.compress((tmp_path / "big.jsonl").read_bytes()))
    assert data.ranges(tmp_path / "big.jsonl.gz", "jsonl", 1000) == [(0, None, 1)]


def test_a_file_read_as_ranges_curates_to_the_same_bytes(demo_data, tmp_path, tiny_model, monkeypatch):
    """The demo corpora read as ranges of ~2 KB by 2 worker processes (a task each, in every job
    that has one per input): the same cpt.jsonl, sft.jsonl and report.json bytes as one process
    reading each file whole. The exact and near duplicates are still told apart across ranges:
    the first copy in the file is the one kept."""
    from release import spec

    s0, m0 = demo_data
    monkeypatch.setattr(data, "RANGE_BYTES", 2048)
    s = spec.load(demo_release(tmp_path, tiny_model))
    m = data.run_with(s, pipeline.upstream(s, "data"), progress=False, workers=2)
    assert m.figures["input_files"] == 2 and m.figures["tasks"] >= 8 and m.figures["workers"] == 2
    assert _outputs(pipeline.folder(s, "data")) == _outputs(pipeline.folder(s0, "data"))
    report = json.loads((pipeline.folder(s, "data") / "report.json").read_text(encoding="utf-8"))
    dropped = {f["filter"]: f["docs_in"] - f["docs_out"] for f in report["corpora"]["urdu"]["filters"]}
    assert dropped["exact_dup"] and dropped["near_dup"]  # the comparison covers both kinds of copy


def test_interrupted_curation_resumes_to_the_same_bytes(demo_data, tmp_path, tiny_model):
    """A run stopped after its first jobs, with one more task cut short mid-write (its output
    truncated, no completion mark), then run again: the finished tasks are not redone (their
    stats keep their time stamps), the cut one is, and the outputs have the same bytes."""
    from release import spec

    s0, _ = demo_data
    s = spec.load(demo_release(tmp_path, tiny_model))
    found = data.corpora(s, pipeline.upstream(s, "data"))
    work = data.work_folder(s, found)
    count = tokens.counter(found["tokenizer"])
    out = tmp_path / "out"
    out.mkdir()
    w = data.Work(work)
    jobs = data.plan(s, out, w, count)
    with data._quiet(work / "console.log"):
        data.executors(jobs[:3], w, "local", 1)[-1].run()  # clean, exact, minhash (depends run first)
    cut = work / "minhash" / "full" / "00000.sig"
    cut.write_bytes(cut.read_bytes()[:100])
    (work / "logs" / "minhash" / "completions" / "00000").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (work / "logs" / "clean" / "stats").iterdir()}
    data.curate(s, out, work=work, count=count, workers=1, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (work / "minhash" / "full" / "00000.sig").stat().st_size > 100
    assert _outputs(out) == _outputs(pipeline.folder(s0, "data"))


def test_cpt_lines_are_json_dumps_bytes():
    """cpt.jsonl lines are written with orjson for speed; they must be the bytes the standard
    library writes (``ensure_ascii=False``), which the line format was defined by: checked on
    every code point but the surrogates (which normalisation removes), and on escapes."""
    every = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    for text in (every, "", 'a "quoted" \\ back\tslash\n\x00\x7f\u2028'):
        assert data.cpt_line(text) == (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")


def test_cluster_executors_take_the_same_plan(demo_spec, tmp_path):
    """The same jobs handed to datatrove's Slurm and Ray executors: one executor per job, the
    same pipeline objects and task counts, each depending on the one before (running the last
    submits them all, in order). Slurm and Ray themselves are not run here (no sbatch, no
    cluster); datatrove's local executor runs the identical pipelines in the other tests."""
    from datatrove.executor import RayPipelineExecutor, SlurmPipelineExecutor

    work = data.Work(tmp_path / "work")
    jobs = data.plan(demo_spec, tmp_path / "out", work, tokens.Counter(tmp_path / "tokenizer.json", True))
    assert [j.name for j in jobs] == ["clean", "exact", "minhash", "buckets", "verify", "cluster", "keep", "assemble"]
    assert [j.tasks for j in jobs] == [2, 1, 2, 14, 1, 1, 2, 1]  # 2 input files; 14 LSH bands
    for kind, cls, options in (("slurm", SlurmPipelineExecutor, {"partition": "cpu", "time": "4:00:00"}),
                               ("ray", RayPipelineExecutor, {})):
        chain = data.executors(jobs, work, kind, **options)
        assert all(isinstance(e, cls) for e in chain)
        assert [e.world_size for e in chain] == [j.tasks for j in jobs]
        assert all(e.pipeline is j.pipeline for e, j in zip(chain, jobs, strict=True))
        assert chain[0].depends is None and all(b.depends is a for a, b in itertools.pairwise(chain))
    with pytest.raises(CurationError, match="executor 'spark': expected local, slurm or ray"):
        data.executors(jobs, work, "spark")


def test_missing_corpus_stops_the_stage_before_building(tmp_path, tiny_model):
    from release import spec

    text = (ROOT / "specs/demo.toml").read_text(encoding="utf-8").replace('"demo/english.jsonl"', '"demo/gone.jsonl"')
    s = spec.load(demo_release(tmp_path, tiny_model, text))
    with pytest.raises(CurationError, match=r"gone\.jsonl: no such corpus file or folder; fix data corpus 'english'"):
        pipeline.run_one(s, "data", progress=False)
    assert not pipeline.folder(s, "data").exists()


# --- input formats ----------------------------------------------------------------------------


def test_jsonl_parquet_and_text_plain_or_compressed(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    pq.write_table(pa.table({"body": ["یہ پہلی دستاویز ہے", "دوسری"]}), tmp_path / "a.parquet")
    got = list(data.read_records(tmp_path / "a.parquet", "parquet", ("body",)))
    assert [r["body"] for _, r in got] == ["یہ پہلی دستاویز ہے", "دوسری"] and got[1][0].endswith("a.parquet:row 2")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("پہلی سطر\nدوسری سطر\n\n\nاگلی دستاویز\n", encoding="utf-8")
    (tmp_path / "t" / "b.txt.gz").write_bytes(gzip.compress("تیسری\n\nچوتھی".encode()))
    got = list(data.read_records(tmp_path / "t", "text", ("text",)))
    assert [r["text"] for _, r in got] == ["پہلی سطر\nدوسری سطر", "اگلی دستاویز", "تیسری", "چوتھی"]
    assert got[1][0].endswith("a.txt:5") and got[3][0].endswith("b.txt.gz:3")  # where each document starts
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "x"}\n\n'
                                                                                      b'{"text": "y"}\n'))
    (tmp_path / "j" / "ignored.json").write_text("{}")
    got = list(data.read_records(tmp_path / "j", "jsonl", ("text",)))
    assert [(w.rsplit(":", 1)[1], r["text"]) for w, r in got] == [("1", "x"), ("3", "y")]
    with pytest.raises(CurationError, match=r"no \*\.parquet files in this corpus folder"):
        list(data.read_records(tmp_path / "j", "parquet", ("text",)))


# --- bad input --------------------------------------------------------------------------------


def _bad_shards(folder: Path) -> list[str]:
    """A corpus folder with each kind of bad input; returns the problems expected, in order."""
    folder.mkdir(parents=True)
    good = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in ("پہلا", "دوسرا", "تیسرا")]
    (folder / "a.jsonl").write_bytes(b"\n".join([good[0], b'{"text": ', b'{"body": "x"}', b'{"text": 5}',
                                                 b'{"text": "\xff\xfe"}', b"[1]", good[1]]) + b"\n")
    whole = gzip.compress(b"\n".join(good * 400) + b"\n")
    (folder / "b.jsonl.gz").write_bytes(whole[: len(whole) // 2])  # truncated shard
    (folder / "c.jsonl.gz").write_bytes(b"not gzip at all")
    a, b, c = (str(folder / n) for n in ("a.jsonl", "b.jsonl.gz", "c.jsonl.gz"))
    return [f"{a}:2: not valid JSON", f"{a}:3: no 'text' field (fields: body)",
            f"{a}:4: field 'text' is int, expected a string", f"{a}:5: not UTF-8 (invalid start byte at byte 10)",
            f"{a}:6: expected a JSON object, got list", f"{b}:", f"{c}:1: unreadable from this line on (BadGzipFile"]


def test_bad_input_refused_names_file_and_line(tmp_path):
    expected = _bad_shards(tmp_path / "bad")
    with pytest.raises(CurationError) as e:
        list(data.read_records(tmp_path / "bad", "jsonl", ("text",)))
    assert str(e.value).startswith(expected[0]) and "\n" not in str(e.value)
    assert str(e.value).endswith('fix the input, or set data.on_bad_data = "skip" to skip and count it')
    problems = steps.Problems("skip")
    kept = list(data.read_records(tmp_path / "bad", "jsonl", ("text",), problems))
    assert len(problems.lines) == len(expected)
    for line, want in zip(problems.lines, expected, strict=True):
        assert line.startswith(want), (line, want)
    truncated = problems.lines[5]
    assert "unreadable from this line on (EOFError" in truncated and "the shard is corrupt or truncated" in truncated
    assert int(truncated.split(":")[1]) == len(kept) - 2 + 1  # the line after the last one read
    with pytest.raises(CurationError, match=r"no such corpus file or folder"):
        list(data.read_records(tmp_path / "missing.jsonl", "jsonl", ("text",)))
    (tmp_path / "p.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(CurationError, match=rf"^{tmp_path / 'p.parquet'}:1: unreadable from this line on"):
        list(data.read_records(tmp_path / "p.parquet", "parquet", ("text",)))
    (tmp_path / "t.txt").write_bytes("پہلا\n\nدو".encode() + b"\xff\n" + "سرا\n\nتین".encode())
    problems = steps.Problems("skip")
    got = [r["text"] for _, r in data.read_records(tmp_path / "t.txt", "text", ("text",), problems)]
    assert got == ["پہلا", "تین"] and problems.lines[0].startswith(f"{tmp_path / 't.txt'}:3: not UTF-8")


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_input_skipped_and_counted_or_refused_by_the_stage(tmp_path, tiny_model, workers):
    """``data.on_bad_data = "skip"``: the stage runs, every bad record and shard is counted and
    named in the report and in bad_data.txt, the good records are curated. ``"refuse"`` (the
    default): the stage stops with one line naming the first, from a worker process too, and
    nothing is built."""
    from release import spec

    text = (ROOT / "specs/demo.toml").read_text(encoding="utf-8").replace('"demo/urdu.jsonl"', '"demo/bad"')
    skip = text.replace('on_bad_data = "refuse"', 'on_bad_data = "skip"')
    assert skip != text
    s = spec.load(demo_release(tmp_path / "skip", tiny_model, skip))
    expected = _bad_shards(tmp_path / "skip" / "specs" / "demo" / "bad")
    m = data.run_with(s, pipeline.upstream(s, "data"), progress=False, workers=workers)
    report = json.loads((pipeline.folder(s, "data") / "report.json").read_text(encoding="utf-8"))
    assert m.figures["bad_data"] == report["bad_data"]["count"] == len(expected)
    listed = (pipeline.folder(s, "data") / "bad_data.txt").read_text(encoding="utf-8").splitlines()
    assert listed == report["bad_data"]["first"] and all(a.startswith(b) for a, b in zip(listed, expected, strict=True))
    urdu_in = report["corpora"]["urdu"]["docs_in"]
    assert urdu_in == 2 + int(listed[5].split(":")[1]) - 1  # a.jsonl's 2 good records + b's lines read
    s2 = spec.load(demo_release(tmp_path / "refuse", tiny_model, text))
    _bad_shards(tmp_path / "refuse" / "specs" / "demo" / "bad")
    with pytest.raises(CurationError) as e:
        data.run_with(s2, pipeline.upstream(s2, "data"), progress=False, workers=workers)
    # in one process the first bad record refuses; with two, whichever task meets its first
    first = [x.replace(str(tmp_path / "skip"), str(tmp_path / "refuse")) for x in expected]
    assert any(str(e.value).startswith(x) for x in (first if workers > 1 else first[:1])), str(e.value)
    assert not pipeline.folder(s2, "data").exists()


def test_spec_names_the_bad_data_policy(tmp_path):
    from release import spec

    text = (ROOT / "specs/demo.toml").read_text(encoding="utf-8").replace('on_bad_data = "refuse"',
                                                                          'on_bad_data = "ignore"')
    assert 'on_bad_data = "ignore"' in text
    shutil.copytree(ROOT / "specs", tmp_path, dirs_exist_ok=True)
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SpecError, match=r"data\.on_bad_data: expected one of 'refuse', 'skip', got 'ignore'"):
        spec.load(path)


# --- streaming --------------------------------------------------------------------------------

STREAM = r"""
import random, re, sys
from datatrove.data import Document
from training import steps
from training.tokens import Counter

def hwm_mb():
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

class Words(Counter):
    def __call__(self, text):
        return len(text.split())

letters = "ابپتٹثجچحخدڈذرڑزژسشصضطظعغفقکگلمنوہھءیے"
size = 0
def docs(n, seed):
    global size
    rng = random.Random(seed)
    for i in range(n):
        text = " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(3000))
        size += len(text.encode())
        yield Document(text=text, id=str(i), metadata={"language": "ur"})

a, b = steps.permutations(128)
def run(n, seed):
    count = Words("unused", False)
    data = docs(n, seed)
    for step in (steps.Normalize(count), steps.Boilerplate([], count), steps.MinLength(100), steps.ScriptRatio(0.8),
                 steps.Repetition(0.3)):
        data = step.run(data)
    return sum(1 for d in data if steps.signature(steps.shingle_hashes(d.text), a, b) is not None)

kept = run(60, 1)
first, size = hwm_mb(), 0
kept = run(int(sys.argv[1]), 2)
print(kept, size / 2**20, hwm_mb() - first)
"""


def test_streaming_keeps_memory_flat():
    """The cleaning steps and the MinHash signature hold nothing per document: after 60
    documents, 250 more (~7 MB of text) raise the peak resident size (VmHWM, fresh process) by
    less than 2 MB (allocator slack) and well under the text streamed. The duplicate indexes
    live on disk (datatrove's stages); the benchmark measures the whole stage's memory at 0.25
    and 1 GB of corpus."""
    out = subprocess.run([sys.executable, "-c", STREAM, "250"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    kept, corpus_mb, growth_mb = map(float, out.stdout.split())
    assert kept == 250 and corpus_mb > 6
    assert growth_mb < min(2.0, corpus_mb / 3), (growth_mb, corpus_mb)
