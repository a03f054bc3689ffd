"""The release spec: both bundled specs load; bad specs give one line per problem naming the
file, the key and what was expected; the system prompt is the reference text byte for byte."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

from release import spec as specmod
from release.spec import SpecError

from conftest import ROOT, SPECS, write_spec

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
    assert (cpt.optimizer, cpt.lr_scheduler, cpt.warmup_ratio, cpt.effective_batch_size) == ("adamw_8bit", "cosine", 0.05, 128)
    assert cpt.modules_to_save == ["embed_tokens", "lm_head"]
    assert (sft.optimizer, sft.lr_scheduler, sft.learning_rate, sft.effective_batch_size, sft.epochs) == ("adamw_8bit", "linear", 5e-5, 64, 2)
    assert (s.training.precision, s.training.gradient_checkpointing) == ("bf16", True)
    assert s.data.urdu_tokens + s.data.english_tokens == 1_980_000_000  # ~1.97B on the card
    assert s.data.retained_fraction == 0.678
    inf = s.inference
    assert (inf.max_new_tokens, inf.temperature, inf.top_p, inf.repetition_penalty, inf.do_sample) == (256, 0.1, 0.9, 1.1, True)
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
    lines = [l for l in REFERENCE.read_text(encoding="utf-8").splitlines() if l.startswith("\u0622\u067e ")]
    assert lines == [prompt]


def test_windows_1252_damaged_prompt_is_not_the_reference():
    # The known corruption: U+06C1 replaced (here by U+0647, Arabic heh) after a code-page trip.
    damaged = SYSTEM_PROMPT_ESCAPED.replace("\u06c1", "\u0647")
    assert damaged != SYSTEM_PROMPT_ESCAPED and damaged.count("\u06c1") == 0


# (replace this text in demo.toml, with this, expect a problem line containing this)
BAD = [
    ("r = 8\n", 'r = "eight"\n', 'lora.r: expected an integer, got \'eight\''),
    ("r = 8\n", "r = 0\n", "lora.r: expected a positive integer, got 0"),
    ("alpha = 16\n", "alpha = 16\nbogus = 1\n", "lora.bogus: unknown key"),
    ("[release]\n", "[release]\ncodename = 'x'\n", "release.codename: unknown key"),
    ('version = "1.0"\n', "", "release.version: missing (expected a string)"),
    ("do_sample = true", 'do_sample = "yes"', "inference.do_sample: expected true or false, got 'yes'"),
    ("top_p = 0.9", "top_p = 1.5", "inference.top_p: expected a number in (0, 1], got 1.5"),
    ('lr_scheduler = "cosine"', 'lr_scheduler = "exponential"', "training.cpt.lr_scheduler: expected one of 'cosine', 'linear', 'constant'"),
    ('"Q4_K_M"]', '"Q4_K_XL"]', "variants.gguf.quant_types[3]: expected a llama.cpp type"),
    ('stop_tokens = ["<|eot_id|>", "<|end_of_text|>"]', 'stop_tokens = ["<|end_of_text|>"]', "chat.stop_tokens: expected the end-of-turn token '<|eot_id|>'"),
    ("hidden_size = 256", "hidden_size = 320", "base.scaffold.hidden_size: expected a positive multiple of 256"),
    ("num_key_value_heads = 2", "num_key_value_heads = 3", "base.scaffold.num_key_value_heads: expected a divisor of num_attention_heads 4"),
    ('Q4_K_M = "tiny-instruct-q4_K_M"\n', "", "ollama.tags: missing a tag for GGUF type 'Q4_K_M'"),
    ('repo = "qalb-demo/Qalb-Demo-1.0-Tiny-Instruct-FP16"', 'repo = "qalb-demo/Qalb-Demo-1.0-Tiny-Instruct"', "variants: each variant needs its own repo"),
    ('dtype = "bfloat16"\nrepo', 'dtype = "float16"\nrepo', "variants: expected exactly one safetensors variant with dtype 'bfloat16'"),
    ('max_shard_size = "100MB"', 'max_shard_size = "lots"', "build.max_shard_size: expected a size like '5GB'"),
    ('endpoint = "local"', 'endpoint = "ftp://hub"', "hub.endpoint: expected an http(s) URL or 'local'"),
    ('format = "jsonl"', 'format = "csv"', "data.corpora[0].format: expected one of 'jsonl', 'parquet', 'text'"),
    ("[data.instruct]", "[data.instruct_set]", "data.instruct_set: unknown key"),
    ('license_file = "licenses/llama3.1.txt"', 'license_file = "LICENSE.txt"', "release.license_file: expected a text file relative to the spec"),
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


def test_several_problems_are_all_reported(tmp_path):
    text = (SPECS / "demo.toml").read_text(encoding="utf-8")
    text = text.replace("r = 8\n", 'r = "x"\n').replace("alpha = 16\n", "alpha = 1.5\n").replace(
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
    assert demo_spec.gguf_types() == ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"]
    assert demo_spec.section_hash("lora") != demo_spec.section_hash("chat")
    assert demo_spec.section_hash("lora") == demo_spec.section_hash("lora")
    assert specmod.parse_size("5GB") == 5_000_000_000 and specmod.parse_size("1.5 MB") == 1_500_000
