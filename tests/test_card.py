"""Model cards: Hub metadata that builds the model tree, read back by huggingface_hub, and every
fact in the body taken from the spec."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from release import card, chat
from release.artifacts import Manifest


@pytest.mark.parametrize("name", ["bf16", "fp16", "bnb4", "gguf"])
def test_metadata_reads_back_and_builds_the_model_tree(qalb_spec, name):
    text = str(card.render(qalb_spec, name))
    data = ModelCard(text).data.to_dict()  # parsed back by huggingface_hub
    assert data == card.card_data(qalb_spec, name).to_dict()
    if name == "bf16":
        assert (data["base_model"], data["base_model_relation"]) == ("unsloth/Meta-Llama-3.1-8B", "finetune")
    else:
        assert (data["base_model"], data["base_model_relation"]) == ("enstazao/Qalb-1.0-8B-Instruct", "quantized")
    assert data["language"] == ["ur", "en"] and data["license"] == "llama3.1"
    assert data["pipeline_tag"] == "text-generation"
    assert data["library_name"] == ("gguf" if name == "gguf" else "transformers")


def test_body_facts_come_from_the_spec(qalb_spec):
    s = qalb_spec
    for name in s.variants:
        body = str(card.render(s, name))
        assert s.chat.system_prompt in body  # exact UTF-8
        assert "r = 128, alpha = 32" in body and "| sequence length | 2048 |" in body
        assert "max_new_tokens 256, temperature 0.1, top_p 0.9, repetition_penalty 1.1" in body
        assert f"eos ids {chat.eos_token_ids(s.chat)}" in body
        for q in s.gguf_types():
            assert f"`{s.gguf_file_name(q)}`" in body
    gguf = str(card.render(s, "gguf"))
    assert "ollama run hf.co/enstazao/Qalb-1.0-8B-Instruct-GGUF:Q4_K_M" in gguf
    assert "ollama create qalb:8b-instruct-q4_K_M -f 8b-instruct-q4_K_M.Modelfile" in gguf
    flagship = str(card.render(s, "bf16"))
    assert 'model_id = "enstazao/Qalb-1.0-8B-Instruct"' in flagship and "eos_token_id=[128001, 128009]" in flagship


def test_variants_table_uses_the_gguf_manifest(qalb_spec):
    figures = {"files": {"Q4_K_M": {"file": "Qalb-1.0-8B-Instruct-Q4_K_M.gguf", "bytes": 4_920_000_000,
                                    "bits_per_weight": 4.89, "sha256": "ab" * 32}}}
    m = Manifest("gguf", "Qalb-1.0-8B-Instruct", "f" * 64, {}, {}, {}, [], figures)
    body = str(card.render(qalb_spec, "gguf", m))
    assert "| enstazao/Qalb-1.0-8B-Instruct-GGUF | GGUF Q4_K_M | `Qalb-1.0-8B-Instruct-Q4_K_M.gguf` | 4.92 GB | 4.89 " \
           "| `abababababababab…` |" in body


def test_write_all(demo_spec, tmp_path):
    paths = card.write_all(demo_spec, tmp_path)
    assert sorted(p.parent.name for p in paths) == ["bf16", "bnb4", "fp16", "gguf"]
    assert ModelCard.load(paths[0]).data.base_model == "qalb-demo/tiny-llama-3"


def _qalb_verification(spec) -> Manifest:
    """A verification manifest of the contract for the Qalb release's file layout (4 BF16/FP16
    shards, 2 bnb4 shards, one GGUF per type), with distinct made-up sha256 and figures."""
    artifacts, variants = {}, {"bf16": {"kld_mean": None, "top1": None, "passed": True}}
    for i, (name, folder, n) in enumerate([("bf16", "merge/bf16", 4), ("fp16", "merge/fp16", 4), ("bnb4", "bnb4", 2)]):
        for k in range(1, n + 1):
            artifacts[f"{folder}/model-{k:05d}-of-{n:05d}.safetensors"] = {
                "sha256": f"{i}{k}" * 32, "size": 4_000_000_000 if n == 4 else 2_850_000_000, "variant": name,
                "quant": None, "passed": True}
    variants["fp16"] = {"kld_mean": 0.00001, "top1": 0.9991, "passed": True}
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
        text = str(card.render(s, name, verify_manifest=vm, parameters=params))
        data = ModelCard(text).data.to_dict()
        assert data["base_model"] == (s.base.model if v is s.flagship else s.flagship.repo)
        assert data["license_name"] == s.release.license_name and data["license_link"] == s.release.license_link
        assert set(s.release.tags) <= set(data["tags"])
        assert f"# {v.repo.split('/')[-1]}\n" in text
        # model and LoRA table
        assert f"| base model | [{s.base.model}](https://huggingface.co/{s.base.model}) |" in text
        assert f"| sequence length | {t.sequence_length} |" in text
        assert f"| LoRA | r = {lora.r}, alpha = {lora.alpha}, dropout {lora.dropout}, rsLoRA {lora.use_rslora} |" in text
        assert f"| LoRA targets | {', '.join(lora.target_modules)} |" in text
        # the two training stages
        assert f"| optimizer | {t.cpt.optimizer} | {t.sft.optimizer} |" in text
        assert (f"| learning rate | {t.cpt.learning_rate:g} ({t.cpt.lr_scheduler}, warmup {t.cpt.warmup_ratio:g}) "
                f"| {t.sft.learning_rate:g} ({t.sft.lr_scheduler}, warmup {t.sft.warmup_ratio:g}) |") in text
        assert f"| effective batch size | {t.cpt.effective_batch_size} | {t.sft.effective_batch_size} |" in text
        assert f"| epochs | {t.cpt.epochs} | {t.sft.epochs} |" in text
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
        # usage for this variant's runtime
        if v.format == "gguf":
            assert "ollama run hf.co/enstazao/Qalb-1.0-8B-Instruct-GGUF:Q4_K_M" in text
            assert "ollama create qalb:8b-instruct-q4_K_M -f 8b-instruct-q4_K_M.Modelfile" in text
            assert "llama-cli -hf enstazao/Qalb-1.0-8B-Instruct-GGUF:Q4_K_M" in text
        else:
            assert f'model_id = "{v.repo}"' in text and "eos_token_id=[128001, 128009]" in text
            assert f"max_new_tokens={inf.max_new_tokens}, do_sample=True, temperature={inf.temperature}" in text
        # license and citation
        assert f"{s.release.license_name}: {s.release.license_link}. Built with Llama." in text
        assert f"\\url{{https://huggingface.co/{s.flagship.repo}}}" in text and "note = {version 1.0}" in text


def test_cards_stage_follows_the_verification_manifest(demo_spec, tmp_path):
    from dataclasses import replace

    from release.artifacts import run_stage, sha256_file

    s = replace(demo_spec, build=replace(demo_spec.build, dir=str(tmp_path)))
    m = card.run(s, progress=False)
    ran = m.built
    assert ran and m.figures == {"cards": 4, "verified": False} and "verify" not in m.inputs
    assert "| qalb-demo/Qalb-Demo-1.0-Tiny-Instruct | safetensors bfloat16 |" in (
        card.folder(s) / "bf16" / "README.md").read_text(encoding="utf-8")
    figures = {"passed": True, "variants": {"gguf:Q4_K_M": {"kld_mean": 0.5, "top1": 0.5, "passed": True}},
               "artifacts": {"gguf/Qalb-Demo-1.0-Tiny-Instruct-Q4_K_M.gguf": {
                   "sha256": "c" * 64, "size": 54_000_000, "variant": "gguf", "quant": "Q4_K_M", "passed": True}}}
    run_stage("verify", s.build_dir / "verify", lambda out: figures, release=s.release.name)
    m = card.run(s, progress=False)
    ran = m.built
    assert ran and m.figures["verified"] and m.inputs["verify"] == sha256_file(s.build_dir / "verify" / "manifest.json")
    gguf = (card.folder(s) / "gguf" / "README.md").read_text(encoding="utf-8")
    assert ("| qalb-demo/Qalb-Demo-1.0-Tiny-Instruct-GGUF | `Qalb-Demo-1.0-Tiny-Instruct-Q4_K_M.gguf` | Q4_K_M "
            "| 54.0 MB |  | `cccccccccccccccc…` | 0.5000 | 50.0% |") in gguf
    assert card.run(s, progress=False).built is False  # unchanged: skipped
