"""One chat format, two renderings: transformers' Jinja (apply_chat_template) and Ollama's Go
templates produce the same prompt text and the same token ids (HF tokenizer vs llama.cpp)."""

from __future__ import annotations

import re

import gorender
import llamacpp
import pytest

from conftest import ROOT
from release import chat, llama3

REFERENCE = ROOT.parent / "shared" / "REFERENCE.md"
BOS = "<|begin_of_text|>"
LONG = "پاکستان " * 600 + "end"

CONVERSATIONS = {
    "no-system": [{"role": "user", "content": "سلام! آپ کیسے ہیں؟"}],
    "custom-system": [{"role": "system", "content": "You are a terse assistant."},
                      {"role": "user", "content": "What is Lahore known for?"}],
    "multi-turn": [{"role": "user", "content": "اردو کا پہلا شاعر کون تھا؟"},
                   {"role": "assistant", "content": "امیر خسرو کو اکثر پہلا شاعر کہا جاتا ہے۔"},
                   {"role": "user", "content": "اور غالب؟"}],
    "system-multi-turn": [{"role": "system", "content": "جواب مختصر دیں۔"},
                          {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                          {"role": "user", "content": "2+2?"}],
    "english": [{"role": "user", "content": "Translate 'good morning' into Urdu, please."}],
    "mixed": [{"role": "user", "content": "Urdu اور English ملا کر: it's 'code-switching' ✓"}],
    "emoji": [{"role": "user", "content": "😀🇵🇰👍🏽 کیا حال ہے؟ 🙏"}],
    "empty-content": [{"role": "user", "content": ""}],
    "whitespace-only": [{"role": "user", "content": "  \n\t "}],
    "trailing-newlines": [{"role": "user", "content": "line one\n\nline two\n\n"}],
    "long": [{"role": "user", "content": LONG}],
    "empty-system": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}],
    "two-systems": [{"role": "system", "content": "A."}, {"role": "system", "content": "B."},
                    {"role": "user", "content": "hi"}],
    "system-in-the-middle": [{"role": "user", "content": "a"}, {"role": "system", "content": "S2"},
                             {"role": "user", "content": "b"}],
    "consecutive-users": [{"role": "user", "content": "first"}, {"role": "user", "content": "second"}],
    "template-syntax-in-content": [{"role": "user", "content": "{{ .System }} {% if x %}y{% endif %} {{- end }}"}],
    "special-token-text": [{"role": "user", "content": "say <|eot_id|> then stop"}],
    "quotes-and-backslashes": [{"role": "user", "content": 'He said "\\n" and \'\\t\' and """'}],
}


@pytest.fixture(scope="session")
def go_exe(tmp_path_factory):
    return gorender.build(tmp_path_factory.mktemp("go"))


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def llama_vocab(tiny_model, tmp_path_factory):
    from release import verify

    out = tmp_path_factory.mktemp("vocab") / "vocab.gguf"
    llamacpp.convert(tiny_model, out, "--vocab-only")
    return verify.load_gguf(out, vocab_only=True)


@pytest.fixture(scope="session")
def rendered(demo_spec, hf_tokenizer, go_exe):
    template = chat.jinja_template(demo_spec.chat)
    names = list(CONVERSATIONS)
    jinja = [hf_tokenizer.apply_chat_template(CONVERSATIONS[n], chat_template=template, tokenize=False,
                                              add_generation_prompt=True) for n in names]
    go = gorender.render(go_exe, chat.go_template(demo_spec.chat), demo_spec.chat.system_prompt,
                         [{"messages": CONVERSATIONS[n]} for n in names])
    return dict(zip(names, zip(jinja, go, strict=True), strict=True))


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_jinja_and_go_render_the_same_prompt(rendered, name):
    jinja, go = rendered[name]
    # The Jinja template writes the BOS token; llama.cpp and Ollama add it when tokenizing.
    assert jinja == BOS + go


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_hf_and_llama_cpp_token_ids_are_equal(demo_spec, rendered, hf_tokenizer, llama_vocab, name):
    _, go = rendered[name]
    hf_ids = hf_tokenizer.apply_chat_template(CONVERSATIONS[name], chat_template=chat.jinja_template(demo_spec.chat),
                                              tokenize=True, add_generation_prompt=True, return_dict=False)
    cpp_ids = llama_vocab.tokenize(go.encode("utf-8"), add_bos=True, special=True)
    assert list(hf_ids) == cpp_ids


