"""THE chat format of a release: one Llama 3 conversation layout, rendered two ways.

- ``jinja_template``: the ``chat_template`` for tokenizer_config.json and GGUF metadata
  (transformers' ``apply_chat_template``, llama.cpp);
- ``go_template``: the Ollama ``TEMPLATE`` (Go text/template with Ollama's variables).

Both produce, for the same conversation, the same text (the Jinja one starts with the BOS token,
which llama.cpp and Ollama add when they tokenize), so the ids are equal too. The layout is
Llama 3's: every turn is ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``.

Conversation semantics follow Ollama's, since Ollama cannot be changed and Jinja can:
- the default system prompt (the Modelfile's SYSTEM) is put first unless the conversation starts
  with a system message; all system messages are then joined with a blank line into one system
  turn, placed first (Ollama's chat handler and ``collate``); an empty one means the default;
- consecutive messages of the same role are merged with a blank line (Ollama's ``collate``);
- a generation prompt is the assistant header. In Ollama it follows a conversation that does
  not end with the assistant; a final assistant message is left open (no ``<|eot_id|>``) so
  the model continues it.
"""

from __future__ import annotations

import json

from release import llama3
from release.errors import TemplateError
from release.spec import Chat, unprintable

HEADER_START = "<|start_header_id|>"
HEADER_END = "<|end_header_id|>"


def _literal(text: str, where: str) -> str:
    """A double-quoted string literal valid in both Jinja and Go templates."""
    why = unprintable(text)
    if why:
        raise TemplateError(f"{where}: {why}")
    return json.dumps(text, ensure_ascii=False)


def jinja_template(chat: Chat) -> str:
    """The ``chat_template`` (Jinja) with the spec's default system prompt."""
    default = _literal(chat.system_prompt, "chat.system_prompt")
    eot = chat.eot_token
    return (
        "{{- bos_token }}\n"
        "{%- set systems = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | list %}\n"
        "{%- if not messages or messages[0]['role'] != 'system' %}"
        "{% set systems = [" + default + "] + systems %}{% endif %}\n"
        "{%- set system = systems | join('\\n\\n') %}\n"
        "{%- if not system %}{% set system = " + default + " %}{% endif %}\n"
        "{{- '" + HEADER_START + "system" + HEADER_END + "\\n\\n' + system + '" + eot + "' }}\n"
        "{%- set ns = namespace(prev='', open=false) %}\n"
        "{%- for message in messages %}\n"
        "{%- if message['role'] != 'system' %}\n"
        "{%- if message['role'] == ns.prev %}{{- '\\n\\n' + message['content'] }}\n"
        "{%- else %}\n"
        "{%- if ns.open %}{{- '" + eot + "' }}{% endif %}\n"
        "{{- '" + HEADER_START + "' + message['role'] + '" + HEADER_END + "\\n\\n' + message['content'] }}\n"
        "{%- set ns.open = true %}\n"
        "{%- endif %}\n"
        "{%- endif %}\n"
        "{%- set ns.prev = message['role'] %}\n"
        "{%- endfor %}\n"
        "{%- if ns.open %}{{- '" + eot + "' }}{% endif %}\n"
        "{%- if add_generation_prompt %}{{- '" + HEADER_START + "assistant" + HEADER_END + "\\n\\n' }}{% endif %}"
    )


def render(chat: Chat, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """``messages`` as the release's Jinja template renders them, with transformers' Jinja
    settings: the text a card shows and what the model was trained on."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(jinja_template(chat)).render(
        messages=messages, bos_token=chat.bos_token, add_generation_prompt=add_generation_prompt)


def go_template(chat: Chat) -> str:
    """The Ollama ``TEMPLATE``. Ollama passes ``.System`` (all system messages, joined) and
    ``.Messages`` (collated); ``.Prompt``/``.Response`` are the legacy single-turn variables."""
    default = _literal(chat.system_prompt, "chat.system_prompt")
    eot = chat.eot_token
    sys_turn = f"{HEADER_START}system{HEADER_END}\n\n{{{{ or .System {default} }}}}{eot}"
    return (
        "{{- if .Messages }}" + sys_turn + "\n"
        "{{- range $i, $m := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        "{{- if ne $m.Role \"system\" }}" + HEADER_START + "{{ $m.Role }}" + HEADER_END + "\n\n"
        "{{ $m.Content }}{{ if or (not $last) (ne $m.Role \"assistant\") }}" + eot + "{{ end }}\n"
        "{{- end }}\n"
        "{{- if and $last (ne $m.Role \"assistant\") }}" + HEADER_START + "assistant" + HEADER_END + "\n\n"
        "{{ end }}\n"
        "{{- end }}\n"
        "{{- else }}" + sys_turn + "\n"
        "{{- if .Prompt }}" + HEADER_START + "user" + HEADER_END + "\n\n{{ .Prompt }}" + eot + "{{ end }}"
        + HEADER_START + "assistant" + HEADER_END + "\n\n{{ .Response }}{{ if .Response }}" + eot + "{{ end }}\n"
        "{{- end }}"
    )


def ollama_stop_tokens(chat: Chat) -> list[str]:
    """Stop strings for Ollama: the spec's stop tokens, then the header tokens. Ollama matches
    stops on generated text, so a model that opens a new turn instead of ending its own is cut
    at the header rather than writing the user's next message."""
    out = list(chat.stop_tokens)
    for t in (HEADER_START, HEADER_END):
        if t not in out:
            out.append(t)
    return out


def eos_token_ids(chat: Chat) -> list[int]:
    """``generation_config.json`` eos ids: the tokenizer's eos token, then ``<|eot_id|>``."""
    ids = [llama3.SPECIAL_TOKENS[chat.eos_token], llama3.SPECIAL_TOKENS[chat.eot_token]]
    for t in chat.stop_tokens:
        if llama3.SPECIAL_TOKENS[t] not in ids:
            ids.append(llama3.SPECIAL_TOKENS[t])
    return ids
