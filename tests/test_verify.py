"""The verify stage: every variant loads and generates in its runtime, fidelity gates against
BF16, stop tokens and Urdu purity; the manifest the publishing step requires."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_modelfiles import _scripted_model

from release import chat, forward, merge, scaffold, verify
from release import gguf as G
from release.artifacts import read_manifest, sha256_file
from release.shards import row_blocks
from release.spec import Gate


@pytest.fixture(scope="module")
def built(demo_built):
    """Every variant of the session's demo release (conftest.demo_build) and its verification,
    read only: ``(spec, variant folders, verification manifest, gguf manifest)``."""
    from release import pipeline

    models = pipeline.models(demo_built)
    manifest = read_manifest(pipeline.folder(demo_built, verify.STAGE))
    return demo_built, models, manifest, read_manifest(pipeline.folder(demo_built, G.STAGE))


def check_one(spec, flagship: Path, target: verify.Target) -> dict:
    """``verify.check`` of one target against ``flagship`` as the reference, as the stage runs it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(flagship)
    with verify.reference(flagship, verify.text_chunks(spec, tok), forward.device()) as ref:
        return verify.check(spec, target, ref, tok, forward.device())


def _with_chunks(spec, chunks: int, tokens: int):
    """``spec`` measuring fidelity on ``chunks`` chunks of ``tokens`` tokens (shorter tests)."""
    return dataclasses.replace(spec, evaluation=dataclasses.replace(spec.evaluation, fidelity_chunks=chunks,
                                                                    fidelity_chunk_tokens=tokens))


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_every_variant_and_weight_file_is_recorded(built):
    spec, models, manifest, gguf_manifest = built
    f = manifest.figures
    assert set(f["variants"]) == {"bf16", "fp16", "bnb4", *(f"gguf:{q}" for q in spec.gguf_types())}
    imatrix = gguf_manifest.figures["imatrix"]["file"]  # the gguf stage's, not a weight file
    weights = [p for d in ("merge/bf16", "merge/fp16", "bnb4") for p in (spec.build_dir / d).glob("*.safetensors")]
    weights += [p for p in (spec.build_dir / "gguf").glob("*.gguf") if p.name != imatrix]
    assert set(f["artifacts"]) == {p.relative_to(spec.build_dir).as_posix() for p in weights}
    for rel, a in f["artifacts"].items():
        assert a["sha256"] == sha256_file(spec.build_dir / rel)
        assert a["passed"] == f["variants"][a["variant"] if a["quant"] is None else f"gguf:{a['quant']}"]["passed"]
    ev = spec.evaluation
    positions = ev.fidelity_chunks * ev.fidelity_chunk_tokens
    assert f["fidelity"] == {"text": ev.fidelity_text, "chunks": ev.fidelity_chunks,
                             "chunk_tokens": ev.fidelity_chunk_tokens, "positions": positions}
    assert f["generation"] == {"prompts": ev.generation_prompts, "max_new_tokens": ev.max_new_tokens}
    assert f["device"] == forward.device() and f["threads"] == verify.cpu_threads()
    for key, r in f["variants"].items():
        assert r["loads"] and r["error"] is None
        assert len(r["stops"]) == ev.generation_prompts and 0.0 <= r["urdu_purity"] <= 1.0
        # every forward and every generation reports its speed; every variant saw every position
        assert r["positions"] == positions and r["fidelity_tokens_per_s"] > 0, key
        assert r["generated_tokens"] > 0 and r["generation_tokens_per_s"] > 0, key
    assert f["variants"]["bf16"]["kld_mean"] is None  # the reference itself
    assert (spec.build_dir / "verify" / "verification.json").is_file()
    assert read_manifest(spec.build_dir / "verify").figures == f


