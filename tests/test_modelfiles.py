"""Ollama Modelfiles: generated ones read back to the spec's values with Ollama's grammar, the
committed ones are current, broken ones are rejected with a line number, and a GGUF run with the
Modelfile's template and stops ends at the stop token in llama.cpp."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import gorender
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT
from release import gguf as G
from release import modelfiles, verify
from release.modelfiles import ModelfileError


def test_every_generated_modelfile_reads_back_to_the_spec(qalb_spec, demo_spec):
    for spec in (qalb_spec, demo_spec):
        for qtype in spec.gguf_types():
            text = modelfiles.render(spec, qtype)
            mf = modelfiles.read(text)
            assert mf == modelfiles.expected(spec, qtype)
            assert mf.model == f"./{spec.gguf_file_name(qtype)}"
            assert mf.system == spec.chat.system_prompt  # exact UTF-8
            assert mf.parameters == {
                "stop": ["<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
                "temperature": 0.1, "top_p": 0.9, "repeat_penalty": 1.1, "num_predict": 256,
                "num_ctx": spec.ollama.num_ctx,  # the spec's choice, not the training length
            }
            assert mf.license == [spec.license_text]


def test_committed_modelfiles_are_current(qalb_spec, tmp_path):
    """modelfiles/ holds exactly what the modelfiles stage writes (`./inv modelfiles` calls the
    stage's writer): the Modelfiles, the hf.co template/system/params files and the LICENSE."""
    written = modelfiles.write_all(qalb_spec, tmp_path)
    expected = {p.name: p.read_bytes() for p in written}
    on_disk = {p.name: p.read_bytes() for p in (ROOT / "modelfiles").iterdir() if p.is_file()}
    assert set(on_disk) == set(expected), "modelfiles/ is stale: run ./inv modelfiles"
    for name, data in expected.items():
        assert on_disk[name] == data, f"modelfiles/{name} is stale: run ./inv modelfiles"
    assert {"template", "system", "params", "LICENSE", "NOTICE", "8b-instruct-fp16.Modelfile"} <= set(expected)


def test_num_ctx_is_the_specs_in_every_modelfile_and_params(qalb_spec):
    """Not the training length (2048) and not the weights' 131,072: [ollama] num_ctx, with the
    reason in the spec. Changing the spec changes every file."""
    assert qalb_spec.ollama.num_ctx == 8192 != qalb_spec.training.sequence_length
    assert json.loads((ROOT / "modelfiles" / "params").read_text(encoding="utf-8"))["num_ctx"] == 8192
    for qtype in qalb_spec.gguf_types():
        text = (ROOT / "modelfiles" / modelfiles.modelfile_name(qalb_spec, qtype)).read_text(encoding="utf-8")
        assert "\nPARAMETER num_ctx 8192\n" in text
    other = replace(qalb_spec, ollama=replace(qalb_spec.ollama, num_ctx=16384))
    assert modelfiles.read(modelfiles.render(other, "Q4_K_M")).parameters["num_ctx"] == 16384
    assert json.loads(modelfiles.hf_files(other)["params"])["num_ctx"] == 16384


def test_hf_co_files_match_the_modelfile(qalb_spec):
    files = modelfiles.hf_files(qalb_spec)
    mf = modelfiles.read(modelfiles.render(qalb_spec, "Q4_K_M"))
    assert files["template"] == mf.template
    assert files["system"] == mf.system
    assert json.loads(files["params"]) == mf.parameters


def test_keywords_are_case_insensitive_and_quotes_follow_ollama():
    text = ('# comment\nfrom ./m.gguf\nparameter temperature 0.5\nParameter stop "<|eot_id|>"\n'
            'PARAMETER stop unquoted words\nsystem "two\nlines"\nTEMPLATE """  spaced  """\n'
            'MESSAGE user hello there\nlicense """a "quoted" word"""\n')
    mf = modelfiles.read(text)
    assert mf.model == "./m.gguf" and mf.parameters["temperature"] == 0.5
    assert mf.parameters["stop"] == ["<|eot_id|>", "unquoted words"]
    assert mf.system == "two\nlines" and mf.template == "  spaced  "
    assert mf.messages == [("user", "hello there")] and mf.license == ['a "quoted" word']


BROKEN = [
    ("FROM ./m.gguf\nPARAMETER temprature 0.1\n", 2, "unknown parameter 'temprature'"),
    ("FROM ./m.gguf\nPARAMETER num_ctx 2048.5\n", 2, "PARAMETER num_ctx: expected an integer, got '2048.5'"),
    ("FROM ./m.gguf\nPARAMETER top_p high\n", 2, "PARAMETER top_p: expected a number, got 'high'"),
    ("FROM ./m.gguf\nPARAMETER use_mmap maybe\n", 2, "PARAMETER use_mmap: expected true or false"),
    ('FROM ./m.gguf\nSYSTEM ok\nTEMPLATE """{{ .Prompt }}\nPARAMETER temperature 1\n', 3, "unterminated quoted value"),
    ('FROM ./m.gguf\nSYSTEM "never closed\n', 2, "unterminated quoted value"),
    ("PARAMETER temperature 0.1\nSYSTEM hi\n", None, "no FROM line"),
    ("FROM ./m.gguf\nTEMPERATURE 0.1\n", 2, "unknown command 'TEMPERATURE'"),
    ("FROM ./m.gguf\nMESSAGE robot hi\n", 2, "message role must be one of system, user, assistant"),
    ("FROM ./m.gguf\nPARAMETER temperature\n", 2, "parameter needs a name and a value"),
    ("FROM\n", 1, "command must be one of"),
]


@pytest.mark.parametrize("text,line,message", BROKEN)
def test_broken_modelfiles_are_rejected_with_a_line_number(text, line, message):
    with pytest.raises(ModelfileError) as err:
        modelfiles.read(text, "bad.Modelfile")
    where = f"bad.Modelfile:{line}: " if line else "bad.Modelfile: "
    assert str(err.value).startswith(where), str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize("value,message", [
    ('a line ending in """\nand more', 'cannot be quoted'),
    ('""" inside a line is fine', None),
    ("zero\u200cwidth non-joiner", "U+200C"),
    ("bell\x07", "U+0007"),
])
def test_values_that_cannot_be_quoted_are_errors(value, message):
    if message is None:  # Ollama's parser ends a value only at a line break
        quoted = modelfiles.quote(value, "SYSTEM", block=True)
        assert modelfiles.read(f"FROM x\nSYSTEM {quoted}\n").system == value
        return
    with pytest.raises(ModelfileError, match=message.replace("+", r"\+")):
        modelfiles.quote(value, "SYSTEM", block=True)


def test_unquotable_system_prompt_fails_the_render_not_the_file(demo_spec):
    bad = replace(demo_spec, chat=replace(demo_spec.chat, system_prompt='say """\nhi'))
    with pytest.raises(ModelfileError, match="chat.system_prompt: cannot be quoted"):
        modelfiles.render(bad, "Q4_K_M")


def test_check_task_reports_one_line_with_the_line_number(tmp_path):
    bad = tmp_path / "Modelfile"
    bad.write_text("FROM ./m.gguf\n\nPARAMETER num_predict lots\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "modelfiles", "--check",
                          str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"error: {bad}:3: PARAMETER num_predict: expected an integer, got 'lots'"
    good = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "modelfiles", "--check",
                           str(ROOT / "modelfiles" / "8b-instruct-q4_K_M.Modelfile")],
                          capture_output=True, text=True, cwd=ROOT)
    assert good.returncode == 0 and "ok: FROM ./Qalb-1.0-8B-Instruct-Q4_K_M.gguf" in good.stdout


