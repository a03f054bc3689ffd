"""The disk estimate (release/preflight.py): arithmetic on the base's shapes, checked against
llama.cpp's own sizes for Llama 3 8B and against what the demo release really writes."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, SPECS, write_spec
from release import preflight
from release.spec import load

LLAMA_31_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}


def test_shapes_count_llama_31_8b():
    s = preflight.shapes(LLAMA_31_8B)
    assert s.total == 8_030_261_248  # Llama 3.1 8B's parameter count
    assert s.embedding == 2 * 128256 * 4096 and s.layers == 32


def test_qalb_estimate_is_about_100_gb():
    """The figure the release needs in its build folder; the quant sizes reproduce the GiB that
    llama-quantize lists for Llama-3-8B (the table they come from)."""
    spec = load(SPECS / "qalb.toml")
    needs = preflight.estimate(spec, LLAMA_31_8B)
    by_what = {n.what.split(": ")[-1]: n.bytes for n in needs}
    assert abs(by_what["Qalb-1.0-8B-Instruct-Q4_K_M.gguf"] / 2**30 - 4.58) < 0.01
    assert by_what["Qalb-1.0-8B-Instruct-F16.gguf"] == 2 * 8_030_261_248 + preflight.GGUF_VOCAB_BYTES
    assert 95e9 < preflight.total(needs) < 125e9
    assert [n.where for n in needs if n.stage == "base"] == ["hub cache"]  # downloaded, not in build/


def test_an_impossible_release_is_refused_in_one_line_before_anything_is_built(tmp_path):
    """A spec whose base would not fit on any disk: `./inv release` stops at once, one line,
    naming the need, the free space and the fix; no stage folder is created."""
    text = (SPECS / "demo.toml").read_text(encoding="utf-8").replace('dir = "../build"', 'dir = "build"')
    text = text.replace("num_hidden_layers = 2\n", "num_hidden_layers = 200000\n")
    spec = write_spec(tmp_path, text)
    out = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "release", "--spec", str(spec)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    [line] = out.stderr.splitlines()
    assert line.startswith("error: the release needs ") and " free): " in line and "set build.dir" in line, line
    assert not (tmp_path / "build").exists() or not any((tmp_path / "build").rglob("manifest.json"))
