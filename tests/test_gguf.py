"""The GGUF converter against llama.cpp's own converter (tensor bytes and metadata), llama.cpp's
quantizer, fidelity against transformers, and refusals that leave no partial file."""

from __future__ import annotations

import filecmp
import functools
import json
import mmap
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import llamacpp
import numpy as np
import pytest
from gguf import GGUFReader
from test_merge import make_adapter

from release import gguf as G
from release import merge as merger
from release import scaffold


@functools.lru_cache(maxsize=8)
def _reader(path: Path) -> GGUFReader:
    """gguf's reader of ``path``, once per file: parsing the metadata of a file with Llama 3's
    128,256-token vocabulary takes seconds, and the files under test are written once."""
    return GGUFReader(path)


def _read(path: Path) -> tuple[dict, dict]:
    """Metadata (key -> its value type(s) and encoded bytes) and tensors (name -> type, shape,
    bytes) of a GGUF file, read with gguf's own reader."""
    r = GGUFReader(path)
    fields = {k: (tuple(f.types), b"".join(np.asarray(f.parts[i]).tobytes() for i in f.data))
              for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, [int(x) for x in t.shape], np.asarray(t.data).view(np.uint8).tobytes())
               for t in r.tensors}
    return fields, tensors


def _encoded(text: str) -> bytes:
    """A GGUF string as the file stores it: its byte length (uint64), then its UTF-8 bytes."""
    return struct.pack("<Q", len(text.encode())) + text.encode()


def _holds(path: Path, *records: bytes) -> list[bool]:
    """Whether each exactly encoded record occurs in the file: a key with its value, or a tensor's
    name with its dimension count. A byte search, where gguf's reader spends seconds parsing a
    128,256-token vocabulary."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return [data.find(r) >= 0 for r in records]


STRING = struct.pack("<I", 8)  # GGUF_TYPE_STRING


def _fields(path: Path) -> dict:
    return {k: f.contents() for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def reference(model_dir: Path, out: Path, spec, outtype: str, tmp: Path):
    """Start llama.cpp's converter on the same folder, given the same general.* metadata (finish
    it with ``llamacpp.finish``). The override file cannot set general.license (llama.cpp takes it
    from the model card), so the copy it converts gets a model card holding just the license."""
    copy = tmp / f"ref-src-{outtype}"
    shutil.copytree(model_dir, copy)
    (copy / "README.md").write_text(f"---\nlicense: {spec.release.license}\n---\n")
    meta = tmp / "metadata.json"
    meta.write_text(json.dumps(G.general_metadata(spec)))
    return llamacpp.start(copy, out, "--outtype", outtype.lower(), "--metadata", str(meta))


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


PARITY = [("merged", "F16"), ("merged", "BF16"), ("merged", "Q8_0"), ("llama31_shaped", "F16")]


@pytest.fixture(scope="module")
def references(request, demo_spec, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """llama.cpp's converter's file of each ``PARITY`` case, the four conversions run at once."""
    started = {}
    for model, outtype in PARITY:
        tmp = tmp_path_factory.mktemp(f"ref-{model}-{outtype}")
        started[model, outtype] = (tmp / "ref.gguf", reference(request.getfixturevalue(model), tmp / "ref.gguf",
                                                                demo_spec, outtype, tmp))
    for _, proc in started.values():
        llamacpp.finish(proc)
    return {case: path for case, (path, _) in started.items()}


@pytest.mark.parametrize("model,outtype", PARITY)
def test_byte_parity_with_llama_cpp_converter(request, demo_spec, references, tmp_path, outtype, model):
    """Our converter against llama.cpp's: the same file bytes (the base model without a chat
    template: the same keys and tensors, plus the release's template); on the scaffold (the real
    Llama 3 tokenizer) llama.cpp's own tokenizer check recognises llama-bpe."""
    src = request.getfixturevalue(model)
    ours = tmp_path / "ours.gguf"
    G.convert(src, ours, demo_spec, outtype, progress=False)
    ref = references[model, outtype]
    # The merged model's file is llama.cpp's converter's, byte for byte. Key by key and tensor by
    # tensor where the bytes differ: the base model without a chat template (the release's is
    # added: intended), or a fault, which the comparison names.
    same = filecmp.cmp(ours, ref, shallow=False)
    if model == "llama31_shaped" or not same:
        (a, ta), (b, tb) = _read(ours), _read(ref)
        if model == "llama31_shaped":
            assert "tokenizer.chat_template" not in b
            b["tokenizer.chat_template"] = a["tokenizer.chat_template"]
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == b[key], key  # same value type, same encoded value
        assert ta.keys() == tb.keys()
        for name in ta:
            assert ta[name] == tb[name], name
    pre, vocab, output, rope = _holds(ref, _encoded("tokenizer.ggml.pre") + STRING + _encoded("llama-bpe"),
                                      _encoded("tokenizer.ggml.model") + STRING + _encoded("gpt2"),
                                      _encoded("output.weight") + struct.pack("<I", 2),
                                      _encoded("rope_freqs.weight") + struct.pack("<I", 1))
    assert same or model == "llama31_shaped", "same keys, values and tensors, laid out otherwise than llama.cpp's"
    assert pre and vocab  # llama.cpp's tokenizer check recognised Llama 3's
    assert output is (model == "merged")  # tied embeddings write no output tensor
    assert rope


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


