"""The verify stage: every variant loads and generates in its runtime, fidelity gates against
BF16, stop tokens and Urdu purity; the manifest the publishing step requires."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from conftest import write_spec
from release import gguf as G
from release import merge as merger
from release import quant4, scaffold, verify
from release.artifacts import read_manifest, sha256_file
from release.spec import Gate, load
from test_merge import make_adapter
from test_modelfile import _scripted_model


def small_spec_text() -> str:
    """The demo spec with one llama.cpp quant type (Q8_0), to keep the test short."""
    from conftest import SPECS

    text = (SPECS / "demo.toml").read_text(encoding="utf-8")
    text = text.replace('quant_types = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"]', 'quant_types = ["Q8_0"]')
    for q in ("Q6_K", "Q5_K_M", "Q4_K_M"):
        text = "\n".join(line for line in text.splitlines() if not line.startswith(f"{q} = "))
    return text.replace('default_tag = "tiny-instruct-q4_K_M"', 'default_tag = "tiny-instruct-q8_0"') + "\n"


@pytest.fixture(scope="module")
def built(tiny_model, tmp_path_factory):
    """Every variant of a small release, built by the real stages' functions."""
    root = tmp_path_factory.mktemp("verify")
    spec = load(write_spec(root / "specs", small_spec_text()))
    b = spec.build_dir
    adapter = make_adapter(tiny_model, root / "adapter", seed=5)
    merger.merge(tiny_model, [adapter], b / "merge" / "bf16", out_fp16=b / "merge" / "fp16", chat_spec=spec.chat,
                 inference=spec.inference, progress=False)
    _, v = quant4.variant(spec)
    quant4.quantize_model(b / "merge" / "bf16", b / "bnb4", v, None, progress=False)
    quant4.write_model_files(b / "merge" / "bf16", b / "bnb4", v)
    gguf_figures = G.build(spec, b / "merge" / "bf16", b / "gguf", progress=False)
    models = {"bf16": b / "merge" / "bf16", "fp16": b / "merge" / "fp16", "bnb4": b / "bnb4", "gguf": b / "gguf"}
    manifest = verify.run_on(spec, models, progress=False)
    ran = manifest.built
    return spec, models, manifest, gguf_figures


def test_every_variant_and_weight_file_is_recorded(built):
    spec, models, manifest, _ = built
    f = manifest.figures
    assert set(f["variants"]) == {"bf16", "fp16", "bnb4", "gguf:F16", "gguf:Q8_0"}
    weights = [p for d in ("merge/bf16", "merge/fp16", "bnb4") for p in (spec.build_dir / d).glob("*.safetensors")]
    weights += list((spec.build_dir / "gguf").glob("*.gguf"))
    assert set(f["artifacts"]) == {p.relative_to(spec.build_dir).as_posix() for p in weights}
    for rel, a in f["artifacts"].items():
        assert a["sha256"] == sha256_file(spec.build_dir / rel)
        assert a["passed"] == f["variants"][a["variant"] if a["quant"] is None else f"gguf:{a['quant']}"]["passed"]
    for key, r in f["variants"].items():
        assert r["loads"] and r["error"] is None
        assert len(r["stops"]) == len(verify.URDU_PROMPTS) and 0.0 <= r["urdu_purity"] <= 1.0
    assert f["variants"]["bf16"]["kld_mean"] is None  # the reference itself
    assert (spec.build_dir / "verify" / "verification.json").is_file()
    assert read_manifest(spec.build_dir / "verify").figures == f


def test_pass_or_fail_follows_the_spec_gates(built):
    """The demo spec enforces neither stops nor purity (random weights), so a variant passes
    exactly when its fidelity is inside its gate; ``passed`` overall is the conjunction."""
    spec, _, manifest, _ = built
    rows = manifest.figures["variants"]
    for key, r in rows.items():
        if key == "bf16":
            assert r["passed"]
            continue
        gate = spec.gates[key.split(":")[-1]]
        assert (r["max_kld"], r["min_top1"]) == (gate.max_kld, gate.min_top1)
        assert r["passed"] == (r["kld_mean"] <= gate.max_kld and r["top1"] >= gate.min_top1), key
    assert manifest.figures["passed"] == all(r["passed"] for r in rows.values())
    assert [line.split(":")[0] for line in verify.failures(manifest.figures)] == \
        [k.split(":")[0] for k, r in rows.items() if not r["passed"]]


def test_gguf_fidelity(built):
    """F16 holds the BF16 weights exactly; what remains is llama.cpp's arithmetic (f16 activations
    in its F16 matmuls; the KV cache is float32 here) against transformers' float32: on the random
    demo model (logits std ~1.8, a sensitive random network) mean KL <= 1e-3, >= 97% equal top-1
    tokens, and no logit more than 2.0 away (measured: 0.0003, 98.8%, 0.74; the mean logit
    difference is ~0.007). Q8_0 loses more than F16."""
    _, _, manifest, _ = built
    f16, q8 = (manifest.figures["variants"][f"gguf:{q}"] for q in ("F16", "Q8_0"))
    assert f16["kld_mean"] <= 1e-3 and f16["top1"] >= 0.97 and f16["max_abs_dlogit"] <= 2.0
    assert f16["kld_mean"] < q8["kld_mean"]
    # FP16 safetensors are the float32 merge rounded to float16; measured in float32
    assert manifest.figures["variants"]["fp16"]["kld_mean"] < 0.05


