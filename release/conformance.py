"""What the runtimes read from a variant besides its weights, checked against the spec's chat
format: the chat template, the end-of-turn stop, the eos lists, the quant type, the Modelfile.

A model can be numerically perfect and still fail its users: a template that drops the system
prompt, a generation_config.json whose eos list lacks ``<|eot_id|>`` (transformers then writes
past the end of the answer), a Modelfile without ``PARAMETER stop "<|eot_id|>"``, or a Q2_K file
shipped under the Q4_K_M name. The verify stage runs these checks on every file that ships; each
problem is one phrase naming the file, and any problem fails the variant.
"""

from __future__ import annotations

import json
from pathlib import Path

from release import chat, llama3
from release.spec import Spec

# A conversation that every template must render as the release's does: a user turn with no
# system message (the default system prompt must appear), then the assistant's header.
PROBE = [{"role": "user", "content": "سلام"}]


def template_problems(rendered: str, spec: Spec, where: str) -> list[str]:
    """``rendered`` (``PROBE`` through a variant's template) against the release's rendering."""
    expected = chat.render(spec.chat, PROBE)
    if rendered == expected:
        return []
    if spec.chat.system_prompt not in rendered:
        return [f"{where}: renders without the system prompt"]
    if rendered.count(spec.chat.eot_token) < expected.count(spec.chat.eot_token):
        return [f"{where}: does not end each turn with {spec.chat.eot_token}"]
    return [f"{where}: renders differently from the release's template"]


def _stop_ids(spec: Spec) -> dict[str, int]:
    return {t: llama3.SPECIAL_TOKENS[t] for t in [spec.chat.eot_token, *spec.chat.stop_tokens]}


def _eos_problems(ids: object, spec: Spec, where: str) -> list[str]:
    have = set(ids if isinstance(ids, list) else [ids])
    lacking = [f"{t} ({i})" for t, i in _stop_ids(spec).items() if i not in have]
    return [f"{where}: eos_token_id {json.dumps(ids)} lacks {', '.join(lacking)}"] if lacking else []


def hf_problems(spec: Spec, folder: Path, tok) -> list[str]:
    """A transformers variant's folder: the eos lists of generation_config.json (what
    ``generate`` stops at) and config.json, and the chat template of tokenizer_config.json
    (``tok``: the folder's tokenizer)."""
    out = []
    for name in ("generation_config.json", "config.json"):
        path = Path(folder) / name
        try:
            ids = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError) as e:
            out.append(f"{path}: cannot read ({e})")
            continue
        out += _eos_problems(ids, spec, str(path))
    where = f"{Path(folder) / 'tokenizer_config.json'} chat_template"
    if not getattr(tok, "chat_template", None):
        return out + [f"{where}: missing"]
    out += template_problems(tok.apply_chat_template(PROBE, add_generation_prompt=True, tokenize=False), spec, where)
    return out


def gguf_problems(spec: Spec, path: Path, qtype: str, tok, modelfile: Path | None) -> list[str]:
    """A GGUF file as llama.cpp reads it (its vocabulary and metadata only): its quant type
    (``general.file_type``), whether <|eot_id|> ends a generation (llama.cpp's own judgement, from
    the file's eos/eot ids and token types), its embedded chat template (rendered with ``tok``, as
    ``--jinja`` renders it), and the Modelfile that ships beside it (``modelfile``: None when the
    spec writes none)."""
    import gguf
    import llama_cpp
    from llama_cpp._internals import LlamaModel  # the model alone: no context (which would log about n_ctx)

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = LlamaModel(path_model=str(path), params=params, verbose=False)
    try:
        meta = model.metadata()
        eot = llama3.SPECIAL_TOKENS[spec.chat.eot_token]
        ends = bool(llama_cpp.llama_vocab_is_eog(model.vocab, eot))
    finally:
        model.close()
    out = []
    want = getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}", None)
    got = meta.get(gguf.Keys.General.FILE_TYPE)
    if want is not None and got != str(int(want)):
        name = next((t.name.removeprefix("MOSTLY_") for t in gguf.LlamaFileType if str(int(t)) == got), got)
        out.append(f"{path}: general.file_type is {name}, not {qtype}")
    if not ends:
        out.append(f"{path}: llama.cpp does not end a generation at {spec.chat.eot_token} ({eot}); its eos/eot "
                   "token ids or token types are wrong")
    template = meta.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    where = f"{path} tokenizer.chat_template"
    if not template:
        out.append(f"{where}: missing")
    else:
        rendered = tok.apply_chat_template(PROBE, chat_template=template, add_generation_prompt=True, tokenize=False)
        out += template_problems(rendered, spec, where)
    if modelfile is not None:
        out += modelfile_problems(spec, modelfile, path.name)
    return out


def modelfile_problems(spec: Spec, path: Path, gguf_name: str) -> list[str]:
    """An Ollama Modelfile: FROM the file beside it, every stop token, the system prompt, and the
    release's TEMPLATE (compared as text: rendering Go templates needs Go)."""
    from release import modelfiles
    from release.errors import ModelfileError

    try:
        mf = modelfiles.check_file(path)
    except ModelfileError as e:
        return [str(e)]
    out = []
    if Path(mf.model or "").name != gguf_name:
        out.append(f"{path}: FROM {mf.model}, not ./{gguf_name}")
    stops = mf.parameters.get("stop", [])
    lacking = [t for t in _stop_ids(spec) if t not in stops]
    if lacking:
        out.append(f"{path}: no PARAMETER stop for {', '.join(lacking)}")
    if mf.system != spec.chat.system_prompt:
        out.append(f"{path}: SYSTEM is not the release's system prompt")
    template = mf.template or ""
    if template != chat.go_template(spec.chat):
        if ".System" not in template:
            out.append(f"{path}: TEMPLATE renders without the system prompt")
        elif spec.chat.eot_token not in template:
            out.append(f"{path}: TEMPLATE does not end each turn with {spec.chat.eot_token}")
        else:
            out.append(f"{path}: TEMPLATE differs from the release's")
    return out
