"""The release spec: both bundled specs load; bad specs give one line per problem naming the
file, the key and what was expected; the system prompt is the reference text byte for byte."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import pytest

from conftest import ROOT, SPECS, write_spec
from release import spec as specmod
from release import special_tokens
from release.schema import convert, describe, dotted
from release.spec import SpecError

REFERENCE = ROOT.parent / "shared" / "REFERENCE.md"

# The reference text, written with escapes so that no editor or encoding round trip can alter
# it: U+06C1 (heh goal) three times, U+06D4 (Urdu full stop) twice.
SYSTEM_PROMPT_ESCAPED = (
    "\u0622\u067e \u0627\u06cc\u06a9 \u0645\u062f\u062f\u06af\u0627\u0631 \u0627\u0648\u0631 "
    "\u0628\u06d2 \u0636\u0631\u0631 \u0645\u0635\u0646\u0648\u0639\u06cc \u0630\u06c1\u0627\u0646\u062a "
    "\u06a9\u06d2 \u0627\u0633\u0633\u0679\u0646\u0679 \u06c1\u06cc\u06ba\u06d4 \u0622\u067e "
    "\u0627\u0631\u062f\u0648 \u0645\u06cc\u06ba \u0633\u0648\u0627\u0644\u0627\u062a \u06a9\u06d2 "
    "\u062f\u0631\u0633\u062a \u062c\u0648\u0627\u0628\u0627\u062a \u062f\u06cc\u062a\u06d2 "
    "\u06c1\u06cc\u06ba\u06d4"
)


def test_bundled_specs_load(qalb_spec, demo_spec):
    assert qalb_spec.release.name == "Qalb-1.0-8B-Instruct"
    assert qalb_spec.base.model == "unsloth/Meta-Llama-3.1-8B"
    assert (qalb_spec.lora.r, qalb_spec.lora.alpha) == (128, 32)
    assert qalb_spec.training.sequence_length == 2048
    assert qalb_spec.flagship.repo == "enstazao/Qalb-1.0-8B-Instruct"
    assert demo_spec.base.scaffold is not None and demo_spec.hub.endpoint == "local"


def test_qalb_spec_holds_the_reference_facts(qalb_spec):
    s = qalb_spec
    assert s.release.languages == ["ur", "en"]
    assert s.release.license == "llama3.1"
    assert s.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cpt, sft = s.training.cpt, s.training.sft
    assert (cpt.optimizer, cpt.lr_scheduler, cpt.warmup_ratio,
            cpt.effective_batch_size) == ("adamw_8bit", "cosine", 0.05, 128)
    assert cpt.modules_to_save == ["embed_tokens", "lm_head"]
    assert (sft.optimizer, sft.lr_scheduler, sft.learning_rate, sft.effective_batch_size,
            sft.epochs) == ("adamw_8bit", "linear", 5e-5, 64, 2)
    assert (s.training.precision, s.training.gradient_checkpointing) == ("bf16", True)
    assert s.data.urdu_tokens + s.data.english_tokens == 1_980_000_000  # ~1.97B on the card
    assert s.data.retained_fraction == 0.678
    inf = s.inference
    assert (inf.max_new_tokens, inf.temperature, inf.top_p, inf.repetition_penalty,
            inf.do_sample) == (256, 0.1, 0.9, 1.1, True)
    assert set(s.chat.stop_tokens) == {"<|eot_id|>", "<|end_of_text|>"}
    assert s.evaluation.urdu_purity == 0.9531 and s.evaluation.overall_score == 90.34
    assert {v.format for v in s.variants.values()} == {"safetensors", "bnb-4bit", "gguf"}
    assert s.ollama.model == "qalb" and s.ollama.tags["F16"] == "8b-instruct-fp16"
    assert s.gguf_file_name("Q4_K_M") == "Qalb-1.0-8B-Instruct-Q4_K_M.gguf"


def test_system_prompt_is_the_reference_text_byte_for_byte(qalb_spec, demo_spec):
    prompt = qalb_spec.chat.system_prompt
    assert prompt.encode("utf-8") == SYSTEM_PROMPT_ESCAPED.encode("utf-8")
    assert unicodedata.is_normalized("NFC", prompt)
    assert len(prompt) == 96 and prompt.count("\u06c1") == 3 and prompt.count("\u06d4") == 2
    assert demo_spec.chat.system_prompt == prompt
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not present (it sits beside the checkout)")
    lines = [line for line in REFERENCE.read_text(encoding="utf-8").splitlines() if line.startswith("\u0622\u067e ")]
    assert lines == [prompt]


def test_windows_1252_damaged_prompt_is_not_the_reference():
    # The known corruption: U+06C1 replaced (here by U+0647, Arabic heh) after a code-page trip.
    damaged = SYSTEM_PROMPT_ESCAPED.replace("\u06c1", "\u0647")
    assert damaged != SYSTEM_PROMPT_ESCAPED and damaged.count("\u06c1") == 0


# (replace this text in demo.toml, with this, expect a problem line containing this)
BAD = [
    ("r = 64\n", 'r = "eight"\n', 'lora.r: expected an integer, got \'eight\''),
    ("r = 64\n", "r = 0\n", "lora.r: expected a positive integer, got 0"),
    ("alpha = 128\n", "alpha = 128\nbogus = 1\n", "lora.bogus: unknown key"),
    ("[release]\n", "[release]\ncodename = 'x'\n", "release.codename: unknown key"),
    ('version = "1.0"\n', "", "release.version: missing (expected a string)"),
    ("do_sample = true", 'do_sample = "yes"', "inference.do_sample: expected true or false, got 'yes'"),
    ("top_p = 0.9", "top_p = 1.5", "inference.top_p: expected a number in (0, 1], got 1.5"),
    ('lr_scheduler = "cosine"', 'lr_scheduler = "exponential"',
     "training.cpt.lr_scheduler: expected one of 'cosine', 'linear', 'constant'"),
    ('"Q4_K_M", "IQ4_XS"', '"Q4_K_XL", "IQ4_XS"', "variants.gguf.quant_types[3]: expected a llama.cpp type"),
    ('stop_tokens = ["<|eot_id|>", "<|end_of_text|>"]', 'stop_tokens = ["<|end_of_text|>"]',
     "chat.stop_tokens: expected the end-of-turn token '<|eot_id|>'"),
    ("hidden_size = 256", "hidden_size = 320", "base.scaffold.hidden_size: expected a positive multiple of 256"),
    ("num_key_value_heads = 2", "num_key_value_heads = 3",
     "base.scaffold.num_key_value_heads: expected a divisor of num_attention_heads 4"),
    ('Q4_K_M = "tiny-instruct-q4_K_M"\n', "", "ollama.tags: missing a tag for GGUF type 'Q4_K_M'"),
    ('repo = "qalb-demo/Qalb-Demo-1.0-Tiny-Instruct-FP16"', 'repo = "qalb-demo/Qalb-Demo-1.0-Tiny-Instruct"',
     "variants: each variant needs its own repo"),
    ('dtype = "bfloat16"\nrepo', 'dtype = "float16"\nrepo',
     "variants: expected exactly one safetensors variant with dtype 'bfloat16'"),
    ('max_shard_size = "100MB"', 'max_shard_size = "lots"', "build.max_shard_size: expected a size like '5GB'"),
    ('endpoint = "local"', 'endpoint = "ftp://hub"', "hub.endpoint: expected an http(s) URL or 'local'"),
    ('format = "jsonl"', 'format = "csv"', "data.corpora[0].format: expected one of 'jsonl', 'parquet', 'text'"),
    ("[data.instruct]", "[data.instruct_set]", "data.instruct_set: unknown key"),
    ('license_file = "licenses/llama3.1.txt"', 'license_file = "LICENSE.txt"',
     "release.license_file: expected a text file relative to the spec"),
    # one more per section checker, so each still reports what it did
    ('languages = ["ur", "en"]', 'languages = ["urdu", "en"]',
     "release.languages[0]: expected an ISO 639 code like 'ur', got 'urdu'"),
    ("init_std = ", "init_std = -1 #", "base.scaffold.init_std: expected a positive number"),
    ('target_modules = [', 'target_modules = ["mlp", ', "lora.target_modules[0]: expected one of q_proj"),
    ("save_steps = ", "save_steps = 0 #", "training.save_steps: expected a positive integer, got 0"),
    ('modules_to_save = ["embed_tokens"', 'modules_to_save = ["norm"',
     "training.cpt.modules_to_save[0]: expected one of embed_tokens, lm_head, got 'norm'"),
    ("min_chars = ", "min_chars = -1 #", "data.filters.min_chars: expected a non-negative integer, got -1"),
    ("boilerplate = [", 'boilerplate = ["(unclosed", ', "data.filters.boilerplate[0]: not a valid regular expression"),
    ('pad_token = "<|finetune_right_pad_id|>"', 'pad_token = "<|pad|>"',
     "chat.pad_token: expected one of the Llama 3 special tokens ("),
    ('stop_tokens = ["<|eot_id|>", "<|end_of_text|>"]', 'stop_tokens = ["<|eot_id|>"]',
     "chat.stop_tokens: expected the eos token '<|end_of_text|>'"),
    ("temperature = 0.1", "temperature = 3.0", "inference.temperature: expected 0..2, got 3.0"),
    ("min_urdu_purity = ", "min_urdu_purity = 1.5 #",
     "evaluation.min_urdu_purity: expected a fraction in [0, 1], got 1.5"),
    ("fidelity_chunks = 1", "fidelity_chunks = 0", "evaluation.fidelity_chunks: expected a positive integer, got 0"),
    ("fidelity_chunk_tokens = 512", "fidelity_chunk_tokens = 1",
     "evaluation.fidelity_chunk_tokens: expected at least 2 (BOS and one token of text), got 1"),
    ('fidelity_text = "eval/ur-en.txt"', 'fidelity_text = "eval/en.txt"',
     "evaluation.fidelity_text: expected a text file relative to the spec, 'eval/en.txt' does not exist"),
    ("generation_prompts = 6 ", "generation_prompts = 0 ",
     "evaluation.generation_prompts: expected a positive integer, got 0"),
    ("min_stopped = 5 ", "min_stopped = 7 ",
     "evaluation.min_stopped: expected a count of answers from 1 to generation_prompts (6), got 7"),
    ('[variants.gguf]\nformat = "gguf"\ndtype = "F16"', '[variants.gguf]\nformat = "gguf"\ndtype = "F32"',
     "variants.gguf.dtype: expected the converted type 'F16', 'BF16' or 'Q8_0', got 'F32'"),
    ("[gates.bnb4]\nmax_kld = ", "[gates.bnb4]\nmax_kld = -1 #",
     "gates.bnb4.max_kld: expected a non-negative number, got -1"),
    ("[gates.bnb4]", "[gates.bnb4_old]", "gates: missing a [gates.bnb4] fidelity gate for variant 'bnb4'"),
    ("[gates.Q6_K]", "[gates.Q6_K_old]", "gates: missing a [gates.Q6_K] fidelity gate for GGUF type 'Q6_K'"),
    ('Q4_K_M = "tiny-instruct-q4_K_M"\n', 'Q4_K_M = "tiny-instruct-q4_K_M"\nQ2_K = "tiny-instruct-q2_K"\n',
     "ollama.tags.Q2_K: names a GGUF type that no variant builds"),
    ('model = "qalb-demo"\n', 'model = "Qalb-Demo"\n',
     "ollama.model: expected a lower-case Ollama model name, got 'Qalb-Demo'"),
    ('max_shard_size = "100MB"', 'max_shard_size = "0MB"', "build.max_shard_size: expected a positive size"),
    ("num_ctx = 8192 ", "num_ctx = 0 ",
     "ollama.num_ctx: expected a positive integer up to the model context 131072, got 0"),
    ("num_ctx = 8192 ", "num_ctx = 262144 ",
     "ollama.num_ctx: expected a positive integer up to the model context 131072"),
    ('[data.instruct]\nname = "Alif Urdu-instruct"', '[data.instruct]\nhub_id = "alif"\nname = "Alif Urdu-instruct"',
     "data.instruct.hub_id: expected a Hub dataset id 'owner/name', got 'alif'"),
    ('"training.seed" = ', '"training.sede" = ', "provenance.not_on_card.training.sede: names no value of this spec"),
    ('source_url = "https://', 'source_url = "huggingface.co/', "provenance.source_url: expected an http(s) URL"),
    ('use_policy = "https://', 'use_policy = "llama.meta.com/', "license_terms.use_policy: expected an http(s) URL"),
    ('notice = "Llama 3.1', 'notice = " "\nold_notice = "Llama 3.1', "license_terms.old_notice: unknown key"),
    ("min_urdu_purity = 0.80 ", 'benchmark_name = "x"\nmin_urdu_purity = 0.80 ',
     "evaluation.benchmark_name: unknown key"),
    ("min_urdu_purity = 0.80 ", "overall_score = 90.0\nmin_urdu_purity = 0.80 ",
     "evaluation.benchmark: expected a name for what the reported scores were measured on"),
    # the importance matrix of the GGUF variant
    ('calibration = "calibration/ur-en.txt"', 'calibration = "calibration/en.txt"',
     "variants.gguf.imatrix.calibration: expected a text file relative to the spec, "
     "'calibration/en.txt' does not exist"),
    ("chunk_tokens = 128", "chunk_tokens = 4", "variants.gguf.imatrix.chunk_tokens: expected at least 8 tokens, got 4"),
    ("chunks = 4", "chunks = 0", "variants.gguf.imatrix.chunks: expected a positive integer, got 0"),
    ("chunks = 4", 'chunks = "all"', "variants.gguf.imatrix.chunks: expected an integer, got 'all'"),
    ("chunks = 4", "chunks = 4\nctx = 512", "variants.gguf.imatrix.ctx: unknown key"),
    ("double_quant = true\n", 'double_quant = true\nimatrix = { calibration = "calibration/ur-en.txt" }\n',
     "variants.bnb4.imatrix: an importance matrix is for GGUF variants only, not 'bnb-4bit'"),
]


def _bad_specs():
    for old, new, expected in BAD:
        yield pytest.param(old, new, expected, id=expected.split(":")[0])
    # A system prompt in decomposed form (NFD): alef with madda above becomes alef + U+0653.
    yield pytest.param("system_prompt = \"\u0622", "system_prompt = \"\u0627\u0653",
                       "chat.system_prompt: expected NFC-normalised text", id="chat.system_prompt-nfd")


@pytest.mark.parametrize("old,new,expected", list(_bad_specs()))
def test_bad_spec_gives_one_line_per_problem(tmp_path, old, new, expected):
    text = (SPECS / "demo.toml").read_text(encoding="utf-8")
    assert old in text, f"test setup: {old!r} not in demo.toml"
    bad = write_spec(tmp_path, text.replace(old, new, 1), "bad.toml")
    with pytest.raises(SpecError) as err:
        specmod.load(bad)
    lines = str(err.value).splitlines()
    assert all(line.startswith(f"{bad}: ") for line in lines), lines
    assert any(expected in line for line in lines), lines


def _load_error(tmp_path, old: str, new: str) -> tuple[Path, list[str]]:
    text = (SPECS / "demo.toml").read_text(encoding="utf-8")
    assert old in text, f"test setup: {old!r} not in demo.toml"
    bad = write_spec(tmp_path, text.replace(old, new, 1), "bad.toml")
    with pytest.raises(SpecError) as err:
        specmod.load(bad)
    return bad, err.value.problems


def test_pad_token_outside_the_llama3_table_is_refused_at_load(tmp_path):
    # used to load, then fail in the merge stage with a KeyError traceback
    bad, problems = _load_error(tmp_path, 'pad_token = "<|finetune_right_pad_id|>"', 'pad_token = "<|pad|>"')
    assert problems == [
        f"{bad}: chat.pad_token: expected one of the Llama 3 special tokens (<|begin_of_text|>, "
        "<|end_of_text|>, <|finetune_right_pad_id|>, <|start_header_id|>, <|end_header_id|>, <|eom_id|>, "
        "<|eot_id|>, <|python_tag|>, or <|reserved_special_token_0|> to <|reserved_special_token_247|>), "
        "got '<|pad|>'"]


def test_control_character_in_the_system_prompt_is_refused_at_load(tmp_path):
    # used to load, then fail when the chat template was rendered
    bad, problems = _load_error(tmp_path, 'system_prompt = "', 'system_prompt = "\\u0007')
    assert problems == [f"{bad}: chat.system_prompt: contains the control character U+0007, "
                        "which a template or Modelfile cannot hold; remove it"]


@pytest.mark.parametrize("old,new", [
    ('"Q4_K_M", "IQ4_XS"', '"Q4_K_XL", "IQ4_XS"'),
    ('repo = "qalb-demo/Qalb-Demo-1.0-Tiny-Instruct-FP16"', 'repo = "qalb-demo/Qalb-Demo-1.0-Tiny-Instruct"'),
], ids=["quant-type", "repo"])
def test_a_variant_problem_is_one_line_not_one_per_section_that_refers_to_it(tmp_path, old, new):
    # gates and Ollama tags are matched to the variants only once those are valid
    _, problems = _load_error(tmp_path, old, new)
    assert len(problems) == 1 and ": variants" in problems[0], problems


@pytest.mark.parametrize("text,why", [
    ("hello\x07world", "the control character U+0007"),
    ("\x7f", "the control character U+007F"),
    ("\ud800", "the surrogate U+D800"),
    ("\ue000", "the private-use character U+E000"),
    ("\u0378", "the unassigned code point U+0378"),
])
def test_unwritable_names_the_first_character_a_template_cannot_hold(text, why):
    assert specmod.unwritable(text) == f"contains {why}, which a template or Modelfile cannot hold; remove it"


@pytest.mark.parametrize("text,why", [
    ("zero\u200cwidth", "the format character U+200C"),  # Ollama's parser drops it
    ("no\u00a0break", "the space character U+00A0"),
])
def test_what_a_modelfile_drops_is_unwritable_too(text, why):
    assert specmod.unwritable(text) == f"contains {why}, which a template or Modelfile cannot hold; remove it"


def test_a_triple_quote_ending_a_line_is_unwritable():
    assert "end of a line" in specmod.unwritable('say """\nhi')
    assert specmod.unwritable('""" inside a line is fine') is None


