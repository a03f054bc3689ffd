"""Curation: normalisation, filters, deduplication, the retention report, streaming, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata

import pytest
from conftest import ROOT, demo_release

from release.spec import Filters
from training import curate
from training.curate import CurationError, Cleaner, Tally, normalize, repetition, script_ratio


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


def _cleaner(**kw) -> Cleaner:
    defaults = dict(min_chars=20, boilerplate=["^مزید پڑھیں", "©"])
    return Cleaner(Filters(**{**defaults, **kw}), lambda t: len(t.split()))


def test_each_filter_drops_what_it_should():
    c = _cleaner()
    urdu = "لاہور میں گزشتہ رات ہونے والی بارش کے بعد کئی علاقے زیرِ آب آ گئے اور ٹریفک متاثر ہوئی۔"
    cases = {
        "boilerplate": "مزید پڑھیں: example.pk\n© 2024",
        "length": "ٹھیک ہے",
        "script": "Click here to subscribe to our newsletter for the latest updates and offers.",
        "repetition": "سستے داموں موبائل خریدیں " * 10,
    }
    for name, text in cases.items():
        tally = Tally()
        assert c.document(text, "ur", tally) is None, name
        assert tally.steps[name].docs_in == 1 and tally.steps[name].docs_out == 0, name
    tally = Tally()
    kept = c.document(urdu + "\nمزید پڑھیں: example.pk", "ur", tally)
    assert kept == urdu  # the boilerplate line is cut, the article kept
    assert c.document(urdu, "ur", tally) is None and tally.steps["exact_dup"].docs_out == 1


def test_near_duplicates_dropped_distinct_texts_kept():
    rows = [json.loads(x)["text"] for x in (ROOT / "specs/demo/urdu.jsonl").read_text(encoding="utf-8").splitlines()]
    article = normalize(rows[1]).split("\n")[0]
    edited = article.replace("ایک سو بیس ملی میٹر", "ایک سو اٹھارہ ملی میٹر").replace("رات بھر", "ساری رات")
    c = _cleaner()
    tally = Tally()
    assert c.document(article, "ur", tally) == article
    assert c.document(edited, "ur", tally) is None
    assert tally.steps["near_dup"].docs_out == 1 and tally.steps["near_dup"].docs_in == 2
    # the other demo articles (same style, distinct content) are all kept
    others = [normalize(t) for t in rows[2:20]]
    assert all(c.document(t, "ur", Tally()) is not None for t in others)
    # threshold: the edit keeps ~88% of the character 5-grams
    sig = c.near.signature
    assert sig(article).jaccard(sig(edited)) > 0.8 > max(sig(article).jaccard(sig(t)) for t in others)


# --- the stage --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory, tiny_model):
    from release import spec

    s = spec.load(demo_release(tmp_path_factory.mktemp("curate"), tiny_model))
    manifest = curate.run(s, progress=False)
    ran = manifest.built
    assert ran
    return s, manifest


def test_demo_stage_outputs_and_report_arithmetic(demo_data):
    s, manifest = demo_data
    out = curate.folder(s)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    for name, corpus in [*report["corpora"].items(), ("instruct", report["instruct"])]:
        steps = corpus["filters"]
        for a, b in zip(steps, steps[1:]):  # each filter takes what the previous one let out
            assert (a["docs_out"], a["tokens_out"]) == (b["docs_in"], b["tokens_in"]), (name, a, b)
        for st in steps:
            assert st["docs_out"] <= st["docs_in"], (name, st)
        assert corpus["docs_in"] == steps[0]["docs_in"] and corpus["docs_out"] == steps[-1]["docs_out"]
        assert corpus["kept_tokens"] == round(corpus["tokens_out"] / corpus["tokens_in"], 6)
    urdu = {st["filter"]: st for st in report["corpora"]["urdu"]["filters"]}
    # the demo's planted dirt: 2 exact copies, 1 edited copy, 2 short posts, 1 English ad, 1 spam, 1 blank
    assert urdu["exact_dup"]["docs_in"] - urdu["exact_dup"]["docs_out"] == 2
    assert urdu["near_dup"]["docs_in"] - urdu["near_dup"]["docs_out"] == 1
    assert urdu["length"]["docs_in"] - urdu["length"]["docs_out"] == 2
    assert urdu["script"]["docs_in"] - urdu["script"]["docs_out"] == 1
    assert urdu["repetition"]["docs_in"] - urdu["repetition"]["docs_out"] == 1
    assert urdu["normalize"]["docs_in"] - urdu["normalize"]["docs_out"] == 1
    # replay: English at (at most) the spec's share of the CPT tokens, and some of it
    replay = report["replay"]
    assert replay["target_share"] == pytest.approx(s.data.replay_share, abs=1e-6)
    assert 0 < replay["share"] <= s.data.replay_share
    # outputs agree with the report; every line is clean, NFC text
    lines = [json.loads(x) for x in (out / "cpt.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == report["total"]["docs_out"] == manifest.figures["cpt_documents"]
    assert all(unicodedata.is_normalized("NFC", x["text"]) and "\u200b" not in x["text"] and "\u064a" not in x["text"]
               for x in lines)
    sft = [json.loads(x) for x in (out / "sft.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(sft) == report["instruct"]["docs_out"] == 20  # 22 rows, one duplicate, one empty answer
    for row in sft:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == s.chat.system_prompt
    with_input = next(r for r in sft if "The weather is very pleasant today." in r["messages"][1]["content"])
    assert with_input["messages"][1]["content"] == "درج ذیل جملے کا اردو میں ترجمہ کریں۔\n\nThe weather is very pleasant today."


def test_tokens_are_llama3_tokens(demo_data, tiny_model):
    from tokenizers import Tokenizer

    s, manifest = demo_data
    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    lines = [json.loads(x)["text"] for x in (curate.folder(s) / "cpt.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sum(len(tok.encode(t, add_special_tokens=False).ids) for t in lines) == manifest.figures["cpt_tokens"]


def test_stage_is_skipped_when_unchanged(demo_data):
    s, manifest = demo_data
    again = curate.run(s, progress=False)
    ran = again.built
    assert not ran and again.fingerprint == manifest.fingerprint


# --- bad input --------------------------------------------------------------------------------


def test_bad_input_is_one_line_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ٹھیک"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(CurationError, match=rf"^{bad}:2: not valid JSON .*fix or remove this line$"):
        list(curate.read_records(bad, "jsonl", ("text",)))
    bad.write_text('{"text": "ٹھیک"}\n\n{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(CurationError, match=rf"^{bad}:3: no 'text' field \(fields: body\); set the corpus's text_field"):
        list(curate.read_records(bad, "jsonl", ("text",)))
    bad.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(CurationError, match=rf"^{bad}:1: field 'text' is int, expected a string$"):
        list(curate.read_records(bad, "jsonl", ("text",)))
    with pytest.raises(CurationError, match="no such corpus file or folder"):
        list(curate.read_records(tmp_path / "missing.jsonl", "jsonl", ("text",)))
    for e in (CurationError("x"),):
        assert "\n" not in str(e)


def test_missing_corpus_stops_the_stage_before_building(tmp_path, tiny_model):
    from release import spec

    text = (ROOT / "specs/demo.toml").read_text(encoding="utf-8").replace('"demo/english.jsonl"', '"demo/gone.jsonl"')
    s = spec.load(demo_release(tmp_path, tiny_model, text))
    with pytest.raises(CurationError, match=r"gone\.jsonl: no such corpus file or folder; fix data corpus 'english'"):
        curate.run(s, progress=False)
    assert not curate.folder(s).exists()


def test_parquet_and_text_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["یہ پہلی دستاویز ہے", "دوسری"]}), tmp_path / "a.parquet")
    assert [r["body"] for _, r in curate.read_records(tmp_path / "a.parquet", "parquet", ("body",))] == \
        ["یہ پہلی دستاویز ہے", "دوسری"]
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("پہلی سطر\nدوسری سطر\n\n\nاگلی دستاویز\n", encoding="utf-8")
    got = list(curate.read_records(tmp_path / "t", "text", ("text",)))
    assert [r["text"] for _, r in got] == ["پہلی سطر\nدوسری سطر", "اگلی دستاویز"]
    assert got[1][0].endswith("a.txt:5")  # where the document starts


# --- streaming --------------------------------------------------------------------------------

STREAM = r"""
import random, re, sys
from release.spec import Filters
from training.curate import Cleaner, Tally, curate_texts

