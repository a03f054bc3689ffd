"""The GGUF converter against llama.cpp's own converter (tensor bytes and metadata), llama.cpp's
quantizer, fidelity against transformers, and refusals that leave no partial file."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from release import gguf as G
from release import merge as merger
from release import scaffold

import llamacpp
from test_merge import make_adapter


def _read(path: Path) -> tuple[dict, dict]:
    """Metadata (key -> its value type(s) and encoded bytes) and tensors (name -> type, shape,
    bytes) of a GGUF file, read with gguf's own reader."""
    r = GGUFReader(path)
    fields = {k: (tuple(f.types), b"".join(np.asarray(f.parts[i]).tobytes() for i in f.data))
              for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, [int(x) for x in t.shape], np.asarray(t.data).view(np.uint8).tobytes())
               for t in r.tensors}
    return fields, tensors


def _fields(path: Path) -> dict:
    return {k: f.contents() for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def reference(model_dir: Path, out: Path, spec, outtype: str, tmp: Path) -> Path:
    """llama.cpp's converter on the same folder, given the same general.* metadata. The override
    file cannot set general.license (llama.cpp takes it from the model card), so the copy it
    converts gets a model card holding just the license."""
    copy = tmp / f"ref-src-{outtype}"
    shutil.copytree(model_dir, copy)
    (copy / "README.md").write_text(f"---\nlicense: {spec.release.license}\n---\n")
    meta = tmp / "metadata.json"
    meta.write_text(json.dumps(G.general_metadata(spec)))
    llamacpp.convert(copy, out, "--outtype", outtype.lower(), "--metadata", str(meta))
    return out


@pytest.fixture(scope="module")
def merged(demo_spec, tiny_model, tmp_path_factory) -> Path:
    """A merge output (the GGUF stage's real input): chat template, generation config, eos ids."""
    root = tmp_path_factory.mktemp("merged")
    adapter = make_adapter(tiny_model, root / "adapter", seed=21, modules_to_save=["lm_head"])
    merger.merge(tiny_model, [adapter], root / "bf16", chat_spec=demo_spec.chat, inference=demo_spec.inference,
                 progress=False)
    return root / "bf16"


@pytest.fixture(scope="module")
def llama31_shaped(demo_spec, tokenizer_cache, tmp_path_factory) -> Path:
    """Llama 3.1's attention layout at small width: head_dim 128, 4 query heads per KV head,
    llama3 rope scaling, tied embeddings (as the 1B/3B models)."""
    out = tmp_path_factory.mktemp("llama31")
    sc = replace(demo_spec.base.scaffold, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, seed=5)
    scaffold.write_model(out, sc, demo_spec.chat, tokenizer_cache=tokenizer_cache)
    return out


@pytest.mark.parametrize("model,outtype", [("merged", "F16"), ("merged", "BF16"), ("merged", "Q8_0"),
                                           ("llama31_shaped", "F16")])
def test_byte_parity_with_llama_cpp_converter(request, demo_spec, tmp_path, outtype, model):
    src = request.getfixturevalue(model)
    ours = tmp_path / "ours.gguf"
    G.convert(src, ours, demo_spec, outtype, progress=False)
    ref = reference(src, tmp_path / "ref.gguf", demo_spec, outtype, tmp_path)
    (a, ta), (b, tb) = _read(ours), _read(ref)
    # Intended difference: a base model without a chat template gets the release's template.
    if model == "llama31_shaped":
        assert "tokenizer.chat_template" not in b
        b["tokenizer.chat_template"] = a["tokenizer.chat_template"]
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key  # same value type, same encoded value
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name] == tb[name], name
    assert ("output.weight" in ta) is (model == "merged")  # tied embeddings write no output tensor
    assert "rope_freqs.weight" in ta