def test_line_breaks_tabs_and_urdu_are_writable(qalb_spec):
    assert specmod.unwritable("line\n\tindented") is None
    assert specmod.unwritable(qalb_spec.chat.system_prompt) is None


def test_the_special_token_table_is_the_tokenizers(qalb_spec):
    from release import llama3

    assert llama3.SPECIAL_TOKENS is specmod.SPECIAL_TOKENS and llama3.VOCAB_SIZE == 128_256
    assert specmod.SPECIAL_TOKENS["<|eot_id|>"] == 128_009 and len(specmod.SPECIAL_TOKENS) == 256
    c = qalb_spec.chat
    assert {c.bos_token, c.eos_token, c.eot_token, c.pad_token, *c.stop_tokens} <= set(specmod.SPECIAL_TOKENS)
    # release.spec re-exports the table (modules import it from there), the same object
    assert specmod.SPECIAL_TOKENS is special_tokens.SPECIAL_TOKENS and specmod.VOCAB_BASE == 128_000
    assert special_tokens.described().startswith("one of the Llama 3 special tokens (<|begin_of_text|>, ")
    assert special_tokens.described().endswith("or <|reserved_special_token_0|> to <|reserved_special_token_247|>)")


def test_several_problems_are_all_reported(tmp_path):
    text = (SPECS / "demo.toml").read_text(encoding="utf-8")
    text = text.replace("r = 64\n", 'r = "x"\n').replace("alpha = 128\n", "alpha = 1.5\n").replace(
        "max_new_tokens = 256", "max_new_tokens = true")
    bad = write_spec(tmp_path, text, "many.toml")
    with pytest.raises(SpecError) as err:
        specmod.load(bad)
    assert len(err.value.problems) == 3, err.value.problems


