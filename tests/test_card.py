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
                                    "bits_per_weight": 4.89, "sha256": "ab" * 32, "kld_mean": 0.031, "top1": 0.919}}}
    m = Manifest("gguf", "Qalb-1.0-8B-Instruct", "f" * 64, {}, {}, {}, [], figures)
    body = str(card.render(qalb_spec, "gguf", m))
    assert "| enstazao/Qalb-1.0-8B-Instruct-GGUF | GGUF Q4_K_M | `Qalb-1.0-8B-Instruct-Q4_K_M.gguf` | 4.92 GB | 4.89 " \
           "| `abababababababab…` | 0.0310 | 91.9% |" in body


def test_write_all(demo_spec, tmp_path):
    paths = card.write_all(demo_spec, tmp_path)
    assert sorted(p.parent.name for p in paths) == ["bf16", "bnb4", "fp16", "gguf"]
    assert ModelCard.load(paths[0]).data.base_model == "qalb-demo/tiny-llama-3"