def test_modelfiles_stage_writes_modelfiles_hf_files_and_license(demo_spec, tmp_path):
    written = {p.name for p in modelfiles.write_all(demo_spec, tmp_path)}
    assert written == {f"{demo_spec.ollama.tags[q]}.Modelfile" for q in demo_spec.gguf_types()} | {
        "template", "system", "params", "LICENSE", "NOTICE"}
    assert {"tiny-instruct-fp16.Modelfile", "tiny-instruct-q4_K_M.Modelfile"} <= written
    assert (tmp_path / "LICENSE").read_text(encoding="utf-8").startswith(" LLAMA 3.1 COMMUNITY LICENSE AGREEMENT")
    # the licence's attribution notice (§1.b.iii), from the spec
    assert (tmp_path / "NOTICE").read_text(encoding="utf-8") == (
        "Llama 3.1 is licensed under the Llama 3.1 Community License, Copyright \u00a9 Meta Platforms, Inc. "
        "All Rights Reserved.\n")


# --- the template and stops in a real runtime -------------------------------------------------

def _scripted_model(src: Path, dest: Path, chain: list[int]) -> None:
    """The tiny model rewired so that greedy decoding follows ``chain``: attention and MLP
    outputs are zeroed (each position's state is its token's embedding) and lm_head rows make
    token chain[i] predict chain[i+1]."""
    import shutil

    dest.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dest / f.name)
    t = load_file(src / "model.safetensors")
    for name in t:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            t[name] = torch.zeros_like(t[name])
    t["model.norm.weight"] = torch.ones_like(t["model.norm.weight"])
    emb = t["model.embed_tokens.weight"].float()
    head = torch.zeros_like(emb)
    for a, b in itertools.pairwise(chain):
        x = emb[a] / emb[a].pow(2).mean().sqrt()  # the RMS-normed state at token a
        head[b] += 4.0 * x / x.norm()
    t["lm_head.weight"] = head.to(torch.bfloat16)
    save_file(t, dest / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def scripted_ggufs(demo_spec, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("scripted")
    nl2 = 271  # "\n\n", the last token of every prompt
    words = [9906, 505, 110389]  # "Hello", " from", " السلام"
    eot, sh, eh, user = 128009, 128006, 128007, 882
    chains = {
        # ends its turn properly; past <|eot_id|> it would start the next turn
        "ends-turn": [nl2, *words, eot, sh, user, eh, nl2],
        # never ends its turn: writes a new header, the classic broken export
        "opens-header": [nl2, *words, sh, user, eh, nl2],
    }
    out = {}
    for name, chain in chains.items():
        _scripted_model(tiny_model, root / name, chain)
        gguf = root / f"{name}.gguf"
        G.convert(root / name, gguf, demo_spec, "F16", progress=False)
        out[name] = (gguf, words)
    return out


@pytest.mark.parametrize("name,reason", [("ends-turn", "eog"), ("opens-header", "stop:<|start_header_id|>")])
def test_modelfile_template_and_stops_end_generation_at_the_stop(demo_spec, scripted_ggufs, tmp_path, name, reason):
    gguf, words = scripted_ggufs[name]
    exe = gorender.build(tmp_path)
    mf = modelfiles.read(modelfiles.render(demo_spec, "F16"))
    (prompt,) = gorender.render(exe, mf.template, mf.system, [{"messages": [{"role": "user", "content": "سلام"}]}])
    llm = verify.load_gguf(gguf)
    gen = verify.generate_gguf(llm, prompt, mf.parameters["stop"], mf.parameters["num_predict"])
    assert gen.reason == reason
    assert gen.tokens[:3] == words
    assert gen.text == "Hello from السلام"
    for special in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "user"):
        assert special not in gen.text
    # Control: without the Modelfile's stops the same run writes the next header into the output.
    if name == "opens-header":
        leaked = verify.generate_gguf(llm, prompt, [], 8)
        assert "<|start_header_id|>user<|end_header_id|>" in leaked.text