@pytest.mark.parametrize("content,expected", [
    (b"[release\nname = 1", "not valid TOML"),
    (b"\xff\xfe[release]", "not UTF-8 text"),
])
def test_unreadable_spec_is_one_line(tmp_path, content, expected):
    bad = tmp_path / "broken.toml"
    bad.write_bytes(content)
    with pytest.raises(SpecError) as err:
        specmod.load(bad)
    (line,) = str(err.value).splitlines()
    assert line.startswith(f"{bad}: {expected}")


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        specmod.load(tmp_path / "nope.toml")


def test_derived_facts(demo_spec):
    assert demo_spec.build_dir == (ROOT / "build" / "Qalb-Demo-1.0-Tiny-Instruct")
    assert demo_spec.max_shard_bytes == 100_000_000
    assert demo_spec.gguf_types() == ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M"]
    assert demo_spec.imatrix_file_name() == "Qalb-Demo-1.0-Tiny-Instruct-imatrix.gguf"
    assert demo_spec.section_hash("lora") != demo_spec.section_hash("chat")
    assert demo_spec.section_hash("lora") == demo_spec.section_hash("lora")
    assert specmod.parse_size("5GB") == 5_000_000_000 and specmod.parse_size("1.5 MB") == 1_500_000


def test_section_hash_is_the_sha256_of_the_dotted_values(demo_spec):
    """Pinned to its recipe: a changed hash would make every built stage run again."""
    import hashlib
    import json

    keys = ("lora", "chat.eos_token", "chat.no_such_key", "lora.r.deeper")
    picked = {"lora": demo_spec.raw["lora"], "chat.eos_token": demo_spec.chat.eos_token,
              "chat.no_such_key": None, "lora.r.deeper": None}
    blob = json.dumps(picked, sort_keys=True, ensure_ascii=False, default=str)
    assert demo_spec.section_hash(*keys) == hashlib.sha256(blob.encode()).hexdigest()


