"""The tiny Llama-3 model kit: deterministic bytes, the real Llama 3 tokenizer, and files that
transformers (4.x and 5.x fields) and llama.cpp's converter read as a Llama 3.1 model."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from release import llama3, scaffold

URDU = [
    "آپ ایک مددگار اور بے ضرر مصنوعی ذہانت کے اسسٹنٹ ہیں۔",
    "پاکستان کا دارالحکومت اسلام آباد ہے، اور کراچی سب سے بڑا شہر ہے۔",
    "اردو ادب میں غالب اور اقبال کا مقام بہت بلند ہے۔ ۱۲۳ 456",
]
MIXED = ["Urdu اور English ملا کر: 'it's' 😀\n\n\tend  ", "  leading spaces, tabs\tand\r\nCRLF"]


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes_other_seed_other_weights(demo_spec, tiny_model, tokenizer_cache, tmp_path):
    again = tmp_path / "again"
    scaffold.write_model(again, demo_spec.base.scaffold, demo_spec.chat, tokenizer_cache=tokenizer_cache)
    assert _digests(again) == _digests(tiny_model)
    other = tmp_path / "other"
    scaffold.write_model(other, replace(demo_spec.base.scaffold, seed=1), demo_spec.chat,
                         tokenizer_cache=tokenizer_cache)
    a, b = load_file(tiny_model / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])


def test_sharded_model_has_an_index_and_the_same_tensors(tiny_model, tiny_sharded):
    index = json.loads((tiny_sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    merged = {}
    for s in shards:
        assert (tiny_sharded / s).stat().st_size <= 40_000_000 + 128_256 * 256 * 2 + 100_000
        merged.update(load_file(tiny_sharded / s))
    single = load_file(tiny_model / "model.safetensors")
    assert merged.keys() == single.keys() == set(index["weight_map"])
    assert all(torch.equal(merged[k], single[k]) for k in single)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())


def test_tensors_are_bf16_llama31_layout(demo_spec, tiny_model):
    sc = demo_spec.base.scaffold
    tensors = load_file(tiny_model / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert tensors["model.embed_tokens.weight"].shape == (128_256, 256)
    assert tensors["lm_head.weight"].shape == (128_256, 256)  # untied, as Llama 3.1 8B
    assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (2 * 64, 256)  # GQA: 2 kv heads
    assert len(tensors) == 2 + 9 * sc.num_hidden_layers + 1


def test_eight_b_shapes_are_llama_31_8b():
    shapes = dict(scaffold.tensor_shapes(scaffold.eight_b_shaped(32)))
    total = sum(math.prod(s) for s in shapes.values())
    assert total == 8_030_261_248  # Llama 3.1 8B's parameter count
    assert shapes["model.layers.31.self_attn.k_proj.weight"] == (1024, 4096)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (4096, 14336)


def test_config_has_the_fields_transformers_4_reads(tiny_model):
    cfg = json.loads((tiny_model / "config.json").read_text())
    # transformers 4.4x reads these top-level fields; without them it silently falls back to
    # rope_theta 10000 and no llama3 scaling.
    assert cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"] == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    assert cfg["torch_dtype"] == "bfloat16" and cfg["model_type"] == "llama"
    assert cfg["rope_parameters"] == {**cfg["rope_scaling"], "rope_theta": 500000.0}
    tok_cfg = json.loads((tiny_model / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # 4.x has no TokenizersBackend
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"]) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert "chat_template" not in tok_cfg  # a base model: the release installs its own template


def test_transformers_loads_and_reads_the_rope(demo_spec, tiny_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_model)
    assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.rope_parameters["rope_theta"] == 500000.0
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    expected = sum(math.prod(s) for _, s in scaffold.tensor_shapes(demo_spec.base.scaffold))
    assert sum(p.numel() for p in model.parameters()) == expected
    out = model.generate(torch.tensor([[128000, 1000, 2000]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_logits_are_not_flat_and_rope_is_observable(tiny_model):
    """With the kit's init scale a wrong rope shows: the misreading transformers 4.x makes of a
    rope_parameters-only config (theta 10000) moves the logits by far more than bf16 noise."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = torch.arange(1000, 1064).unsqueeze(0)
    right = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(tiny_model)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    wrong = AutoModelForCausalLM.from_pretrained(tiny_model, config=cfg, dtype=torch.float32)
    with torch.no_grad():
        a, b = right(ids).logits[0], wrong(ids).logits[0]
    assert a[-1].std() > 0.5  # not flat
    assert torch.allclose(a[0], b[0], atol=1e-4)  # position 0 has no rotation either way
    assert (a[8:] - b[8:]).abs().max() > 1.0


def test_special_tokens_at_official_ids(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert len(tok) == 128_256
    official = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004,
                "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008,
                "<|eot_id|>": 128009, "<|python_tag|>": 128010, "<|reserved_special_token_0|>": 128002,
                "<|reserved_special_token_2|>": 128005, "<|reserved_special_token_3|>": 128011,
                "<|reserved_special_token_247|>": 128255}
    assert {t: tok.convert_tokens_to_ids(t) for t in official} == official
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (128000, 128001, 128004)
    ids = tok("<|start_header_id|>user<|end_header_id|>\n\nسلام<|eot_id|>")["input_ids"]
    assert ids[:3] == [128000, 128006, 882] and ids[-1] == 128009  # 882 = "user"


@pytest.mark.parametrize("text", URDU + MIXED)
def test_tokenizer_equals_meta_tiktoken_and_round_trips(tiny_model, text):
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    meta = MetaTokenizer(llama3.tiktoken_file())
    ids = tok(text)["input_ids"]
    assert ids == meta.encode(text, bos=True, eos=False)
    assert tok.decode(ids, skip_special_tokens=True) == text