@pytest.fixture(scope="module")
def stage(demo_built):
    """The gguf stage of the session's demo release (conftest.demo_build), read only: its
    manifest and folder."""
    from release import pipeline
    from release.artifacts import read_manifest

    folder = pipeline.folder(demo_built, G.STAGE)
    return read_manifest(folder), folder


def test_stage_writes_every_type_with_sizes(stage):
    manifest, folder = stage
    files = manifest.figures["files"]
    order = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M"]  # the demo spec's
    assert sorted(files) == sorted(order)  # (the manifest's JSON keeps its keys sorted)
    d = {q: G.describe(folder / f["file"]) for q, f in files.items()}
    reader = GGUFReader(folder / files["Q4_K_M"]["file"])
    assert d["Q4_K_M"]["tensor_types"] == {t: sum(x.tensor_type.name == t for x in reader.tensors)
                                           for t in {x.tensor_type.name for x in reader.tensors}}
    assert d["Q4_K_M"]["tensor_types"].keys() >= {"Q4_K", "Q6_K"}  # llama.cpp's Q4_K_M mix
    assert d["Q6_K"]["tensor_types"].get("Q6_K", 0) >= 14
    # IQ4_XS: every 2-D weight but the output tensor (Q6_K); Q3_K_M: Q3_K with Q4_K/Q5_K where
    # llama.cpp spends more bits (attention values, feed-forward down), Q6_K output
    assert d["IQ4_XS"]["tensor_types"] == {"IQ4_XS": 15, "Q6_K": 1, "F32": 6}
    assert d["Q3_K_M"]["tensor_types"].keys() == {"Q3_K", "Q4_K", "Q5_K", "Q6_K", "F32"}
    assert d["Q3_K_M"]["tensor_types"]["Q3_K"] >= 9
    bpw = [files[q]["bits_per_weight"] for q in order]
    assert bpw == sorted(bpw, reverse=True) and bpw[0] == 16.0
    assert all(len(f["sha256"]) == 64 for f in files.values())
    # fidelity is the verify stage's to measure (tests/test_verify.py), not this stage's
    assert not any("kld_mean" in f or "top1" in f for f in files.values())


def test_stage_computes_the_importance_matrix_and_uses_it_for_k_and_iq_quants(stage, demo_spec):
    manifest, folder = stage
    im, files = manifest.figures["imatrix"], manifest.figures["files"]
    assert im["file"] == "Qalb-Demo-1.0-Tiny-Instruct-imatrix.gguf" and (folder / im["file"]).is_file()
    assert im["file"] in {e.path for e in manifest.outputs}  # an artifact of the stage, with its sha256
    assert (im["calibration"], im["chunk_tokens"], im["chunks"], im["tokens"]) == ("calibration/ur-en.txt", 128, 4, 512)
    assert im["seconds"] > 0
    assert {q: f["imatrix"] for q, f in files.items()} == {
        "F16": False, "Q8_0": False, "Q6_K": True, "Q5_K_M": True, "Q4_K_M": True, "IQ4_XS": True, "Q3_K_M": True}
    # the file itself says so, and names the matrix and the text (machine-independent: no paths)
    meta = _fields(folder / files["Q3_K_M"]["file"])
    assert meta["quantize.imatrix.file"] == im["file"]
    assert meta["quantize.imatrix.dataset"] == "calibration/ur-en.txt"
    assert meta["quantize.imatrix.chunks_count"] == 4
    assert "quantize.imatrix.file" not in _fields(folder / files["Q8_0"]["file"])
    # the calibration text is an input of the stage: changing it builds again
    assert "calibration" in manifest.inputs


def _weighted_errors(f16: Path, quant: Path, imatrix: Path) -> dict[str, float]:
    """Per weight, the squared quantization error weighted by the importance matrix (the mean
    squared activation of each input column over the calibration text): what the matrix asks
    the quantizer to keep small."""
    from gguf.quants import dequantize

    im = {t.name: np.asarray(t.data, dtype=np.float64) for t in _reader(imatrix).tensors}
    ref = {t.name: t for t in _reader(f16).tensors}
    out = {}
    for t in _reader(quant).tensors:
        if f"{t.name}.in_sum2" not in im:
            continue
        weight = im[f"{t.name}.in_sum2"].reshape(-1) / im[f"{t.name}.counts"].reshape(-1)[0]
        w = np.asarray(ref[t.name].data, dtype=np.float64).reshape(-1, weight.size)
        q = dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
        out[t.name] = float((((w - q) ** 2) * weight).sum())
    return out


# Q4_K_M (the release's default file) in every run; the I-quant and the 3-bit K-quant, the same
# code path with other types, with --slow
@pytest.mark.parametrize("qtype", ["Q4_K_M", pytest.param("IQ4_XS", marks=pytest.mark.slow),
                                   pytest.param("Q3_K_M", marks=pytest.mark.slow)])