def test_metadata_from_the_spec(demo_spec, merged, tmp_path):
    out = tmp_path / demo_spec.gguf_file_name("F16")
    G.convert(merged, out, demo_spec, "F16", progress=False)
    f = _fields(out)
    assert f["general.name"] == "Qalb-Demo-1.0-Tiny-Instruct" and f["general.finetune"] == "Instruct"
    assert f["general.languages"] == ["ur", "en"] and f["general.license"] == "llama3.1"
    assert f["general.base_model.0.name"] == "tiny-llama-3" and f["general.base_model.0.organization"] == "qalb-demo"
    assert f["tokenizer.ggml.pre"] == "llama-bpe" and f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.ggml.bos_token_id"] == 128000 and f["tokenizer.ggml.eos_token_id"] == 128001
    assert f["tokenizer.ggml.add_bos_token"] is True
    from release import chat
    assert f["tokenizer.chat_template"] == chat.jinja_template(demo_spec.chat)
    assert abs(f["general.sampling.temp"] - 0.1) < 1e-6 and abs(f["general.sampling.top_p"] - 0.9) < 1e-6
    assert out.name == "Qalb-Demo-1.0-Tiny-Instruct-F16.gguf"


def test_stage_writes_every_type_with_sizes(demo_spec, merged, tmp_path):
    spec = replace(demo_spec, build=replace(demo_spec.build, dir=str(tmp_path)))
    manifest = G.run_from(spec, merged, progress=False)
    files = manifest.figures["files"]
    assert list(files) == ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"]
    d = {q: G.describe(tmp_path / "Qalb-Demo-1.0-Tiny-Instruct" / "gguf" / f["file"]) for q, f in files.items()}
    reader = GGUFReader(tmp_path / "Qalb-Demo-1.0-Tiny-Instruct" / "gguf" / files["Q4_K_M"]["file"])
    assert d["Q4_K_M"]["tensor_types"] == {t: sum(x.tensor_type.name == t for x in reader.tensors)
                                           for t in {x.tensor_type.name for x in reader.tensors}}
    assert d["Q4_K_M"]["tensor_types"].keys() >= {"Q4_K", "Q6_K"}  # llama.cpp's Q4_K_M mix
    assert d["Q6_K"]["tensor_types"].get("Q6_K", 0) >= 14
    bpw = [files[q]["bits_per_weight"] for q in files]
    assert bpw == sorted(bpw, reverse=True) and bpw[0] == 16.0
    assert all(len(f["sha256"]) == 64 for f in files.values())
    # fidelity is the verify stage's to measure (tests/test_verify.py), not this stage's
    assert not any("kld_mean" in f or "top1" in f for f in files.values())


def test_truncated_shard_gives_one_line_error_and_no_file(demo_spec, merged, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(merged, broken)
    shard = broken / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4096])
    spec = replace(demo_spec, build=replace(demo_spec.build, dir=str(tmp_path / "out")))
    with pytest.raises(G.GGUFError) as err:
        G.run_from(spec, broken, progress=False)
    assert "\n" not in str(err.value) and "truncated" in str(err.value)
    assert not any((tmp_path / "out").rglob("*.gguf"))


def test_unsupported_architecture(demo_spec, merged, tmp_path):
    other = tmp_path / "mistral"
    shutil.copytree(merged, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["Qwen2ForCausalLM"], "qwen2"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(G.GGUFError, match="architecture 'Qwen2ForCausalLM' is not supported"):
        G.convert(other, tmp_path / "x.gguf", demo_spec, "F16", progress=False)


def test_k_quants_that_would_fall_back_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 320, "intermediate_size": 768}))
    with pytest.raises(G.GGUFError, match="hidden_size 320 is not a multiple of 256"):
        G.check_quantizable(tmp_path, ["F16", "Q4_K_M"])
    G.check_quantizable(tmp_path, ["F16", "Q8_0"])  # not a k-quant: fine


@pytest.mark.slow
def test_byte_parity_on_8b_shapes(demo_spec, tokenizer_cache, tmp_path):
    """Llama 3.1 8B's real shapes (one layer): about 2.5 GB and two conversions."""
    src = tmp_path / "8b"
    scaffold.write_model(src, scaffold.eight_b_shaped(1), demo_spec.chat, tokenizer_cache=tokenizer_cache)
    ours = tmp_path / "ours.gguf"
    G.convert(src, ours, demo_spec, "F16", progress=False)
    ref = reference(src, tmp_path / "ref.gguf", demo_spec, "F16", tmp_path)
    (_, ta), (_, tb) = _read(ours), _read(ref)
    assert ta.keys() == tb.keys() and all(ta[n] == tb[n] for n in ta)