def test_stage_is_skipped_when_nothing_changed(built):
    spec, models, manifest, _ = built
    again = verify.run_on(spec, models, progress=False)
    ran = again.built
    assert not ran and again.fingerprint == manifest.fingerprint


def test_other_weights_fail_the_fidelity_gate(built, demo_spec, tokenizer_cache, tmp_path):
    """A variant that is not the flagship's network (another seed): KLD far above any gate."""
    spec, models, _, _ = built
    other = tmp_path / "other"
    scaffold.write_model(other, dataclasses.replace(demo_spec.base.scaffold, seed=1), demo_spec.chat,
                         tokenizer_cache=tokenizer_cache)
    ref = verify.hf_logits(models["bf16"], spec)
    from transformers import AutoTokenizer

    t = verify.Target("fp16", "fp16", None, "transformers", other, Gate(max_kld=0.5, min_top1=0.5), False)
    row = verify.check(spec, t, ref, AutoTokenizer.from_pretrained(models["bf16"]))
    assert row["loads"] and not row["fidelity_passed"] and not row["passed"]
    assert row["kld_mean"] > 2.0 and row["top1"] < 0.2
    assert verify.failures({"variants": {"fp16": row}})[0].startswith("fp16: KLD")


def test_a_variant_that_does_not_load_fails_with_the_reason(built, tmp_path):
    spec, models, _, _ = built
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in models["fp16"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[: 1000] if f.suffix == ".safetensors" else f.read_bytes())
    ref = verify.hf_logits(models["bf16"], spec)
    from transformers import AutoTokenizer

    t = verify.Target("fp16", "fp16", None, "transformers", broken, spec.gates["fp16"], False)
    row = verify.check(spec, t, ref, AutoTokenizer.from_pretrained(models["bf16"]))
    assert not row["loads"] and not row["passed"] and row["error"]
    assert "does not load" in verify.failures({"variants": {"fp16": row}})[0]


def test_stop_token_gate_in_both_runtimes(built, tiny_model, tmp_path):
    """Scripted models: one ends its turn with <|eot_id|>, one opens a new header instead. With
    enforce_stop_token, transformers (eos ids from the spec) passes the first and fails the second;
    llama.cpp with the Modelfile's stop strings cuts the header and stops."""
    spec, _, _, _ = built
    strict = dataclasses.replace(spec, evaluation=dataclasses.replace(spec.evaluation, enforce_stop_token=True,
                                                                      max_new_tokens=12))
    nl2, words, eot, sh, eh, user = 271, [9906, 505, 110389], 128009, 128006, 128007, 882
    from transformers import AutoTokenizer

    rows = {}
    for name, chain in {"ends": [nl2, *words, eot, sh, user, eh, nl2], "header": [nl2, *words, sh, user, eh, nl2]}.items():
        folder = tmp_path / name
        _scripted_model(tiny_model, folder, chain)
        ref = verify.hf_logits(folder, strict)
        tok = AutoTokenizer.from_pretrained(folder)
        rows[name] = verify.check(strict, verify.Target("bf16", "bf16", None, "transformers", folder, None, True), ref, tok)
        G.convert(folder, tmp_path / f"{name}.gguf", strict, "F16", progress=False)
        rows[name + "-gguf"] = verify.check(strict, verify.Target("gguf:F16", "gguf", "F16", "llama-cpp-python",
                                                                  tmp_path / f"{name}.gguf", Gate(1.0, 0.0), False), ref, tok)
    assert rows["ends"]["stops"] == ["eog"] * 4 and rows["ends"]["passed"]
    assert rows["ends"]["sample"] == "Hello from السلام"
    assert rows["header"]["stops"] == ["length"] * 4 and not rows["header"]["passed"]
    assert rows["ends-gguf"]["stops"] == ["eog"] * 4 and rows["ends-gguf"]["passed"]
    assert rows["header-gguf"]["stops"] == ["stop:<|start_header_id|>"] * 4 and rows["header-gguf"]["passed"]
    # "Hello from السلام": 6 Urdu-script letters of 15
    assert rows["ends"]["urdu_purity"] == pytest.approx(6 / 15, abs=1e-4)


@pytest.mark.parametrize("texts,expected", [
    (["پاکستان کا دارالحکومت اسلام آباد ہے۔"], 1.0),
    (["Hello"], 0.0),
    (["abc", "ابج"], 0.5),
    (["123 !!", ""], 0.0),
    (["ﻻ ﷲ"], 1.0),  # presentation forms count as Arabic script
])
def test_urdu_purity(texts, expected):
    assert verify.urdu_purity(texts) == pytest.approx(expected)


def test_missing_variant_is_a_one_line_error(built):
    spec, models, _, _ = built
    with pytest.raises(verify.VerifyError, match="variants.bnb4: no built model"):
        verify.targets(spec, {k: v for k, v in models.items() if k != "bnb4"})
    with pytest.raises(verify.VerifyError, match="not found; build the gguf variant"):
        verify.verify(spec, {**models, "gguf": Path("/nonexistent")}, progress=False)