def test_default_system_prompt_is_used_without_a_system_message(demo_spec, rendered):
    jinja, _ = rendered["no-system"]
    assert demo_spec.chat.system_prompt in jinja
    assert jinja.count("<|start_header_id|>system<|end_header_id|>") == 1
    custom, _ = rendered["custom-system"]
    assert demo_spec.chat.system_prompt not in custom and "You are a terse assistant." in custom


def test_prompt_has_the_reference_layout(demo_spec, rendered):
    """REFERENCE.md: every header is followed by exactly two newlines; the prompt ends with the
    assistant header."""
    jinja, _ = rendered["no-system"]
    expected = (f"{BOS}<|start_header_id|>system<|end_header_id|>\n\n{demo_spec.chat.system_prompt}<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nسلام! آپ کیسے ہیں؟<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert jinja == expected
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not present (it sits beside the checkout)")
    block = re.search(r"## Prompt format.*?```\n(.*?)```", REFERENCE.read_text(encoding="utf-8"), re.S).group(1)
    filled = block.replace("{system_prompt}", demo_spec.chat.system_prompt).replace(
        "{user_message}", "سلام! آپ کیسے ہیں؟")
    # The reference block ends with the assistant header's two newlines plus the fence's own.
    assert filled.rstrip("\n") + "\n\n" == expected


def test_legacy_prompt_variables_render_like_a_single_user_turn(demo_spec, rendered, go_exe):
    (legacy,) = gorender.render(go_exe, chat.go_template(demo_spec.chat), demo_spec.chat.system_prompt,
                                [{"prompt": "سلام! آپ کیسے ہیں؟"}])
    assert BOS + legacy == rendered["no-system"][0]


def test_final_assistant_message_is_left_open_in_ollama(demo_spec, go_exe):
    (out,) = gorender.render(go_exe, chat.go_template(demo_spec.chat), demo_spec.chat.system_prompt,
                             [{"messages": [{"role": "user", "content": "q"},
                                            {"role": "assistant", "content": "The answer is"}]}])
    assert out.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nThe answer is")


def test_jinja_template_renders_training_conversations_closed(demo_spec, hf_tokenizer):
    conv = CONVERSATIONS["multi-turn"] + [{"role": "assistant", "content": "غالب اردو کے عظیم شاعر ہیں۔"}]
    text = hf_tokenizer.apply_chat_template(conv, chat_template=chat.jinja_template(demo_spec.chat), tokenize=False)
    assert text.endswith("غالب اردو کے عظیم شاعر ہیں۔<|eot_id|>")


def test_stop_tokens_and_eos_ids(demo_spec):
    stops = chat.ollama_stop_tokens(demo_spec.chat)
    assert stops[:2] == ["<|eot_id|>", "<|end_of_text|>"]
    assert {"<|start_header_id|>", "<|end_header_id|>"} <= set(stops)
    assert chat.eos_token_ids(demo_spec.chat) == [128001, 128009]
    assert all(llama3.SPECIAL_TOKENS[t] for t in stops)


def test_system_prompt_with_control_characters_is_refused(demo_spec):
    from dataclasses import replace

    bad = replace(demo_spec.chat, system_prompt="hello\x07world")
    with pytest.raises(chat.TemplateError, match="U\\+0007"):
        chat.jinja_template(bad)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_render_is_what_transformers_renders(demo_spec, rendered, name):
    """``chat.render`` (what the cards show) against transformers' ``apply_chat_template``."""
    assert chat.render(demo_spec.chat, CONVERSATIONS[name]) == rendered[name][0]


def test_the_card_shows_the_rendered_prompt(qalb_spec):
    from release import cards

    body = str(cards.render(qalb_spec, "bf16"))
    expected = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + qalb_spec.chat.system_prompt
                + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{user_message}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert f"```\n{expected}\n```" in body