def hwm_mb():
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

letters = "ابپتٹثجچحخدڈذرڑزژسشصضطظعغفقکگلمنوہھءیے"
def docs(n, seed):
    rng = random.Random(seed)
    for _ in range(n):
        yield " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(3000))

cleaner = Cleaner(Filters(min_chars=100), lambda t: len(t.split()))
tally = Tally()
size = 0
def counted(n, seed):
    global size
    for d in docs(n, seed):
        size += len(d.encode())
        yield d
kept = sum(1 for _ in curate_texts(counted(60, 1), "ur", cleaner, tally))
first, size = hwm_mb(), 0
kept += sum(1 for _ in curate_texts(counted(int(sys.argv[1]), 2), "ur", cleaner, tally))
print(kept - 60, size / 2**20, hwm_mb() - first)
"""


def test_streaming_keeps_memory_flat():
    """Streaming a generator-fed corpus: after 60 documents, 250 more (~7 MB of text) raise the
    peak resident size (VmHWM, fresh process) by no more than the duplicate index grows (per kept
    document a 128-value signature, 14 LSH bucket keys and a sha256: under 10 KB) plus 1 MB of
    allocator slack, and by well under the text streamed."""
    out = subprocess.run([sys.executable, "-c", STREAM, "250"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    kept, corpus_mb, growth_mb = map(float, out.stdout.split())
    assert kept == 250 and corpus_mb > 6
    assert growth_mb < min(kept * 10 / 1024 + 1, corpus_mb / 3), (growth_mb, corpus_mb)