def test_the_importance_matrix_lowers_the_error_where_the_text_is_active_and_llama_cpp_runs_it(stage, qtype, tmp_path):
    manifest, folder = stage
    f16, im = folder / manifest.figures["files"]["F16"]["file"], folder / manifest.figures["imatrix"]["file"]
    guided = folder / manifest.figures["files"][qtype]["file"]
    plain = tmp_path / f"plain-{qtype}.gguf"
    G.quantize(f16, plain, qtype)  # llama-cpp-python's path, no matrix
    assert G.describe(plain)["tensor_types"] == G.describe(guided)["tensor_types"]  # the same mix of types
    assert _tensors(plain) != _tensors(guided)
    # measured on the demo: 3-11% lower on every one of the 14 weights; 1% is the margin for another CPU
    a, b = _weighted_errors(f16, plain, im), _weighted_errors(f16, guided, im)
    assert len(a) == 14 and all(b[n] < 0.99 * a[n] for n in a), {n: round(b[n] / a[n], 3) for n in a}
    # llama.cpp loads the guided file and runs it
    from release import verify

    llm = verify.load_gguf(guided, n_ctx=64, logits_all=True)
    llm.eval(llm.tokenize("پاکستان کا دارالحکومت".encode(), add_bos=True))
    logits = np.asarray(llm.scores[:llm.n_tokens])
    assert logits.shape[1] == 128256 and np.isfinite(logits).all() and logits.std() > 0


def _tensors(path: Path) -> dict[str, bytes]:
    return {t.name: np.asarray(t.data).tobytes() for t in _reader(path).tensors}


def test_llama_quantize_without_a_matrix_writes_what_llama_cpp_python_writes(stage, tmp_path):
    """The two quantizer paths call the same libllama function: the same bytes, so the binary adds
    nothing but the matrix."""
    import subprocess

    from release import llamatools

    manifest, folder = stage
    f16 = folder / manifest.figures["files"]["F16"]["file"]
    G.quantize(f16, tmp_path / "py.gguf", "Q4_K_M")
    subprocess.run([str(llamatools.tool("llama-quantize")), str(f16), str(tmp_path / "bin.gguf"), "Q4_K_M"],
                   capture_output=True, check=True)
    assert (tmp_path / "py.gguf").read_bytes() == (tmp_path / "bin.gguf").read_bytes()


def test_a_calibration_text_too_short_for_two_chunks_is_one_line(stage, demo_spec, tmp_path):
    manifest, folder = stage
    (tmp_path / "short.txt").write_text("چند الفاظ۔\n", encoding="utf-8")
    v = demo_spec.variants["gguf"]
    spec = replace(demo_spec, variants={**demo_spec.variants, "gguf": replace(
        v, imatrix=replace(v.imatrix, calibration=str(tmp_path / "short.txt")))})
    with pytest.raises(G.GGUFError) as err:
        G.compute_imatrix(spec, folder / manifest.figures["files"]["F16"]["file"], tmp_path, progress=False)
    assert "\n" not in str(err.value) and "tokenizes to only" in str(err.value)
    assert not (tmp_path / spec.imatrix_file_name()).exists()


def test_missing_tools_say_to_run_inv(monkeypatch, tmp_path):
    from release import llamatools

    monkeypatch.setattr(llamatools, "bin_dir", lambda: tmp_path)
    with pytest.raises(G.GGUFError, match=r"llama-quantize is not installed; run ./inv to build it"):
        G.quantize(tmp_path / "x-F16.gguf", tmp_path / "x-Q4_K_M.gguf", "Q4_K_M", imatrix=tmp_path / "m.gguf")
    for t in llamatools.TOOLS:
        (tmp_path / t).write_bytes(b"")
    (tmp_path / llamatools.RECORD).write_text('{"llama-cpp-python": "0.0.1", "recipe": "x"}')
    with pytest.raises(G.GGUFError, match=r"built for llama-cpp-python 0.0.1, but .* is installed; run ./inv"):
        llamatools.tool("llama-imatrix")


def test_truncated_shard_gives_one_line_error_and_no_file(demo_spec, merged, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(merged, broken)
    shard = broken / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4096])
    spec = replace(demo_spec, build=replace(demo_spec.build, dir=str(tmp_path / "out")))
    with pytest.raises(G.GGUFError) as err:
        G.run(spec, {"model": broken}, progress=False)
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


def test_k_and_iq_quants_that_would_fall_back_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 320, "intermediate_size": 768}))
    with pytest.raises(G.GGUFError, match="hidden_size 320 is not a multiple of 256"):
        G.check_quantizable(tmp_path, ["F16", "Q4_K_M"])
    with pytest.raises(G.GGUFError, match="hidden_size 320 is not a multiple of 256, so IQ4_XS would fall back"):
        G.check_quantizable(tmp_path, ["F16", "IQ4_XS"])  # 256-weight blocks too (IQ4_NL has 32)
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