# --- the schema: typed conversion and dotted keys (release/schema.py) ---------------------------


def test_dotted_walks_nested_tables_and_is_none_off_them():
    table = {"chat": {"eos_token": "<|eot_id|>"}, "lora": {"r": 8}, "tags": ["a"]}
    assert dotted(table, "chat.eos_token") == "<|eot_id|>"
    assert dotted(table, "chat") == {"eos_token": "<|eot_id|>"}
    assert dotted(table, "chat.nope") is None and dotted(table, "nope.deeper") is None
    assert dotted(table, "lora.r.deeper") is None  # 8 is a value, not a table
    assert dotted(table, "tags.0") is None  # lists are not walked


@dataclass(frozen=True)
class _Inner:
    n: int
    kind: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class _Outer:
    inner: _Inner
    ratio: float | None = None
    names: list[str] = field(default_factory=list)


def test_convert_reports_every_problem_with_its_dotted_key():
    problems: list[str] = []
    convert(_Outer, {"inner": {"n": True, "kind": "c", "x": 1}, "names": ["ok", 3]}, "", problems)
    assert problems == [
        "inner.x: unknown key (expected one of: n, kind)",
        "inner.n: expected an integer, got True",
        "inner.kind: expected one of 'a', 'b', got 'c'",
        "names[1]: expected a string, got 3",
    ]
    problems = []
    assert convert(_Outer, {"inner": {"n": 2}, "ratio": 1}, "", problems) == _Outer(_Inner(2), 1.0)
    assert problems == []
    convert(_Outer, {}, "top", problems)
    assert problems == ["top.inner: missing (expected a table [_inner])"]
    assert describe(list[str]) == "a list of strings" and describe(float | None) == "a number"