def test_pass_or_fail_follows_the_spec_gates(built):
    """The demo's model answers in Urdu and stops (every variant passes those gates, and has no
    conformance problem), so a variant passes exactly when its fidelity is inside its gate;
    ``passed`` overall is the conjunction."""
    spec, _, manifest, _ = built
    rows = manifest.figures["variants"]
    for key, r in rows.items():
        if key == "bf16":
            assert r["passed"]
            continue
        gate = spec.gates[key.split(":")[-1]]
        assert (r["max_kld"], r["min_top1"]) == (gate.max_kld, gate.min_top1)
        assert r["passed"] == (r["kld_mean"] <= gate.max_kld and r["top1"] >= gate.min_top1), key
        assert r["stopped"] and r["purity_passed"] and r["problems"] == [], key
    assert manifest.figures["passed"] == all(r["passed"] for r in rows.values())
    assert [line.split(":")[0] for line in verify.failures(manifest.figures)] == \
        [k.split(":")[0] for k, r in rows.items() if not r["passed"]]


def test_gguf_fidelity(built):
    """F16 holds the BF16 weights exactly; what remains is llama.cpp's arithmetic (f16 activations
    in its F16 matmuls; the KV cache is float32 here) against transformers' float32: on the random
    demo model (logits std ~1.8, a sensitive random network) mean KL <= 1e-3 and >= 97% equal
    top-1 tokens. The largest single-logit difference over all positions and 128,256 logits is
    the worst case of many thousands of f16 roundings: bounded at 4.0 (measured 0.74 and 2.66 on
    two demo-sized models; the mean logit difference is ~0.007). Q8_0 loses more than F16."""
    _, _, manifest, _ = built
    f16, q8 = (manifest.figures["variants"][f"gguf:{q}"] for q in ("F16", "Q8_0"))
    assert f16["kld_mean"] <= 1e-3 and f16["top1"] >= 0.97 and f16["max_abs_dlogit"] <= 4.0
    assert f16["kld_mean"] < q8["kld_mean"]
    # FP16 safetensors are the float32 merge rounded to float16; measured in float32
    assert manifest.figures["variants"]["fp16"]["kld_mean"] < 0.05


def test_stage_is_skipped_when_nothing_changed(built):
    from release import pipeline

    spec, _, manifest, _ = built
    again = verify.run(spec, pipeline.upstream(spec, verify.STAGE), progress=False)
    ran = again.built
    assert not ran and again.fingerprint == manifest.fingerprint


def test_other_weights_fail_the_fidelity_gate(built, demo_spec, tokenizer_cache, tmp_path):
    """A variant that is not the flagship's network (another seed): KLD far above any gate."""
    spec, models, _, _ = built
    other = tmp_path / "other"
    scaffold.write_model(other, dataclasses.replace(demo_spec.base.scaffold, seed=1), demo_spec.chat,
                         tokenizer_cache=tokenizer_cache)
    t = verify.Target("fp16", "fp16", None, "transformers", other, Gate(max_kld=0.5, min_top1=0.5), False)
    row = check_one(_with_chunks(spec, 1, 256), models["bf16"], t)
    assert row["loads"] and not row["fidelity_passed"] and not row["passed"]
    assert row["kld_mean"] > 2.0 and row["top1"] < 0.2
    assert verify.failures({"variants": {"fp16": row}})[0].startswith("fp16: KLD")


def test_a_variant_that_does_not_load_fails_with_the_reason(built, tmp_path):
    spec, models, _, _ = built
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in models["fp16"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[: 1000] if f.suffix == ".safetensors" else f.read_bytes())
    t = verify.Target("fp16", "fp16", None, "transformers", broken, spec.gates["fp16"], False)
    row = check_one(_with_chunks(spec, 1, 64), models["bf16"], t)
    assert not row["loads"] and not row["passed"] and row["error"]
    assert "does not load" in verify.failures({"variants": {"fp16": row}})[0]


