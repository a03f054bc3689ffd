"""The bitsandbytes 4-bit variant against transformers' own quantize-and-save, then loaded back."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from release import bnb4, chat
from release.shards import INDEX, model_files


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in set(model_files(folder).values()):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def variant(demo_spec):
    return bnb4.variant(demo_spec)[1]


@pytest.fixture(scope="module")
def reference(tiny_model, variant, tmp_path_factory) -> Path:
    """What transformers writes: load the BF16 model with a BitsAndBytesConfig, save_pretrained."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = tmp_path_factory.mktemp("bnb-reference")
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=cfg, dtype=torch.bfloat16).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ours(tiny_model, variant, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bnb-ours")
    figures = bnb4.quantize_model(tiny_model, out, variant, max_shard_bytes=40_000_000, progress=False)
    bnb4.write_model_files(tiny_model, out, variant)
    return out, figures


def test_tensors_equal_what_transformers_writes(reference, ours):
    """Bit-for-bit: the same bitsandbytes function on the same BF16 weights, so no tolerance."""
    ref, mine = _tensors(reference), _tensors(ours[0])
    assert set(mine) == set(ref)
    quantized = [k for k in ref if k.endswith(".quant_state.bitsandbytes__nf4")]
    assert len(quantized) == 2 * 7  # every projection of both layers; lm_head and embeddings stay BF16
    assert ref["lm_head.weight"].dtype == mine["lm_head.weight"].dtype == torch.bfloat16
    for k in ref:
        assert mine[k].dtype == ref[k].dtype and mine[k].shape == ref[k].shape, k
        assert torch.equal(mine[k], ref[k]), k
    cfg = json.loads((ours[0] / "config.json").read_text())
    assert cfg["quantization_config"] == json.loads((reference / "config.json").read_text())["quantization_config"]
    assert cfg["quantization_config"]["bnb_4bit_use_double_quant"] is True
    # the BF16 model's other fields are kept (rope in both transformers 4.x and 5.x forms)
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and "rope_parameters" in cfg


def test_sharded_within_limit_with_index(ours):
    out, figures = ours
    files = sorted(out.glob("*.safetensors"))
    assert len(files) == figures["files"] > 1
    index = json.loads((out / INDEX).read_text())
    for f in files:  # within the limit, unless one tensor alone is larger (the 65 MB embeddings)
        held = [k for k, v in index["weight_map"].items() if v == f.name]
        assert f.stat().st_size <= 40_000_000 or len(held) == 1, (f.name, held)
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert not [p.name for p in out.iterdir() if p.suffix not in (".safetensors", ".json")]  # no leftovers
    for f in files:  # header rewritten in place: JSON padded with spaces, data exactly to the end
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        assert n % 8 == 0 and raw[8:8 + n].rstrip(b" ").endswith(b"}")
        spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        assert 8 + n + spans[-1][1] == len(raw)
    # 4 bits per weight plus the (double-quantized) block statistics
    assert 4.0 < figures["bits_per_weight"] < 4.3


def test_loads_and_generates_close_to_bf16(demo_spec, tiny_model, ours):
    """transformers loads the folder as a bitsandbytes model and generates. The random demo
    network amplifies NF4's error (the exactness is the test above), so the bounds here only
    separate "the same network, quantized" from a broken one (a wrong layout gives KLD >> 1 and
    top-1 agreement near 1/128256)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ours[0])
    q = AutoModelForCausalLM.from_pretrained(ours[0])
    assert type(q.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    ids = tok.apply_chat_template([{"role": "user", "content": "پاکستان کا دارالحکومت کون سا شہر ہے؟"}],
                                  chat_template=chat.jinja_template(demo_spec.chat),
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        a, b = q(ids).logits[0].float(), ref(ids).logits[0].float()
    kld = (b.softmax(-1) * (b.log_softmax(-1) - a.log_softmax(-1))).sum(-1).mean()  # KL(BF16 || NF4)
    top1 = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    assert float(kld) < 1.0 and top1 >= 0.15, (float(kld), top1)
    out = q.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5


def test_stage_refuses_non_bf16_and_missing_model(demo_spec, tiny_model, tmp_path, variant):
    from dataclasses import replace

    empty = replace(demo_spec, build=replace(demo_spec.build, dir=str(tmp_path / "empty")))
    with pytest.raises(bnb4.Bnb4Error, match="no config.json; build the merge stage first"):
        bnb4.run(empty, {"model": tmp_path / "no-model"}, progress=False)  # a stage runs alone, handed its inputs
    f16 = tmp_path / "f16"
    f16.mkdir()
    from safetensors.torch import save_file

    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64, dtype=torch.float16)},
              f16 / "model.safetensors")
    with pytest.raises(bnb4.Bnb4Error, match="expected bfloat16"):
        bnb4.quantize_model(f16, tmp_path / "out", variant, None, progress=False)