def test_the_schema_and_token_table_import_nothing_of_the_package():
    """Leaf modules: release/spec.py may import them without a cycle."""
    import json
    import subprocess
    import sys

    code = ("import json, sys, release.schema, release.special_tokens; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('release.'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == ["release.schema", "release.special_tokens"]


# --- where values come from, and the licence's duties -------------------------------------------


def _marked_keys(path: Path) -> set[str]:
    """Dotted keys whose line carries a '(not on the card)' comment."""
    import re

    section, keys = "", set()
    for line in path.read_text(encoding="utf-8").splitlines():
        head = re.match(r"^\[+([\w.]+)\]+", line)
        if head:
            section = head.group(1)
        m = re.match(r"^(\w+)\s*=.*#.*\(not on the card\)", line)
        if m:
            keys.add(f"{section}.{m.group(1)}")
    return keys


@pytest.mark.parametrize("name", ["qalb.toml", "demo.toml"])
def test_every_value_marked_not_on_the_card_is_in_the_provenance_table(name):
    """The comments a reader sees and the table the cards read say the same: each value marked
    '(not on the card)' is listed (itself or its table) with where it comes from."""
    s = specmod.load(SPECS / name)
    marked = _marked_keys(SPECS / name)
    assert marked, "test setup: no marked keys found"
    for key in marked:
        assert s.not_on_card(key), f"{name}: {key} is marked (not on the card) but not in [provenance.not_on_card]"


def test_the_three_training_values_the_card_leaves_out_are_in_the_table(qalb_spec):
    for key in ("training.cpt.learning_rate", "training.cpt.epochs", "training.sft.warmup_ratio"):
        assert qalb_spec.not_on_card(key)
    assert qalb_spec.not_on_card("data.filters.min_chars") == qalb_spec.not_on_card("data.filters")  # a whole table
    assert qalb_spec.not_on_card("training.sft.learning_rate") is None  # 5e-5 is on the card
    assert qalb_spec.not_on_card("ollama.num_ctx") and qalb_spec.ollama.num_ctx == 8192


def test_licence_terms_and_the_reported_scores_source(qalb_spec):
    terms = qalb_spec.license_terms
    assert terms.notice == ("Llama 3.1 is licensed under the Llama 3.1 Community License, Copyright \u00a9 Meta "
                            "Platforms, Inc. All Rights Reserved.")
    licence = qalb_spec.license_text
    assert f"\u201c{terms.notice}\u201d" in licence  # the line §1.b.iii quotes, verbatim
    assert terms.use_policy in licence and f"\u201c{terms.attribution}\u201d" in licence
    assert f"\u201c{terms.name_prefix}\u201d at the beginning of any such AI model name" in licence
    assert qalb_spec.provenance.source_url == "https://huggingface.co/enstazao/Qalb-1.0-8B-Instruct"


def test_a_name_without_the_licences_prefix_is_a_warning_not_an_error(qalb_spec, tmp_path):
    (line,) = specmod.owner_warnings(qalb_spec)
    assert line.startswith("release.name: 'Qalb-1.0-8B-Instruct' does not begin with 'Llama', which the base model's "
                           "licence (llama3.1, Llama 3.1 Community License) asks of a model trained from its materials")
    renamed = replace(qalb_spec, release=replace(qalb_spec.release, name="Llama-Qalb-1.0-8B-Instruct"))
    assert specmod.owner_warnings(renamed) == []
    # the rule's inputs are the spec's: a licence without a name rule warns about nothing
    other = replace(qalb_spec, license_terms=replace(qalb_spec.license_terms, name_prefix=""))
    assert specmod.owner_warnings(other) == []
    # ./inv spec prints it as a warning line and succeeds
    from test_tasks import inv

    out = inv("spec", "--spec", str(write_spec(tmp_path)))
    assert out.returncode == 0, out.stderr
    warnings = [stderr_line for stderr_line in out.stderr.splitlines() if stderr_line.startswith("warning: ")]
    assert warnings == [f"warning: {tmp_path / 'demo.toml'}: release.name: 'Qalb-Demo-1.0-Tiny-Instruct' does not "
                        "begin with 'Llama', which the base model's licence (llama3.1, Llama 3.1 Community License) "
                        "asks of a model trained from its materials (license_terms.name_prefix); the owner decides"]
    assert "error:" not in out.stderr


def test_quants_for_small_machines_have_gates_tags_and_an_importance_matrix(qalb_spec, demo_spec):
    """Q3_K_M and IQ4_XS in both specs, gated and tagged like the other quants; the calibration
    text is the shipped Urdu-first one, not the evaluation text."""
    for s in (qalb_spec, demo_spec):
        for q in ("IQ4_XS", "Q3_K_M"):
            assert q in s.gguf_types() and q in s.gates and q in s.ollama.tags
        im = s.gguf_imatrix()
        assert im is not None and im.calibration == "calibration/ur-en.txt"
        assert s.resolve(im.calibration) != s.resolve(s.evaluation.fidelity_text)
    # looser than Q4_K_M's, tighter than no gate: llama.cpp's IQ4_XS and Q3_K_M sit between Q4_K_M and Q2_K
    g = qalb_spec.gates
    assert g["Q4_K_M"].max_kld < g["IQ4_XS"].max_kld < g["Q3_K_M"].max_kld < 0.445
    assert g["Q4_K_M"].min_top1 > g["IQ4_XS"].min_top1 > g["Q3_K_M"].min_top1 > 0.711
    assert qalb_spec.gguf_imatrix().chunks is None  # the whole text
    assert qalb_spec.ollama.tags["IQ4_XS"] == "8b-instruct-iq4_XS"


def test_the_calibration_text_is_urdu_first_nfc_and_not_the_evaluation_text(qalb_spec):
    from release import urdu

    text = qalb_spec.resolve(qalb_spec.gguf_imatrix().calibration).read_text(encoding="utf-8")
    assert unicodedata.is_normalized("NFC", text)
    ur, letters = urdu.count_letters(text)
    assert 0.75 < ur / letters < 0.95  # Urdu first; English and Roman Urdu are 19% of the letters, 7% of the tokens
    evaluation = qalb_spec.resolve(qalb_spec.evaluation.fidelity_text).read_text(encoding="utf-8").split()
    words = text.split()
    grams = {" ".join(words[i:i + 6]) for i in range(len(words) - 5)}
    shared = [g for g in (" ".join(evaluation[i:i + 6]) for i in range(len(evaluation) - 5)) if g in grams]
    assert shared == []  # no 6-word run of the evaluation text