def test_a_variant_whose_tokenizer_config_cannot_be_read_fails_with_the_reason(built, tmp_path):
    """Its weights load and generate (verification answers with the flagship's tokenizer), but
    its own tokenizer_config.json is not JSON: the conformance check's failure is the row's
    recorded error, not a traceback out of the stage."""
    spec, models, _, _ = built
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in models["fp16"].iterdir():
        (os.link if f.suffix == ".safetensors" else shutil.copy)(f, broken / f.name)
    (broken / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    t = verify.Target("fp16", "fp16", None, "transformers", broken, spec.gates["fp16"], False)
    row = check_one(_with_chunks(spec, 1, 64), models["bf16"], t)
    assert not row["loads"] and not row["passed"] and row["error"], row
    assert verify.failures({"variants": {"fp16": row}})[0].startswith("fp16: does not load or generate (")


def test_stop_token_gate_in_both_runtimes(built, tiny_model, tmp_path):
    """Scripted models: one ends its turn with <|eot_id|>, one opens a new header instead. With
    enforce_stop_token, transformers (eos ids from the spec) passes the first and fails the second;
    llama.cpp with the Modelfile's stop strings cuts the header and stops."""
    spec, _, _, _ = built
    strict = dataclasses.replace(spec, evaluation=dataclasses.replace(spec.evaluation, enforce_stop_token=True,
                                                                      enforce_urdu_purity=False, min_stopped=None,
                                                                      max_new_tokens=12, fidelity_chunks=1,
                                                                      fidelity_chunk_tokens=64))
    nl2, words, eot, sh, eh, user = 271, [9906, 505, 110389], 128009, 128006, 128007, 882
    n = strict.evaluation.generation_prompts
    rows = {}
    for name, chain in {"ends": [nl2, *words, eot, sh, user, eh, nl2],
                        "header": [nl2, *words, sh, user, eh, nl2]}.items():
        folder = tmp_path / name
        _scripted_model(tiny_model, folder, chain)
        # the release's config, generation_config (eos: <|end_of_text|>, <|eot_id|>) and tokenizer files
        merge.write_model_files(tiny_model, folder, "bfloat16", strict.chat, strict.inference)
        rows[name] = check_one(strict, folder, verify.Target("bf16", "bf16", None, "transformers", folder, None, True))
        G.convert(folder, tmp_path / f"{name}.gguf", strict, "F16", progress=False)
        gguf = verify.Target("gguf:F16", "gguf", "F16", "llama-cpp-python", tmp_path / f"{name}.gguf", Gate(1.0, 0.0),
                             False)
        rows[name + "-gguf"] = check_one(strict, folder, gguf)
    assert rows["ends"]["stops"] == ["eog"] * n and rows["ends"]["passed"]
    assert rows["ends"]["sample"] == "Hello from السلام"
    assert rows["header"]["stops"] == ["length"] * n and not rows["header"]["passed"]
    assert rows["ends-gguf"]["stops"] == ["eog"] * n and rows["ends-gguf"]["passed"]
    assert rows["header-gguf"]["stops"] == ["stop:<|start_header_id|>"] * n and rows["header-gguf"]["passed"]
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


def test_generation_prompts_come_from_the_spec(demo_spec):
    def asking(n: int):
        return dataclasses.replace(demo_spec,
                                   evaluation=dataclasses.replace(demo_spec.evaluation, generation_prompts=n))

    assert verify.prompts(asking(2)) == verify.URDU_PROMPTS[:2]
    with pytest.raises(verify.VerifyError, match="evaluation.generation_prompts: at most 6, got 7"):
        verify.prompts(asking(7))


def test_missing_variant_is_a_one_line_error(built):
    spec, models, _, _ = built
    with pytest.raises(verify.VerifyError, match="variants.bnb4: no built model"):
        verify.targets(spec, {k: v for k, v in models.items() if k != "bnb4"})
    with pytest.raises(verify.VerifyError, match="not found; build the gguf variant"):
        verify.verify(spec, {**models, "gguf": Path("/nonexistent")}, progress=False)


def test_gates_the_spec_does_not_enforce_show_as_info():
    """A figure of an unenforced gate is marked "(info)" beside the pass/FAIL of the enforced
    ones, and a caption says why; with every gate enforced the rows read as before."""
    row = {"runtime": "transformers", "kld_mean": 0.01, "top1": 0.9, "max_kld": 0.05, "urdu_purity": 0.04,
           "stopped": False, "passed": True}
    demo = {"variants": {"bnb4": row}, "enforced": {"urdu_purity": False, "stop_token": False}}
    assert verify.summary_rows(demo)[0][5:] == ("4.0% (info)", "no (info)", "pass")
    assert verify.informational(demo) == ["urdu_purity", "stop_token"]
    assert "evaluation.enforce_stop_token = false" in verify.info_note(demo)
    one = {**demo, "enforced": {"urdu_purity": True, "stop_token": False}}
    assert verify.summary_rows(one)[0][5:] == ("4.0%", "no (info)", "pass")
    assert "enforce_urdu_purity" not in verify.info_note(one)
    enforced = {"variants": {"bnb4": {**row, "passed": False}}, "enforced": {"urdu_purity": True, "stop_token": True}}
    assert verify.summary_rows(enforced)[0][5:] == ("4.0%", "no", "FAIL")
    assert verify.info_note(enforced) is None
    # a KL divergence that rounds to zero (float noise can make it a hair below) reads 0.00000;
    # the count of answers that stopped reads as such
    counted = {"variants": {"fp16": {**row, "kld_mean": -2e-9, "stops": ["eog"] * 5 + ["length"],
                                     "stopped_count": 5}}, "enforced": {"urdu_purity": True, "stop_token": True}}
    assert verify.summary_rows(counted)[0][2] == "0.00000" and verify.summary_rows(counted)[0][6] == "5/6"


# --- fidelity text, the streamed float32 forward, the reference file, the hardware -----------


@pytest.fixture(scope="module")
def short_chunks(built) -> list[list[int]]:
    """Three 128-token chunks of the evaluation text: enough to compare forwards quickly."""
    spec, models, _, _ = built
    return verify.text_chunks(_with_chunks(spec, 3, 128), _tokenizer(models["bf16"]))


def _whole_float32(folder: Path, sequences: list[list[int]]) -> list[torch.Tensor]:
    """The reference as it was computed before streaming: the whole model loaded in float32,
    one sequence per call."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0] for ids in sequences]


def _offset(ids: list[int], part: list[int]) -> int:
    return next(i for i in range(len(ids) - len(part) + 1) if ids[i:i + len(part)] == part)


def test_text_chunks_spread_over_the_whole_text(built, qalb_spec):
    """Each chunk is BOS plus a stretch of the evaluation text; the stretches do not overlap and
    run from the text's first token to its last. The Qalb spec's settings give 4,096 positions
    from the shipped text (Urdu first, some English)."""
    spec, models, _, _ = built
    tok = _tokenizer(models["bf16"])
    ids = tok(spec.resolve(spec.evaluation.fidelity_text).read_text(encoding="utf-8"),
              add_special_tokens=False)["input_ids"]
    chunks = verify.text_chunks(_with_chunks(spec, 5, 100), tok)
    assert [len(c) for c in chunks] == [100] * 5 and {c[0] for c in chunks} == {128000}
    starts = [_offset(ids, c[1:]) for c in chunks]
    assert starts[0] == 0 and starts[-1] == len(ids) - 99
    assert all(b - a >= 99 for a, b in itertools.pairwise(starts))
    real = verify.text_chunks(qalb_spec, tok)
    assert len(real) * len(real[0]) == 4096 == qalb_spec.evaluation.fidelity_chunks * 512
    assert verify.urdu_purity([tok.decode(c[1:]) for c in real]) > 0.6  # Urdu-first by letters
    with pytest.raises(verify.VerifyError, match=r"ur-en.txt: \d+ tokens; evaluation.fidelity_chunks = 100 chunks"):
        verify.text_chunks(_with_chunks(spec, 100, 512), tok)


@pytest.mark.parametrize("variant", ["bf16", "fp16"])
def test_streamed_forward_equals_the_whole_float32_model(built, short_chunks, variant):
    """The layer-at-a-time forward computes what the whole model loaded in float32 computes, bit
    for bit: the same transformers modules and attention implementation, each sequence alone, and
    weights converted exactly (BF16 and FP16 values are float32 values). The demo's output
    projection (128,256 x 256) fits in one default block, so its matmul is the whole model's."""
    _, models, _, _ = built
    whole = _whole_float32(models[variant], short_chunks)
    streamed = dict(forward.logits(forward.Checkpoint(models[variant]), short_chunks, "cpu"))
    assert sorted(streamed) == [0, 1, 2]
    for i, w in enumerate(whole):
        assert torch.equal(streamed[i], w), (variant, i, float((streamed[i] - w).abs().max()))


def test_output_projection_in_row_blocks(built, short_chunks):
    """At 8B the output projection (128,256 x 4,096, 2 GB in float32) is converted a block of rows
    at a time. Each logit is still one dot product over the hidden size; only the matmul's output
    width changes, which the BLAS may answer with another kernel and summation order. Tolerance:
    16 float32 ulps of the largest logit. Measured: identical here (hidden size 256); at 8B shapes
    (hidden 4,096, 8 blocks of 16,384 rows) 4.8e-6 on logits up to 9.5, i.e. 4.2 ulps, while a
    misplaced or missing block would be off by whole units."""
    _, models, _, _ = built
    ck = forward.Checkpoint(models["bf16"])
    budget = 5 << 20  # 5,120 rows of 256 float32 values: 26 blocks
    assert len(row_blocks(128256, 256 * 4, budget)) == 26
    whole = dict(forward.logits(ck, short_chunks, "cpu"))
    blocked = dict(forward.logits(ck, short_chunks, "cpu", head_block_bytes=budget))
    for i, w in whole.items():
        ulps = 16 * torch.finfo(torch.float32).eps * float(w.abs().max())
        torch.testing.assert_close(blocked[i], w, rtol=0, atol=ulps)


def test_streamed_nf4_is_the_dequantized_model_in_float32(built, short_chunks):
    """The 4-bit variant is measured by its weights: each projection is dequantized from its stored
    quantization state with bitsandbytes, exactly as transformers' loaded ``Linear4bit`` holds it,
    and the model then runs in float32; that equals the whole float32 model with those weights,
    bit for bit. (Before, the 4-bit model ran with BF16 activations, which mixed BF16 arithmetic
    into the format's loss.)"""
    import bitsandbytes.functional as F
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    _, models, _, _ = built
    ck = forward.Checkpoint(models["bnb4"])
    loaded = AutoModelForCausalLM.from_pretrained(models["bnb4"], dtype=torch.bfloat16)
    dequantized = {f"{name}.weight": F.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
                   for name, m in loaded.named_modules() if hasattr(getattr(m, "weight", None), "quant_state")}
    assert len(dequantized) == 7 * loaded.config.num_hidden_layers
    for name, w in dequantized.items():
        assert torch.equal(ck.float32(name, "cpu"), w), name
    config = AutoConfig.from_pretrained(models["bnb4"], attn_implementation="sdpa")
    del config.quantization_config
    whole = LlamaForCausalLM(config).eval()
    state = {}
    for f in sorted(models["bnb4"].glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            state |= {k: st.get_tensor(k).float() for k in st.keys()
                      if k in whole.state_dict() and k not in dequantized}
    whole.load_state_dict(state | dequantized, strict=True)
    streamed = dict(forward.logits(ck, short_chunks, "cpu"))
    with torch.no_grad():
        for i, ids in enumerate(short_chunks):
            assert torch.equal(streamed[i], whole(torch.tensor([ids])).logits[0]), i


def test_reference_file_and_chunk_by_chunk_comparison(built, short_chunks, tmp_path, monkeypatch):
    """The reference's logits live in a float32 file [positions, vocab] inside the given folder,
    which is gone after the block. A variant compared with it chunk by chunk, in slices of
    positions, gets the figures of the whole-array computation: top-1 agreement and the largest
    logit difference exactly; the mean KL sums the same float32 terms in another order (relative
    1e-5)."""
    _, models, _, _ = built
    monkeypatch.setattr(verify.Fidelity, "ROWS", 50)  # slices that do not divide a chunk of 128
    with verify.reference(models["bf16"], short_chunks, "cpu", workdir=tmp_path) as ref:
        (file,) = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert file.stat().st_size == 3 * 128 * 128256 * 4
        measured = verify.hf_fidelity(models["bnb4"], ref, "cpu")
    assert not any(tmp_path.iterdir())
    p = torch.cat(_whole_float32(models["bf16"], short_chunks))
    q = torch.cat([x for _, x in forward.logits(forward.Checkpoint(models["bnb4"]), short_chunks, "cpu")])
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    assert measured["positions"] == 384 and measured["fidelity_tokens_per_s"] > 0
    assert measured["kld_mean"] == pytest.approx(kl, rel=1e-5) and kl > 0.1  # a lossy variant: a real test
    assert measured["top1"] == round(float((lp.argmax(-1) == lq.argmax(-1)).float().mean()), 4)
    assert measured["max_abs_dlogit"] == round(float((p - q).abs().max()), 4)


def test_one_device_argument(monkeypatch):
    """Verification computes on the GPU when torch sees one, else on the CPU: one value that the
    streamed forward, the reference and generation all take, with no second code path."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert forward.device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert forward.device() == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_forward_on_the_gpu_matches_the_cpu(built, short_chunks):
    """The same code with device="cuda": float32 on both (TF32 is off for float32 matmuls by
    default), different kernels and accumulation orders, so logits agree within 1e-4 of the
    largest logit, and the NF4 weights dequantize on the GPU to the same values."""
    _, models, _, _ = built
    for variant in ("bf16", "bnb4"):
        ck = forward.Checkpoint(models[variant])
        cpu = dict(forward.logits(ck, short_chunks, "cpu"))
        gpu = dict(forward.logits(ck, short_chunks, "cuda"))
        for i, c in cpu.items():
            assert gpu[i].device.type == "cuda"
            torch.testing.assert_close(gpu[i].cpu(), c, rtol=0, atol=1e-4 * float(c.abs().max()))
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(ck.float32(name, "cuda").cpu(), ck.float32(name, "cpu"))


def test_generation_in_the_stored_dtype(built):
    """Generation loads each transformers variant as its users do, never in float32: BF16 and
    FP16 in their own dtype, NF4 as bitsandbytes 4-bit layers computing in BF16."""
    _, models, _, _ = built
    assert {p.dtype for p in verify.hf_model(models["bf16"], "cpu").parameters()} == {torch.bfloat16}
    assert {p.dtype for p in verify.hf_model(models["fp16"], "cpu").parameters()} == {torch.float16}
    nf4 = verify.hf_model(models["bnb4"], "cpu")
    proj = nf4.model.layers[0].mlp.down_proj
    assert type(proj).__name__ == "Linear4bit" and proj.compute_dtype == torch.bfloat16
    assert nf4.lm_head.weight.dtype == torch.bfloat16


def test_llama_cpp_uses_every_core(built):
    """llama.cpp runs with as many threads as this process may use (not a fixed 2), for single
    tokens and batches, and offloads every layer when its build has a GPU backend."""
    import llama_cpp

    spec, models, _, _ = built
    llm = verify.load_gguf(models["gguf"] / spec.gguf_file_name("F16"))
    try:
        cores = len(os.sched_getaffinity(0))
        assert llm.context_params.n_threads == llm.context_params.n_threads_batch == cores == verify.cpu_threads()
        assert llm.model_params.n_gpu_layers == (-1 if llama_cpp.llama_supports_gpu_offload() else 0)
    finally:
        llm.close()


def test_transformers_generation_is_plain_greedy_as_in_llama_cpp(built, tmp_path):
    """Both runtimes decode greedily with no repetition penalty (llama.cpp is called with
    repeat_penalty=1.0), so their answers are compared alike, whatever sampling settings the
    variant's generation_config.json holds for its users: here repetition_penalty 100, which
    divides the positive logits of the prompt's tokens by 100 and so changes the model's greedy
    answer, which repeats the prompt's words (checked, so the test can fail)."""
    spec, models, _, _ = built
    folder = tmp_path / "bf16"
    shutil.copytree(models["bf16"], folder)
    config = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    (folder / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 100.0}),
                                                   encoding="utf-8")
    ev = dataclasses.replace(spec.evaluation, generation_prompts=1, max_new_tokens=8)
    short = dataclasses.replace(spec, evaluation=ev)
    tok = _tokenizer(folder)
    [got], _ = verify.hf_generations(folder, tok, short, "cpu")

    model = verify.hf_model(folder, "cpu")
    ids = torch.tensor([verify._chat_ids(tok, short, verify.prompts(short)[0])])
    eos = chat.eos_token_ids(spec.chat)
    with torch.no_grad():
        plain, penalized = (model.generate(ids, do_sample=False, max_new_tokens=ev.max_new_tokens, eos_token_id=eos,
                                           **extra)[0, ids.shape[1]:].tolist()
                            for extra in ({"repetition_penalty": 1.0}, {}))  # {}: the file's penalty applies
    assert got.tokens == plain
    assert penalized != plain


