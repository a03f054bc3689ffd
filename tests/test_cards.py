"""Model cards: Hub metadata that builds the model tree and carries the authors' scores, read back
by huggingface_hub; every fact in the body taken from the spec, values the model's card does not
state marked as such; the licence's duties from the spec; the GGUF card's size/fidelity chart."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
from dataclasses import replace

import pytest
from huggingface_hub import ModelCard
from PIL import Image

from conftest import ROOT
from release import cards, chart, chat, pipeline
from release.artifacts import Manifest


@pytest.mark.parametrize("name", ["bf16", "fp16", "bnb4", "gguf"])
def test_metadata_reads_back_and_builds_the_model_tree(qalb_spec, name):
    text = str(cards.render(qalb_spec, name))
    data = ModelCard(text).data.to_dict()  # parsed back by huggingface_hub
    assert data == cards.card_data(qalb_spec, name).to_dict()
    if name == "bf16":
        assert (data["base_model"], data["base_model_relation"]) == ("unsloth/Meta-Llama-3.1-8B", "finetune")
    else:
        assert (data["base_model"], data["base_model_relation"]) == ("enstazao/Qalb-1.0-8B-Instruct", "quantized")
    assert data["language"] == ["ur", "en"] and data["license"] == "llama3.1"
    assert data["pipeline_tag"] == "text-generation"
    assert data["library_name"] == ("gguf" if name == "gguf" else "transformers")
    assert "datasets" not in data  # the spec gives no dataset a Hub id: named in the body only
    parsed = ModelCard(text).data.eval_results
    if name != "bf16":  # the authors' scores are the flagship's; a quantized repo has its own figures
        assert parsed is None and "model-index" not in text
        return
    assert data["model-index"][0]["name"] == "Qalb-1.0-8B-Instruct"
    assert [(r.metric_type, r.metric_value, r.verified) for r in parsed] == [
        ("overall_score", 90.34, False), ("urdu_purity", 95.31, False)]
    for r in parsed:  # reported by the authors, with the source the spec names
        assert (r.source_name, r.source_url) == (qalb_spec.provenance.source_name, qalb_spec.provenance.source_url)
        assert r.source_url == "https://huggingface.co/enstazao/Qalb-1.0-8B-Instruct"
        assert r.task_type == "text-generation" and r.dataset_name == qalb_spec.evaluation.benchmark


def test_datasets_with_a_hub_id_are_metadata_the_others_named_in_the_body(qalb_spec):
    s = qalb_spec
    text = str(cards.render(s, "bf16"))
    assert "| instruction fine-tuning | Alif Urdu-instruct |" in text
    corpora = [replace(s.data.corpora[0], hub_id="org/urdu-news"), *s.data.corpora[1:]]
    data = replace(s.data, corpora=corpora, instruct=replace(s.data.instruct, hub_id="org/alif-urdu-instruct"))
    text = str(cards.render(replace(s, data=data), "bf16"))
    assert ModelCard(text).data.datasets == ["org/urdu-news", "org/alif-urdu-instruct"]
    assert ("| instruction fine-tuning | [Alif Urdu-instruct](https://huggingface.co/datasets/org/alif-urdu-instruct) |"
            in text)
    assert "| continued pre-training datasets | [urdu](https://huggingface.co/datasets/org/urdu-news) |" in text


def test_training_data_section_comes_from_the_data_section(qalb_spec):
    text = str(cards.render(qalb_spec, "fp16"))
    assert ("| continued pre-training, Urdu | 1.84B tokens: news, literature, government documents, social media |"
            in text)
    assert "| continued pre-training, English | 140M tokens (7.1% of the total): Wikipedia (replay buffer) |" in text
    assert "| cleaning | 67.8% of the raw corpus kept |" in text


def test_values_the_models_card_does_not_state_are_marked(qalb_spec):
    s = qalb_spec
    text = str(cards.render(s, "bf16"))
    # the three the spec marks (not on the card) among the training values, each with its source
    assert ("| learning rate | 5e-05 (not stated by the authors; Unsloth's continued pre-training recipe) | 5e-05 |"
            in text)
    assert "| epochs | 1 (not stated by the authors; one pass over the corpus, this toolchain's choice) | 2 |" in text
    assert ("| schedule | cosine, warmup ratio 0.05 | linear, warmup ratio 0 (not stated by the authors; "
            "this toolchain's choice) |") in text
    assert "8192 tokens (not stated by the authors; this release's choice, a memory/quality trade-off)" in text
    # every mark names a key of [provenance.not_on_card]; the values on the card stay unmarked
    assert text.count("not stated by the authors") == 4
    assert "| effective batch size | 128 | 64 |" in text and "| overall score | 90.34 |" in text
    # the rule is the spec's, not a list in code: another key becomes marked wherever printed
    other = replace(s, provenance=replace(s.provenance, not_on_card={"lora.r": "a guess"}))
    text = str(cards.render(other, "bf16"))
    assert "r = 128 (not stated by the authors; a guess), alpha = 32" in text
    assert text.count("not stated by the authors") == 1


def test_license_duties_come_from_the_spec(qalb_spec):
    s = qalb_spec
    text = str(cards.render(s, "gguf"))
    assert "Llama 3.1 Community License: https://www.llama.com/llama3_1/license/. Built with Llama." in text
    assert "Acceptable Use Policy: https://llama.meta.com/llama3_1/use-policy" in text
    assert f'"{s.license_terms.notice}"' in text and "Copyright © Meta Platforms, Inc." in s.license_terms.notice
    # another base's licence: nothing of Llama's is left in the card's licence section
    other = replace(s, release=replace(s.release, license="apache-2.0", license_name="Apache License 2.0",
                                       license_link="https://www.apache.org/licenses/LICENSE-2.0"),
                    license_terms=replace(s.license_terms, notice="Example base, Copyright Example Inc.",
                                          attribution="", use_policy=None, name_prefix=""))
    section = str(cards.render(other, "bf16")).split("## License", 1)[1].split("## Citation")[0]
    assert "Llama" not in section and "Acceptable Use Policy" not in section
    assert "Apache License 2.0: https://www.apache.org/licenses/LICENSE-2.0." in section
    assert '"Example base, Copyright Example Inc."' in section


def test_body_facts_come_from_the_spec(qalb_spec):
    s = qalb_spec
    for name in s.variants:
        body = str(cards.render(s, name))
        assert s.chat.system_prompt in body  # exact UTF-8
        assert "r = 128, alpha = 32" in body and "| sequence length | 2048 |" in body
        assert "max_new_tokens 256, temperature 0.1, top_p 0.9, repetition_penalty 1.1" in body
        assert f"eos ids {chat.eos_token_ids(s.chat)}" in body
        for q in s.gguf_types():
            assert f"`{s.gguf_file_name(q)}`" in body
    gguf = str(cards.render(s, "gguf"))
    assert "ollama run hf.co/enstazao/Qalb-1.0-8B-Instruct-GGUF:Q4_K_M" in gguf
    assert "ollama create qalb:8b-instruct-q4_K_M -f 8b-instruct-q4_K_M.Modelfile" in gguf
    assert ("hf download enstazao/Qalb-1.0-8B-Instruct-GGUF Qalb-1.0-8B-Instruct-Q4_K_M.gguf "
            "8b-instruct-q4_K_M.Modelfile --local-dir qalb") in gguf
    # llama.cpp with --jinja (the GGUF's template, with the default Urdu system prompt) and the
    # spec's context, sampling and answer length
    assert ("llama-cli -hf enstazao/Qalb-1.0-8B-Instruct-GGUF:Q4_K_M --jinja -cnv -c 8192 -n 256 --temp 0.1 "
            "--top-p 0.9 --repeat-penalty 1.1") in gguf
    assert "llama-server -hf enstazao/Qalb-1.0-8B-Instruct-GGUF:Q4_K_M --jinja -c 8192 --port 8080" in gguf
    curl = re.search(r"^curl http://localhost:8080/v1/chat/completions .* -d '(.*)'$", gguf, re.M)
    assert json.loads(curl.group(1)) == {"messages": [{"role": "user", "content": cards.QUESTION}], "max_tokens": 256,
                                         "temperature": 0.1, "top_p": 0.9, "repeat_penalty": 1.1}
    assert 'Llama.from_pretrained("enstazao/Qalb-1.0-8B-Instruct-GGUF", filename="Qalb-1.0-8B-Instruct-Q4_K_M.gguf", ' \
           "n_ctx=8192" in gguf
    flagship = str(cards.render(s, "bf16"))
    assert 'model_id = "enstazao/Qalb-1.0-8B-Instruct"' in flagship and "eos_token_id=[128001, 128009]" in flagship
    # the minimum transformers is the one config.json claims; torch_dtype= is read by 4.43 and 5.x alike
    # (4.x ignores a dtype= argument and loads float32)
    assert 'pip install "transformers>=4.43.0" accelerate`' in flagship and 'torch_dtype="auto"' in flagship
    assert "bitsandbytes`" in str(cards.render(s, "bnb4"))


def test_variants_table_uses_the_gguf_manifest(qalb_spec):
    figures = {"files": {"Q4_K_M": {"file": "Qalb-1.0-8B-Instruct-Q4_K_M.gguf", "bytes": 4_920_000_000,
                                    "bits_per_weight": 4.89, "sha256": "ab" * 32}}}
    m = Manifest("gguf", "Qalb-1.0-8B-Instruct", "f" * 64, {}, {}, {}, [], figures)
    body = str(cards.render(qalb_spec, "gguf", m))
    assert "| enstazao/Qalb-1.0-8B-Instruct-GGUF | GGUF Q4_K_M | `Qalb-1.0-8B-Instruct-Q4_K_M.gguf` | 4.92 GB | 4.89 " \
           "| `abababababababab…` |" in body


def test_write_all(demo_spec, tmp_path):
    paths = cards.write_all(demo_spec, tmp_path)  # no verification: no chart; no signing key: no public key
    assert sorted(p.relative_to(tmp_path).as_posix() for p in paths) == sorted(
        f"{v}/{f}" for v in ("bf16", "bnb4", "fp16", "gguf", "cpt", "sft") for f in ("README.md", "NOTICE"))
    assert ModelCard.load(tmp_path / "bf16" / "README.md").data.base_model == "qalb-demo/tiny-llama-3"
    # the adapters' repos: adapters of the base in the model tree, applied with PEFT in order
    for stage in ("cpt", "sft"):
        card = ModelCard.load(tmp_path / stage / "README.md")
        assert card.data.base_model == "qalb-demo/tiny-llama-3" and card.data.base_model_relation == "adapter"
        assert card.data.library_name == "peft" and "This release was published without a signature." in card.text
    sft = (tmp_path / "sft" / "README.md").read_text(encoding="utf-8")
    assert sft.index("Qalb-Demo-1.0-Tiny-Instruct-CPT-LoRA\").merge_and_unload()") < sft.index(
        "Qalb-Demo-1.0-Tiny-Instruct-SFT-LoRA\").merge_and_unload()")
    assert (tmp_path / "gguf" / "NOTICE").read_text(encoding="utf-8") == demo_spec.license_terms.notice + "\n"
    assert chart.FILE not in (tmp_path / "gguf" / "README.md").read_text(encoding="utf-8")
    # the demo reports no scores: Qalb's (specs/qalb.toml) are not shown as if they were the demo's
    for v in ("bf16", "fp16", "bnb4", "gguf"):
        text = (tmp_path / v / "README.md").read_text(encoding="utf-8")
        assert "model-index" not in text and "## Evaluation" not in text and "90.34" not in text
        assert "95.31" not in text and ModelCard(text).data.eval_results is None


def _qalb_verification(spec) -> Manifest:
    """A verification manifest of the contract for the Qalb release's file layout (4 BF16/FP16
    shards, 2 bnb4 shards, one GGUF per type), with distinct made-up sha256 and figures."""
    artifacts, variants = {}, {"bf16": {"kld_mean": None, "top1": None, "passed": True}}
    for i, (name, folder, n) in enumerate([("bf16", "merge/bf16", 4), ("fp16", "merge/fp16", 4), ("bnb4", "bnb4", 2)]):
        for k in range(1, n + 1):
            artifacts[f"{folder}/model-{k:05d}-of-{n:05d}.safetensors"] = {
                "sha256": f"{i}{k}" * 32, "size": 4_000_000_000 if n == 4 else 2_850_000_000, "variant": name,
                "quant": None, "passed": True}
    variants["fp16"] = {"kld_mean": -0.00000002, "top1": 0.9991, "passed": True}  # rounds to zero from below
    variants["bnb4"] = {"kld_mean": 0.0412, "top1": 0.903, "passed": True}
    for j, q in enumerate(spec.gguf_types()):
        artifacts[f"gguf/{spec.gguf_file_name(q)}"] = {"sha256": f"g{j}" * 32, "size": 16_000_000_000 >> j,
                                                       "variant": "gguf", "quant": q, "passed": True}
        variants[f"gguf:{q}"] = {"kld_mean": 0.001 * (j + 1), "top1": 0.99 - 0.02 * j, "passed": True}
    return Manifest("verify", spec.release.name, "f" * 64, {}, {}, {}, [], {
        "passed": True, "artifacts": artifacts, "variants": variants})


def test_every_qalb_card_fact_by_fact(qalb_spec):
    """Each card of the Qalb spec against the spec and the verification manifest, fact by fact."""
    s = qalb_spec
    vm = _qalb_verification(s)
    params = 8_030_261_248  # Llama 3.1 8B
    t, lora, inf = s.training, s.lora, s.inference
    for name, v in s.variants.items():
        text = str(cards.render(s, name, verify_manifest=vm, parameters=params, folders=pipeline.models(s)))
        data = ModelCard(text).data.to_dict()
        assert data["base_model"] == (s.base.model if v is s.flagship else s.flagship.repo)
        assert data["license_name"] == s.release.license_name and data["license_link"] == s.release.license_link
        assert set(s.release.tags) <= set(data["tags"])
        assert f"# {v.repo.split('/')[-1]}\n" in text
        # model and LoRA table
        assert f"| base model | [{s.base.model}](https://huggingface.co/{s.base.model}) |" in text
        assert f"| sequence length | {t.sequence_length} |" in text
        assert (f"| LoRA | r = {lora.r}, alpha = {lora.alpha}, dropout {lora.dropout}, "
                f"rsLoRA {lora.use_rslora} |") in text
        assert f"| LoRA targets | {', '.join(lora.target_modules)} |" in text
        # the two training stages
        assert f"| optimizer | {t.cpt.optimizer} | {t.sft.optimizer} |" in text
        assert f"| learning rate | {t.cpt.learning_rate:g} (not stated by the authors; " in text
        assert (f"| schedule | {t.cpt.lr_scheduler}, warmup ratio {t.cpt.warmup_ratio:g} | "
                f"{t.sft.lr_scheduler}, ") in text
        assert f"| effective batch size | {t.cpt.effective_batch_size} | {t.sft.effective_batch_size} |" in text
        assert f"| epochs | {t.cpt.epochs} (not stated by the authors; " in text and f" | {t.sft.epochs} |" in text
        assert "| trained in full | embed_tokens, lm_head | - |" in text
        # prompt format: the exact system prompt between the Llama 3 headers
        assert (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{s.chat.system_prompt}<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\n{user_message}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n") in text
        assert s.chat.system_prompt.count("\u06c1") == 3 and s.chat.system_prompt in text
        assert (f"max_new_tokens {inf.max_new_tokens}, temperature {inf.temperature}, top_p {inf.top_p}, "
                f"repetition_penalty {inf.repetition_penalty}") in text
        assert "Stop at `<|eot_id|>`, `<|end_of_text|>` (eos ids [128001, 128009])" in text
        # the variants table: every verified file, with its repo, path in the repo and figures
        for rel, a in vm.figures["artifacts"].items():
            repo = s.variants[a["variant"]].repo
            row = f"| {repo} | `{rel.rsplit('/', 1)[-1]}` | "
            assert row in text and f"`{a['sha256'][:16]}…`" in text
        assert ("| enstazao/Qalb-1.0-8B-Instruct-bnb-4bit | `model-00001-of-00002.safetensors` | bitsandbytes NF4 "
                "| 2.85 GB | 5.68 | `2121212121212121…` | 0.0412 | 90.3% |") in text
        assert ("| enstazao/Qalb-1.0-8B-Instruct | `model-00001-of-00004.safetensors` | BF16 | 4.00 GB | 15.94 "
                "| `0101010101010101…` | reference | reference |") in text
        assert "| enstazao/Qalb-1.0-8B-Instruct-GGUF | `Qalb-1.0-8B-Instruct-Q4_K_M.gguf` | Q4_K_M | 1.00 GB |" in text
        assert "| 0.0000 | 99.9% |" in text and "-0.0000" not in text  # FP16's KL divergence
        # usage for this variant's runtime
        if v.format == "gguf":
            assert "ollama run hf.co/enstazao/Qalb-1.0-8B-Instruct-GGUF:Q4_K_M" in text
            assert "ollama create qalb:8b-instruct-q4_K_M -f 8b-instruct-q4_K_M.Modelfile" in text
            assert "llama-cli -hf enstazao/Qalb-1.0-8B-Instruct-GGUF:Q4_K_M --jinja " in text
            assert "llama-server -hf enstazao/Qalb-1.0-8B-Instruct-GGUF:Q4_K_M --jinja " in text
            assert f"![File size against mean KL divergence from BF16, per quant type]({chart.FILE})" in text
        else:
            assert f'model_id = "{v.repo}"' in text and "eos_token_id=[128001, 128009]" in text
            assert f"max_new_tokens={inf.max_new_tokens}, do_sample=True, temperature={inf.temperature}" in text
        # evaluation, kept apart from the verification figures
        assert "| overall score | 90.34 |\n| Urdu purity | 95.31% |" in text
        assert text.index("## Evaluation") < text.index("## Variants")
        # license and citation
        terms = s.license_terms
        assert f"{s.release.license_name}: {s.release.license_link}. {terms.attribution}." in text
        assert f"Acceptable Use Policy: {terms.use_policy}" in text and terms.notice in text
        assert f"\\url{{https://huggingface.co/{s.flagship.repo}}}" in text and "note = {version 1.0}" in text


def test_cards_stage_follows_the_verification_manifest(demo_spec, tmp_path):
    from dataclasses import replace

    from release.artifacts import run_stage, sha256_file

    s = replace(demo_spec, build=replace(demo_spec.build, dir=str(tmp_path)))
    m = pipeline.run_one(s, "cards", progress=False)
    ran = m.built
    assert ran and m.figures == {"cards": 6, "verified": False} and "verify" not in m.inputs
    assert "| qalb-demo/Qalb-Demo-1.0-Tiny-Instruct | safetensors bfloat16 |" in (
        pipeline.folder(s, "cards") / "bf16" / "README.md").read_text(encoding="utf-8")
    assert not (pipeline.folder(s, "cards") / "gguf" / chart.FILE).exists()  # nothing measured: no chart, no link
    assert chart.FILE not in (pipeline.folder(s, "cards") / "gguf" / "README.md").read_text(encoding="utf-8")
    figures = {"passed": True, "variants": {"gguf:Q4_K_M": {"kld_mean": 0.5, "top1": 0.5, "passed": True}},
               "artifacts": {"gguf/Qalb-Demo-1.0-Tiny-Instruct-Q4_K_M.gguf": {
                   "sha256": "c" * 64, "size": 54_000_000, "variant": "gguf", "quant": "Q4_K_M", "passed": True}}}
    run_stage("verify", s.build_dir / "verify", lambda out: figures, release=s.release.name)
    m = pipeline.run_one(s, "cards", progress=False)
    ran = m.built
    assert ran and m.figures["verified"] and m.inputs["verify"] == sha256_file(s.build_dir / "verify" / "manifest.json")
    gguf = (pipeline.folder(s, "cards") / "gguf" / "README.md").read_text(encoding="utf-8")
    assert ("| qalb-demo/Qalb-Demo-1.0-Tiny-Instruct-GGUF | `Qalb-Demo-1.0-Tiny-Instruct-Q4_K_M.gguf` | Q4_K_M "
            "| 54.0 MB |  | `cccccccccccccccc…` | 0.5000 | 50.0% |") in gguf
    # the chart is written next to the GGUF card, linked from it by a relative path, and recorded
    png = pipeline.folder(s, "cards") / "gguf" / chart.FILE
    assert f"]({chart.FILE})" in gguf and Image.open(png).size == (800, 500)
    assert f"gguf/{chart.FILE}" in {e.path for e in m.outputs}
    assert not any(chart.FILE in (pipeline.folder(s, "cards") / n / "README.md").read_text(encoding="utf-8")
                   for n in ("bf16", "fp16", "bnb4"))
    assert pipeline.run_one(s, "cards", progress=False).built is False  # unchanged: skipped


def test_chart_has_a_labelled_point_per_quantized_file_and_fixed_bytes(qalb_spec):
    """The chart's data is every quantized GGUF file of the verification (F16 is the unquantized
    reference: no point); its PNG decodes at the fixed size and is byte-identical when rebuilt, as
    stage outputs are compared by sha256."""
    vm = _qalb_verification(qalb_spec)
    pts = chart.points(qalb_spec, vm)
    types = qalb_spec.gguf_types()  # the j-th type has size 16 GB >> j and KL 0.001 * (j + 1) above
    assert types[0] == "F16" and {"Q8_0", "Q4_K_M"} <= set(types)
    assert [(p.quant, p.size, p.kld) for p in pts] == [  # smallest file first
        (q, 16_000_000_000 >> j, pytest.approx(0.001 * (j + 1))) for j, q in reversed(list(enumerate(types))) if j]
    png = chart.chart(qalb_spec, vm)
    image = Image.open(io.BytesIO(png))
    assert (image.format, image.size) == ("PNG", (800, 500))
    assert chart.chart(qalb_spec, vm) == png
    # and in a fresh interpreter (another run of the stage): the same bytes
    code = ("import sys, hashlib; sys.path.insert(0, 'tests'); from test_cards import _qalb_verification; "
            "from release import chart, spec; s = spec.load('specs/qalb.toml'); "
            "print(hashlib.sha256(chart.chart(s, _qalb_verification(s))).hexdigest())")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert fresh.stdout.split()[-1] == hashlib.sha256(png).hexdigest()
    assert b"Software" not in png and b"Matplotlib" not in png  # no library version, no date
    # the plot is not blank: the line and markers add the plot colour to a white image
    assert (31, 119, 180) in {c[:3] for _, c in image.convert("RGB").getcolors(1 << 20)}
    # other figures draw another chart; no measured quant: no chart
    moved = replace(vm, figures={**vm.figures, "variants": {**vm.figures["variants"],
                                                            "gguf:Q4_K_M": {"kld_mean": 0.05, "top1": 0.9}}})
    assert chart.chart(qalb_spec, moved) != png
    assert chart.chart(qalb_spec, None) is None
    only_f16 = replace(vm, figures={**vm.figures, "variants": {"gguf:F16": {"kld_mean": 1e-5, "top1": 1.0}}})
    assert chart.chart(qalb_spec, only_f16) is None


def test_gguf_card_says_which_files_used_the_importance_matrix_and_on_what_text(qalb_spec):
    files = {q: {"file": qalb_spec.gguf_file_name(q), "bytes": 1, "bits_per_weight": 4.0, "sha256": "ab" * 32,
                 "imatrix": q not in ("F16", "Q8_0")} for q in qalb_spec.gguf_types()}
    figures = {"files": files, "imatrix": {"file": "Qalb-1.0-8B-Instruct-imatrix.gguf",
                                           "calibration": "calibration/ur-en.txt", "chunk_tokens": 512, "chunks": 37,
                                           "tokens": 18944, "seconds": 1.0}}
    m = Manifest("gguf", "Qalb-1.0-8B-Instruct", "f" * 64, {}, {}, {}, [], figures)
    body = str(cards.render(qalb_spec, "gguf", m))
    section = body.split("## Importance matrix\n\n")[1].split("\n\n")[0]
    assert section.startswith("Q6_K, Q5_K_M, Q4_K_M, IQ4_XS, Q3_K_M were quantized with an importance matrix "
                              "(`Qalb-1.0-8B-Instruct-imatrix.gguf`)")
    assert "over `calibration/ur-en.txt` of the release toolchain: Urdu-first text written for this release" in section
    assert "37 chunks of 512 tokens (18,944 tokens)" in section and section.endswith("F16, Q8_0 did not use it.")
    # no matrix in the manifest, or another repo: no section
    plain = Manifest("gguf", "Qalb-1.0-8B-Instruct", "f" * 64, {}, {}, {}, [], {"files": files})
    assert "## Importance matrix" not in str(cards.render(qalb_spec, "gguf", plain))
    assert "## Importance matrix" not in str(cards.render(qalb_spec, "bf16", m))


def test_the_charts_labels_overlap_neither_each_other_nor_a_point():
    """Quant types of close size and fidelity (the demo's IQ4_XS and Q4_K_M, Q5_K_M and Q6_K) get
    labels that do not print over each other or over a point: each label's box, measured by the
    renderer, is disjoint from every other label's and every marker's."""
    from matplotlib.transforms import Bbox

    pts = [chart.Point("Q3_K_M", 1_000_000_000, 0.080), chart.Point("IQ4_XS", 1_010_000_000, 0.085),
           chart.Point("Q4_K_M", 1_020_000_000, 0.090), chart.Point("Q5_K_M", 1_030_000_000, 0.088),
           chart.Point("Q6_K", 1_500_000_000, 0.02), chart.Point("Q8_0", 2_000_000_000, 0.004)]
    fig = chart.figure("close points", pts)
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t.get_window_extent(renderer) for t in ax.texts]
    assert sorted(t.get_text() for t in ax.texts) == sorted(p.quant for p in pts)
    half = 4 * chart.DPI / 72
    marks = [Bbox([[cx - half, cy - half], [cx + half, cy + half]])
             for cx, cy in ax.transData.transform([(p.size / 1e9, p.kld) for p in pts])]
    for i, a in enumerate(labels):
        assert not any(a.overlaps(b) for b in labels[i + 1:] + marks), ax.texts[i].get_text()
    # the first place tried, for every label, would have overlapped here
    first = [ax.annotate(p.quant, (p.size / 1e9, p.kld), textcoords="offset points", xytext=chart.PLACES[0][:2],
                         fontsize=10).get_window_extent(renderer) for p in pts]
    assert any(a.overlaps(b) for i, a in enumerate(first) for b in first[i + 1:])
