"""Ollama Modelfiles: write them from the spec, and read/validate them with Ollama's grammar.

The reader follows Ollama's own parser (``parser/parser.go``) rune for rune: commands are
case-insensitive keywords; a value runs to the end of its line, or across lines inside ``"`` or
``\"\"\"`` quotes, and ends at the first line break where it is completely quoted; characters Go
does not consider printable are dropped (so text containing them cannot be written). On top of
the grammar it checks what ``ollama create`` would reject later: unknown parameters and values
of the wrong type (Ollama's ``FormatParams``), a missing FROM.

Every value the writer emits is parsed back and compared, so a value that cannot be quoted is an
error here instead of a broken Modelfile.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from release import chat
from release.artifacts import Manifest, Traits
from release.errors import ModelfileError
from release.spec import Spec, printable, unprintable

COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser",
            "parameter", "message", "requires")
# Ollama's Options (api/types.go): parameter -> type.
PARAMETERS: dict[str, type] = {
    "num_keep": int, "seed": int, "num_predict": int, "top_k": int, "top_p": float, "min_p": float,
    "typical_p": float, "repeat_last_n": int, "temperature": float, "repeat_penalty": float,
    "presence_penalty": float, "frequency_penalty": float, "stop": list,
    "num_ctx": int, "num_batch": int, "num_gpu": int, "main_gpu": int, "use_mmap": bool,
    "num_thread": int,
}
# Accepted by Ollama with a warning and ignored.
DEPRECATED = ("penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock",
              "mirostat", "mirostat_tau", "mirostat_eta", "tfs_z")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Command:
    name: str  # lower-case keyword; FROM is 'model', PARAMETER is the parameter's name
    args: str
    line: int


@dataclass
class Modelfile:
    """The values a Modelfile sets, as Ollama's create request would carry them."""

    model: str = ""
    template: str | None = None
    system: str | None = None
    license: list[str] = field(default_factory=list)
    parameters: dict[str, object] = field(default_factory=dict)
    messages: list[tuple[str, str]] = field(default_factory=list)


# --- reading ----------------------------------------------------------------------------------

_NIL, _NAME, _VALUE, _PARAMETER, _MESSAGE, _COMMENT = range(6)


def _unquote(s: str) -> tuple[str, bool]:
    if s[:3] == '"""':
        return (s[3:-3], True) if len(s) >= 6 and s[-3:] == '"""' else ("", False)
    if s[:1] == '"':
        return (s[1:-1], True) if len(s) >= 2 and s[-1] == '"' else ("", False)
    return s, True


def _go_trim(s: str) -> str:
    return s.strip(" \t\n\r\v\f\x85\xa0")


def parse(text: str, source: str = "Modelfile") -> list[Command]:
    """Commands of a Modelfile, by Ollama's grammar; ModelfileError on the first problem."""
    if text.startswith("\ufeff"):
        text = text[1:]
    commands: list[Command] = []
    state, buf, line, start = _NIL, [], 1, 1
    name, role = "", ""
    prev = ""

    def fail(at: int, msg: str) -> ModelfileError:
        return ModelfileError(f"{source}:{at}: {msg}")

    for ch in text:
        if ch == "\n" and prev != "\r" or ch == "\r":
            line += 1
        prev = ch
        # the state machine of parseRuneForState
        newline, space = ch in "\r\n", ch in " \t"
        if state == _NIL:
            nxt, keep = (_COMMENT, "") if ch == "#" else ((_NIL, "") if space or newline else (_NAME, ch))
        elif state == _NAME:
            if ch.isascii() and ch.isalpha():
                nxt, keep = _NAME, ch
            elif space:
                nxt, keep = _VALUE, ""
            else:
                raise fail(line - newline, "command must be one of " + ", ".join(c.upper() for c in COMMANDS))
        elif state == _VALUE:
            nxt, keep = (_NIL, ch) if newline or space else (_VALUE, ch)
        elif state in (_PARAMETER, _MESSAGE):
            ok = ch.isascii() and (ch.isalpha() or (state == _PARAMETER and (ch.isdigit() or ch == "_")))
            if ok:
                nxt, keep = state, ch
            elif space:
                nxt, keep = _VALUE, ""
            else:
                what = "parameter" if state == _PARAMETER else "message"
                raise fail(line - newline, f"{what} needs a name and a value on the same line")
        else:  # comment
            nxt, keep = (_NIL, "") if newline else (_COMMENT, "")

        if nxt != state:
            word = "".join(buf)
            if state == _NAME:
                lower = word.lower()
                if lower not in COMMANDS:
                    raise fail(line, f"unknown command {word!r}: must be one of "
                               + ", ".join(c.upper() for c in COMMANDS))
                start = line
                if lower == "from":
                    name = "model"
                elif lower == "parameter":
                    nxt = _PARAMETER
                elif lower == "message":
                    nxt, name = _MESSAGE, lower
                else:
                    name = lower
            elif state == _PARAMETER:
                name = word
            elif state == _MESSAGE:
                if word not in ROLES:
                    raise fail(line, f"message role must be one of {', '.join(ROLES)}, got {word!r}")
                role = word
            elif state == _VALUE:
                value, ok = _unquote(_go_trim(word))
                if not ok or space:
                    buf.append(ch)
                    continue
                if role:
                    value, role = f"{role}: {value}", ""
                commands.append(Command(name, value, start))
            buf = []
            state = nxt
        if keep and printable(keep):
            buf.append(keep)

    if state == _VALUE:
        value, ok = _unquote(_go_trim("".join(buf)))
        if not ok:
            raise fail(start, "unterminated quoted value (a \"\"\" or \" opened here is never closed)")
        if role:
            value = f"{role}: {value}"
        commands.append(Command(name, value, start))
    elif state not in (_NIL, _COMMENT):
        raise fail(line, "unexpected end of file: a command has no value")
    if not any(c.name == "model" for c in commands):
        raise ModelfileError(f"{source}: no FROM line: a Modelfile must say which model it builds on")
    return commands


