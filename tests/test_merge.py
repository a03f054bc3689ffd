"""The streaming merge against PEFT's merge_and_unload (bit for bit), the files transformers
loads, FP16, and refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from release import merge as merger
from release.merge import MergeError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _load_base(base: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)


def make_adapter(base: Path, out: Path, seed: int, *, b_scale: float = 30.0, edit_saved: bool = True, **cfg) -> Path:
    """A PEFT adapter with random, non-trivial weights (B is zero at PEFT's usual init)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg.setdefault("r", 8)
    cfg.setdefault("lora_alpha", 16)
    cfg.setdefault("target_modules", TARGETS)
    model = get_peft_model(_load_base(base), LoraConfig(init_lora_weights=False, **cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand_like(p))
            elif "modules_to_save" in name and edit_saved:
                p.add_(0.05 * torch.randn_like(p.float()).to(p.dtype))
    model.save_pretrained(out)
    return out


def peft_merge(base: Path, adapters: list[Path]) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    model = _load_base(base)
    for a in adapters:
        model = PeftModel.from_pretrained(model, a).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ours(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def run(spec, base, adapters, out, **kw):
    return merger.merge(base, adapters, out, chat_spec=spec.chat, inference=spec.inference, progress=False, **kw)


def reference64(base_w: torch.Tensor, adapter: Path, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 W + s*B@A (or DoRA), written from the formulas, not from release/merge.py; and
    |W| + |s*B@A|, the size of the terms (the rounding of a sum scales with it)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    t = load_file(adapter / "adapter_model.safetensors")
    key = f"base_model.model.{module}"
    a, b = t[f"{key}.lora_A.weight"].double(), t[f"{key}.lora_B.weight"].double()
    r = a.shape[0]
    alpha = cfg["lora_alpha"]
    for pat, val in (cfg.get("alpha_pattern") or {}).items():
        if module.endswith(pat):
            alpha = val
            break
    scale = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
    delta = scale * (b @ a)
    v = base_w.double() + delta
    size = base_w.double().abs() + delta.abs()
    if cfg["use_dora"]:
        m = t[f"{key}.lora_magnitude_vector"].double()
        factor = m.view(-1, 1) / v.norm(dim=1, keepdim=True)
        v, size = factor * v, factor.abs() * size
    return v, size


def compare_with_peft(base: Path, adapter: Path, got: dict, want: dict) -> None:
    """Every tensor equal to PEFT's, bit for bit; and (a sanity check of the formulas the test
    writes itself) within one bf16 rounding of the terms of the exact float64 sum."""
    base_t = {}
    for f in base.glob("*.safetensors"):
        base_t.update(load_file(f))
    lora = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
            for k in load_file(adapter / "adapter_model.safetensors") if k.endswith("lora_A.weight")}
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == torch.bfloat16 and g.shape == w.shape, name
        assert torch.equal(g.view(torch.int16), w.view(torch.int16)), f"{name} differs from PEFT"
        if name in lora:
            ref, size = reference64(base_t[name], adapter, name.removesuffix(".weight"))
            assert bool(((g.double() - ref).abs() <= 2**-8 * size + 1e-30).all()), name


@pytest.mark.parametrize("kind,cfg", [
    ("lora", {}),
    ("rslora", {"use_rslora": True, "r": 16, "lora_alpha": 8}),
    ("patterns", {"rank_pattern": {"down_proj": 4, "q_proj": 2}, "alpha_pattern": {"k_proj": 3}}),
    ("dora", {"use_dora": True, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    ("modules_to_save", {"modules_to_save": ["embed_tokens", "lm_head"]}),
    ("fan_in_fan_out", {"fan_in_fan_out": True}),
])
def test_merge_matches_peft(demo_spec, tiny_model, tmp_path, kind, cfg):
    adapter = make_adapter(tiny_model, tmp_path / "adapter", seed=1, **cfg)
    if kind == "fan_in_fan_out":  # PEFT rewrites it to False on save; a hand-written config keeps it
        c = json.loads((adapter / "adapter_config.json").read_text())
        c["fan_in_fan_out"] = True
        (adapter / "adapter_config.json").write_text(json.dumps(c))
    figures = run(demo_spec, tiny_model, [adapter], tmp_path / "out")
    got, want = ours(tmp_path / "out"), peft_merge(tiny_model, [adapter])
    compare_with_peft(tiny_model, adapter, got, want)
    n_lora = {"dora": 6}.get(kind, 14)
    assert figures["lora_merged"] == n_lora
    if kind == "modules_to_save":
        assert figures["replaced"] == 2
        base = load_file(tiny_model / "model.safetensors")
        assert not torch.equal(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_two_chained_adapters_match_peft_merging_in_turn(demo_spec, tiny_model, tmp_path):
    """CPT adapter (with embed_tokens/lm_head trained in full), then an SFT adapter applied to the
    BF16-rounded result, as the SFT stage saw it: PEFT merging one after the other."""
    cpt = make_adapter(tiny_model, tmp_path / "cpt", seed=2, modules_to_save=["embed_tokens", "lm_head"])
    sft = make_adapter(tiny_model, tmp_path / "sft", seed=3, r=4, lora_alpha=8)
    run(demo_spec, tiny_model, [cpt], tmp_path / "step1")
    run(demo_spec, tiny_model, [cpt, sft], tmp_path / "out")
    step1, got = ours(tmp_path / "step1"), ours(tmp_path / "out")
    assert got.keys() == step1.keys()
    compare_with_peft(tiny_model, cpt, step1, peft_merge(tiny_model, [cpt]))
    want = peft_merge(tiny_model, [cpt, sft])
    for name, w in want.items():
        assert torch.equal(got[name].view(torch.int16), w.view(torch.int16)), name
        if name.endswith("proj.weight"):  # the SFT delta was added to the rounded CPT weights
            ref, size = reference64(step1[name], sft, name.removesuffix(".weight"))
            assert bool(((got[name].double() - ref).abs() <= 2**-8 * size + 1e-30).all()), name


def test_sharded_input_gives_the_same_tensors(demo_spec, tiny_model, tiny_sharded, tmp_path):
    adapter = make_adapter(tiny_model, tmp_path / "adapter", seed=4, modules_to_save=["lm_head"])
    run(demo_spec, tiny_model, [adapter], tmp_path / "single")
    run(demo_spec, tiny_sharded, [adapter], tmp_path / "sharded", max_shard_bytes=30_000_000)
    a, b = ours(tmp_path / "single"), ours(tmp_path / "sharded")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3


def test_transformers_loads_the_output_and_its_logits_match_peft(demo_spec, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cpt = make_adapter(tiny_model, tmp_path / "cpt", seed=5, modules_to_save=["embed_tokens", "lm_head"])
    sft = make_adapter(tiny_model, tmp_path / "sft", seed=6)
    run(demo_spec, tiny_model, [cpt, sft], tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    from peft import PeftModel
    ref = _load_base(tiny_model)
    for a in (cpt, sft):
        ref = PeftModel.from_pretrained(ref, a).merge_and_unload()
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tok.apply_chat_template([{"role": "user", "content": "اردو میں جواب دیں: پاکستان کا دارالحکومت؟"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert torch.equal(a, b)  # the same bits in, the same bits out


def test_written_config_and_tokenizer(demo_spec, tiny_model, tmp_path):
    adapter = make_adapter(tiny_model, tmp_path / "adapter", seed=7)
    run(demo_spec, tiny_model, [adapter], tmp_path / "out", out_fp16=tmp_path / "fp16")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["eos_token_id"] == [128001, 128009]
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["torch_dtype"] == "float16"
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [128001, 128009]
    assert (gen["temperature"], gen["top_p"], gen["repetition_penalty"], gen["max_new_tokens"],
            gen["do_sample"]) == (0.1, 0.9, 1.1, 256, True)
    tok_cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    from release import chat
    assert tok_cfg["chat_template"] == chat.jinja_template(demo_spec.chat)
    from transformers import AutoTokenizer, GenerationConfig
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = tok.apply_chat_template([{"role": "user", "content": "سلام"}], tokenize=False, add_generation_prompt=True)
    assert demo_spec.chat.system_prompt in text and text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == [128001, 128009]


def test_fp16_variant_is_the_bf16_weights_cast(demo_spec, tiny_model, tmp_path):
    adapter = make_adapter(tiny_model, tmp_path / "adapter", seed=8)
    run(demo_spec, tiny_model, [adapter], tmp_path / "bf16", out_fp16=tmp_path / "fp16")
    a, b = ours(tmp_path / "bf16"), ours(tmp_path / "fp16")
    assert all(b[k].dtype == torch.float16 and torch.equal(b[k], a[k].to(torch.float16)) for k in a)


def test_fp16_overflow_fails_with_tensor_names_and_writes_nothing(demo_spec, tiny_model, tmp_path):
    adapter = make_adapter(tiny_model, tmp_path / "adapter", seed=9, target_modules=["o_proj"], b_scale=3e6)
    out = tmp_path / "stage"
    with pytest.raises(MergeError,
                       match=r"values beyond float16's range .* model\.layers\.0\.self_attn\.o_proj\.weight"):
        merger.run_merge(demo_spec, tiny_model, [adapter], out, progress=False)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_stage_writes_bf16_and_fp16_folders_with_a_manifest(demo_spec, tiny_model, tmp_path):
    adapter = make_adapter(tiny_model, tmp_path / "adapter", seed=10)
    m = merger.run_merge(demo_spec, tiny_model, [adapter], tmp_path / "merge", progress=False)
    ran = m.built
    assert ran and {e.path.split("/")[0] for e in m.outputs} == {"bf16", "fp16"}
    assert m.figures["lora_merged"] == 14 and m.figures["peak_rss_mb"] > 0
    ran = merger.run_merge(demo_spec, tiny_model, [adapter], tmp_path / "merge", progress=False).built
    assert not ran


# --- refusals: one line, nothing written ------------------------------------------------------

def _edit_config(adapter: Path, **changes) -> None:
    c = json.loads((adapter / "adapter_config.json").read_text())
    c.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(c))


@pytest.fixture(scope="module")
def good_adapter(tiny_model, tmp_path_factory):
    return make_adapter(tiny_model, tmp_path_factory.mktemp("good") / "adapter", seed=11)


@pytest.mark.parametrize("breakage,message", [
    ("peft_type", "peft_type 'IA3' is not supported"),
    ("bias", "bias='all': bias training is not supported"),
    ("base", "adapter was made for 'meta-llama/Llama-3.2-1B', not 'qalb-demo/tiny-llama-3'"),
    ("truncated", "truncated"),
    ("shape", "lora_B @ lora_A is 512x256 (rank 8/8) but the base weight is 256x256"),
    ("module", "targets model.layers.7.self_attn.q_proj, which the base model does not have"),
    ("rank", "config says rank 16, the weights have rank 8"),
    ("missing", "adapter_model.safetensors: missing"),
    ("json", "adapter_config.json: not valid JSON"),
])
def test_bad_adapters_are_refused_before_writing(demo_spec, tiny_model, good_adapter, tmp_path, breakage, message):
    adapter = tmp_path / "adapter"
    shutil.copytree(good_adapter, adapter)
    st = adapter / "adapter_model.safetensors"
    if breakage == "peft_type":
        _edit_config(adapter, peft_type="IA3")
    elif breakage == "bias":
        _edit_config(adapter, bias="all")
    elif breakage == "base":
        _edit_config(adapter, base_model_name_or_path="meta-llama/Llama-3.2-1B")
    elif breakage == "truncated":
        st.write_bytes(st.read_bytes()[:-1000])
    elif breakage in ("shape", "module"):
        t = load_file(st)
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        if breakage == "shape":
            t[key] = torch.zeros(512, 8)
        else:
            t[key.replace("layers.0", "layers.7")] = t.pop(key)
            t[key.replace("layers.0", "layers.7").replace("lora_B", "lora_A")] = t.pop(key.replace("lora_B", "lora_A"))
        save_file(t, st)
    elif breakage == "rank":
        _edit_config(adapter, r=16)
    elif breakage == "missing":
        st.unlink()
    elif breakage == "json":
        (adapter / "adapter_config.json").write_text("{not json")
    out = tmp_path / "merge"
    with pytest.raises(MergeError) as err:
        merger.run_merge(demo_spec, tiny_model, [adapter], out, progress=False)
    assert "\n" not in str(err.value) and message in str(err.value)
    assert not out.exists() and not (tmp_path / ".merge.partial").exists()


def test_row_blocks_give_the_same_bytes(demo_spec, tiny_model, tmp_path, monkeypatch):
    """Tensors are processed in blocks of rows; small blocks (many per tensor, uneven sizes) must
    give exactly what one block per tensor gives, for LoRA, DoRA and modules to save."""
    lora = make_adapter(tiny_model, tmp_path / "lora", seed=12, modules_to_save=["embed_tokens", "lm_head"])
    dora = make_adapter(tiny_model, tmp_path / "dora", seed=13, use_dora=True, target_modules=["q_proj", "gate_proj"])
    monkeypatch.setattr(merger, "BLOCK_ELEMENTS", 10**9)
    run(demo_spec, tiny_model, [lora, dora], tmp_path / "whole")
    monkeypatch.setattr(merger, "BLOCK_ELEMENTS", 7 * 256 + 3)
    run(demo_spec, tiny_model, [lora, dora], tmp_path / "blocks")
    for f in sorted((tmp_path / "whole").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "blocks" / f.name).read_bytes()