# --- what the runtimes read besides the weights (release/conformance.py) -----------------------

NO_SYSTEM = ("{{- bos_token }}{%- for m in messages %}"
             "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
             "+ m['content'] + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
             "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


def _replace(path: Path, text: str) -> None:
    """Write ``path`` anew (never through a hard link into the shared demo build)."""
    path.unlink()
    path.write_text(text, encoding="utf-8")


def _new_metadata(src: Path, dest: Path, *args: str) -> None:
    """A copy of a GGUF file with metadata changed by gguf-py's own gguf_new_metadata."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--force", *args, str(src),
                           str(dest)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_what_the_runtimes_read_is_checked_against_the_spec(built, tmp_path):
    """The demo's files conform; each broken copy gives one phrase naming the file: an eos list
    without <|eot_id|>, a chat template without the system prompt or without the end of turn, a
    Modelfile without the stop, a file of another quant type in a slot."""
    from transformers import AutoTokenizer

    from release import conformance, modelfiles, pipeline

    spec, models, _, _ = built
    fp16 = tmp_path / "fp16"
    fp16.mkdir()
    for f in models["fp16"].iterdir():
        (os.link if f.suffix == ".safetensors" else shutil.copy)(f, fp16 / f.name)
    assert conformance.hf_problems(spec, fp16, AutoTokenizer.from_pretrained(fp16)) == []
    config = json.loads((fp16 / "generation_config.json").read_text(encoding="utf-8"))
    _replace(fp16 / "generation_config.json", json.dumps({**config, "eos_token_id": [128001]}))
    tok_config = json.loads((fp16 / "tokenizer_config.json").read_text(encoding="utf-8"))
    _replace(fp16 / "tokenizer_config.json", json.dumps({**tok_config, "chat_template": NO_SYSTEM}))
    assert conformance.hf_problems(spec, fp16, AutoTokenizer.from_pretrained(fp16)) == [
        f"{fp16}/generation_config.json: eos_token_id [128001] lacks <|eot_id|> (128009)",
        f"{fp16}/tokenizer_config.json chat_template: renders without the system prompt"]

    tok = AutoTokenizer.from_pretrained(models["bf16"])
    q4 = models["gguf"] / spec.gguf_file_name("Q4_K_M")
    shipped = pipeline.folder(spec, "modelfiles") / modelfiles.modelfile_name(spec, "Q4_K_M")
    assert conformance.gguf_problems(spec, q4, "Q4_K_M", tok, shipped) == []
    mf = tmp_path / shipped.name
    mf.write_text(shipped.read_text(encoding="utf-8").replace('PARAMETER stop "<|eot_id|>"\n', ""), encoding="utf-8")
    assert conformance.modelfile_problems(spec, mf, q4.name) == [f"{mf}: no PARAMETER stop for <|eot_id|>"]
    no_eot = chat.jinja_template(spec.chat).replace("<|eot_id|>", "")
    changed = tmp_path / q4.name
    _new_metadata(q4, changed, "--chat-template", no_eot)
    assert conformance.gguf_problems(spec, changed, "Q4_K_M", tok, None) == [
        f"{changed} tokenizer.chat_template: does not end each turn with <|eot_id|>"]
    q8 = models["gguf"] / spec.gguf_file_name("Q8_0")
    assert conformance.gguf_problems(spec, q8, "Q4_K_M", tok, None) == [
        f"{q8}: general.file_type is Q8_0, not Q4_K_M"]


def test_a_broken_release_is_refused_one_line_each_and_nothing_goes_on(demo_build, tmp_path):
    """The demo release with five faults, each in another file, verified again: the stage fails,
    each fault has its line, and the cards and the Hub plan are not made again.
    - Q4_K_M's slot holds a Q2_K quantization of the F16 file (llama.cpp's llama-quantize): far
      from BF16 (the fidelity gate) and of another type (general.file_type);
    - Q8_0's embedded template lacks <|eot_id|> (gguf-py's gguf_new_metadata);
    - Q6_K's Modelfile lacks PARAMETER stop "<|eot_id|>";
    - FP16's generation_config.json lists <|end_of_text|> alone: transformers then writes past
      the end of every answer (the stop gate fails on behaviour, not only on the file);
    - NF4's chat template renders without the system prompt."""
    import subprocess

    from conftest import linked_copy, release_cmd
    from release import llamatools, modelfiles, pipeline
    from release import spec as spec_mod

    path, done, _ = demo_build
    assert done.returncode == 0, done.stderr[-3000:]
    s = spec_mod.load(linked_copy(path, tmp_path / "copy"))
    gguf_dir = pipeline.folder(s, "gguf")
    q4 = gguf_dir / s.gguf_file_name("Q4_K_M")
    q4.unlink()
    quantized = subprocess.run([str(llamatools.tool("llama-quantize")), str(gguf_dir / s.gguf_file_name("F16")),
                                str(q4), "Q2_K"], capture_output=True, text=True)
    assert quantized.returncode == 0, quantized.stderr[-2000:]
    q8 = gguf_dir / s.gguf_file_name("Q8_0")
    _new_metadata(q8, tmp_path / "q8.gguf", "--chat-template", chat.jinja_template(s.chat).replace("<|eot_id|>", ""))
    q8.unlink()
    (tmp_path / "q8.gguf").rename(q8)
    mf = pipeline.folder(s, "modelfiles") / modelfiles.modelfile_name(s, "Q6_K")
    _replace(mf, mf.read_text(encoding="utf-8").replace('PARAMETER stop "<|eot_id|>"\n', ""))
    fp16 = pipeline.variant_dir(s, "fp16") / "generation_config.json"
    _replace(fp16, json.dumps({**json.loads(fp16.read_text(encoding="utf-8")), "eos_token_id": [128001]}))
    nf4 = pipeline.variant_dir(s, "bnb4") / "tokenizer_config.json"
    _replace(nf4, json.dumps({**json.loads(nf4.read_text(encoding="utf-8")), "chat_template": NO_SYSTEM}))
    later = {p: p.read_bytes() for p in (pipeline.folder(s, "cards") / "manifest.json",
                                         pipeline.folder(s, "publish") / "plan.json")}

    run = subprocess.run([*release_cmd(s.path), "--from", "verify", "--force"], cwd=s.path.parent,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 2, run.stderr[-3000:]
    lines = [line.removeprefix("error: ") for line in run.stderr.strip().splitlines()]
    by_key = {line.split(": ", 1)[0]: line for line in lines}
    assert lines[0].startswith("verify: release gates failed"), lines
    assert set(by_key) >= {"gguf:Q4_K_M", "gguf:Q8_0", "gguf:Q6_K", "fp16", "bnb4"}, lines
    assert by_key["gguf:Q4_K_M"].startswith("gguf:Q4_K_M: KLD ")
    assert by_key["gguf:Q4_K_M"].endswith(f"{q4}: general.file_type is Q2_K, not Q4_K_M")
    assert by_key["gguf:Q8_0"].endswith(f"{q8} tokenizer.chat_template: does not end each turn with <|eot_id|>")
    assert by_key["gguf:Q6_K"].endswith(f"{mf}: no PARAMETER stop for <|eot_id|>")
    assert "fp16: stopped at a stop token in 0 of 6 answers" in by_key["fp16"]
    assert by_key["fp16"].endswith("eos_token_id [128001] lacks <|eot_id|> (128009)")
    assert by_key["bnb4"].endswith("tokenizer_config.json chat_template: renders without the system prompt")
    for key in ("bf16", "gguf:F16", "gguf:Q5_K_M", "gguf:IQ4_XS", "gguf:Q3_K_M"):
        assert key not in by_key  # the files left as built still pass
    assert {p: p.read_bytes() for p in later} == later  # the cards and the Hub plan were not made again