def _typed(cmd: Command, source: str) -> object:
    kind = PARAMETERS[cmd.name]
    v = cmd.args
    try:
        if kind is int:
            if not re.fullmatch(r"[+-]?\d+", v):
                raise ValueError
            return int(v)
        if kind is float:
            if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|Inf|NaN)", v):
                raise ValueError
            return float(v)
        if kind is bool:
            return {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
                    "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}[v]
    except (ValueError, KeyError):
        names = {int: "an integer", float: "a number", bool: "true or false"}
        raise ModelfileError(f"{source}:{cmd.line}: PARAMETER {cmd.name}: expected {names[kind]}, got {v!r}") from None
    return v


def read(text: str, source: str = "Modelfile") -> Modelfile:
    """Parse and validate a Modelfile into the values Ollama would use."""
    mf = Modelfile()
    for cmd in parse(text, source):
        if cmd.name == "model":
            mf.model = cmd.args
        elif cmd.name == "template":
            mf.template = cmd.args
        elif cmd.name == "system":
            mf.system = cmd.args
        elif cmd.name == "license":
            mf.license.append(cmd.args)
        elif cmd.name == "message":
            role, _, content = cmd.args.partition(": ")
            mf.messages.append((role, content))
        elif cmd.name in ("adapter", "draft", "renderer", "parser", "requires"):
            continue
        elif cmd.name in DEPRECATED:
            continue
        elif cmd.name not in PARAMETERS:
            raise ModelfileError(f"{source}:{cmd.line}: unknown parameter {cmd.name!r} "
                                 f"(Ollama knows: {', '.join(sorted(PARAMETERS))})")
        elif PARAMETERS[cmd.name] is list:
            mf.parameters.setdefault(cmd.name, []).append(cmd.args)  # type: ignore[union-attr]
        else:
            mf.parameters[cmd.name] = _typed(cmd, source)
    return mf


def check_file(path: Path) -> Modelfile:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ModelfileError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ModelfileError(f"{path}: cannot read ({e.strerror})") from None
    return read(text, str(path))


# --- writing ----------------------------------------------------------------------------------


def quote(value: str, what: str, block: bool = False, bare: bool = False) -> str:
    """Quote ``value`` for a Modelfile (a triple-quoted block, ``"``, or ``bare`` for numbers); refuse
    what Ollama's parser would not read back."""
    why = unprintable(value)
    if why:
        raise ModelfileError(f"{what}: {why}")
    if block:
        candidates = [f'"""{value}"""']
    elif bare and value and not any(c in value for c in '\n"') and value == _go_trim(value):
        candidates = [value, f'"{value}"']
    else:
        candidates = [f'"{value}"', f'"""{value}"""']
    for text in candidates:
        try:
            cmds = parse(f"FROM x\nSYSTEM {text}\n")
        except ModelfileError:
            continue
        if len(cmds) == 2 and cmds[1].args == value:
            return text
    raise ModelfileError(f"{what}: cannot be quoted for a Modelfile (it contains '\"\"\"' or a quote "
                         "before a line break); change the text")


def parameters(spec: Spec) -> dict[str, object]:
    """The spec's inference parameters under Ollama's names, stops first (the ``params`` file
    of an hf.co GGUF repo has exactly these keys)."""
    inf = spec.inference
    return {
        "stop": chat.ollama_stop_tokens(spec.chat),
        "temperature": inf.temperature,
        "top_p": inf.top_p,
        "repeat_penalty": inf.repetition_penalty,
        "num_predict": inf.max_new_tokens,
        # the spec's context window (a memory/quality trade-off; Ollama's default differs by version)
        "num_ctx": spec.ollama.num_ctx,
    }


def render(spec: Spec, qtype: str) -> str:
    """The Modelfile for one GGUF file of the release."""
    tag = spec.ollama.tags[qtype]
    gguf = spec.gguf_file_name(qtype)
    lines = [
        f"# {spec.release.name} {qtype} for Ollama, from the GGUF repo {_gguf_repo(spec)}.",
        f"# Put this file next to {gguf}, then:",
        f"#   ollama create {spec.ollama.model}:{tag} -f {modelfile_name(spec, qtype)}",
        f"FROM ./{gguf}",
        f"TEMPLATE {quote(chat.go_template(spec.chat), 'TEMPLATE', block=True)}",
        f"SYSTEM {quote(spec.chat.system_prompt, 'chat.system_prompt', block=True)}",
    ]
    for key, value in parameters(spec).items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {key} {quote(_format(v), f'PARAMETER {key}', bare=not isinstance(v, str))}")
    lines.append(f"LICENSE {quote(spec.license_text, spec.release.license_file, block=True)}")
    return "\n".join(lines) + "\n"


def hf_files(spec: Spec) -> dict[str, str]:
    """The files ``ollama run hf.co/<repo>:<quant>`` reads from a GGUF repo: ``template`` (Go),
    ``system`` and ``params`` (JSON, the same keys as the Modelfile's PARAMETER lines)."""
    return {
        "template": chat.go_template(spec.chat),
        "system": spec.chat.system_prompt,
        "params": json.dumps(parameters(spec), indent=2, ensure_ascii=False) + "\n",
    }


def license_files(spec: Spec) -> dict[str, str]:
    """What the base's licence asks every copy to carry: its text (LICENSE) and its attribution
    notice (NOTICE, Llama 3.1 licence §1.b.iii), both from the spec."""
    return {"LICENSE": spec.license_text, "NOTICE": spec.license_terms.notice + "\n"}


def modelfile_name(spec: Spec, qtype: str) -> str:
    """Modelfiles are named after their Ollama tag, e.g. ``8b-instruct-q4_K_M.Modelfile``."""
    return spec.modelfile_name(qtype)


def expected(spec: Spec, qtype: str) -> Modelfile:
    """What ``read(render(spec, qtype))`` must give back."""
    params = parameters(spec)
    return Modelfile(
        model=f"./{spec.gguf_file_name(qtype)}", template=chat.go_template(spec.chat),
        system=spec.chat.system_prompt, license=[spec.license_text],
        parameters={k: (list(v) if isinstance(v, list) else v) for k, v in params.items()},
    )


def _gguf_repo(spec: Spec) -> str:
    return next(v.repo for v in spec.variants.values() if v.format == "gguf")


def _format(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


# --- stage ------------------------------------------------------------------------------------

STAGE = "modelfiles"
TRAITS = Traits()


def write_all(spec: Spec, out_dir: Path) -> list[Path]:
    """One Modelfile per GGUF type, the hf.co files, the LICENSE and the licence's NOTICE, each
    Modelfile parsed back first."""
    from release.artifacts import write_text

    out_dir = Path(out_dir)
    written = []
    for qtype in spec.gguf_types():
        text = render(spec, qtype)
        name = modelfile_name(spec, qtype)
        if read(text, name) != expected(spec, qtype):
            raise ModelfileError(f"{name}: does not read back to the spec's values")
        write_text(out_dir / name, text)
        written.append(out_dir / name)
    for name, text in {**hf_files(spec), **license_files(spec)}.items():
        write_text(out_dir / name, text)
        written.append(out_dir / name)
    return written


def run(spec: Spec, inputs: Mapping[str, Path], *, force: bool = False, progress: bool = True) -> Manifest:
    """Stage ``modelfiles``: ``write_all`` into the stage's folder. No other stage feeds this one
    (``inputs`` is empty): it reads the spec and the licence file the spec names."""
    from release.artifacts import run_stage, stage_dir

    sections = {k: spec.section_hash(k) for k in ("chat", "inference", "ollama", "variants", "release",
                                                   "license_terms")}
    return run_stage(STAGE, stage_dir(spec.build_dir, STAGE), lambda out: {"files": len(write_all(spec, out))},
                     release=spec.release.name, spec_sections=sections, force=force,
                     inputs={"license": spec.resolve(spec.release.license_file)})
