"""The libraries' known-harmless notices are dropped at their source inside ``known_notices()``;
every other message, of the same libraries or ours, still shows."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import warnings
from contextlib import contextmanager

import pytest

from conftest import ROOT
from release import llama3, quiet


@contextmanager
def heard(name: str):
    """The messages that reach logger ``name``'s handlers (its own records, after its filters,
    and its children's)."""
    got: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            got.append(record.getMessage())

    logger, handler = logging.getLogger(name), Keep(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield got
    finally:
        logger.removeHandler(handler)


def test_each_notice_is_dropped_at_its_logger_only_inside_the_block():
    for n in quiet.NOTICES:
        assert re.match(n.pattern, n.example), n.logger
        logger = logging.getLogger(n.logger)
        with heard(n.logger) as got, heard("release") as ours:
            with quiet.known_notices():
                logger.warning(n.example)  # dropped
                logger.warning("a real problem, then: " + n.example)  # same logger, another message
                logging.getLogger(n.logger + ".child").warning(n.example)  # another logger
                logging.getLogger("release").warning(n.example)  # ours
            logger.warning(n.example)  # after the block
        assert got == ["a real problem, then: " + n.example, n.example, n.example], n.logger
        assert ours == [n.example]
        assert not [f for f in logger.filters if isinstance(f, quiet._Drop)]


def test_warnings_are_untouched_inside_the_block():
    with quiet.known_notices(), pytest.warns(UserWarning, match="ours: a real warning"):
        warnings.warn("ours: a real warning", UserWarning, stacklevel=1)


# Triggers each notice from its real source (the import-time ones need a fresh process), then
# emits real messages; prints what decides which notices this machine produces.
SCRIPT = """
import json, logging, sys, warnings
from contextlib import nullcontext
from pathlib import Path
from release import quiet

with quiet.known_notices() if sys.argv[1] == "quiet" else nullcontext():
    from transformers import GenerationConfig
    GenerationConfig(do_sample=False, temperature=0.1, top_p=0.9)  # verification's greedy decoding
    import torch, torchao, bitsandbytes, gguf
    gguf.SpecialVocab(Path(sys.argv[2]), load_merges=True)
    if sys.argv[1] == "quiet":
        unsloth = quiet.import_unsloth()
    else:
        import unsloth
    from transformers.trainer_utils import sort_checkpoints  # the Trainer's checkpoint rotation
    for step in (1, 2):
        (Path(sys.argv[2]) / "run" / f"checkpoint-{step}").mkdir(parents=True, exist_ok=True)  # saved < 1 s apart
    sort_checkpoints(str(Path(sys.argv[2]) / "run"), use_mtime=True)
    logging.getLogger("torchao").warning("torchao: a real problem")
    logging.getLogger("gguf.vocab").warning("Unknown separator token '<|eot_id|>' in TemplateProcessing<pair>")
    warnings.warn("ours: a real warning", UserWarning)
from bitsandbytes.functional import has_avx512bf16
print(json.dumps({"device": unsloth.DEVICE_TYPE, "avx512bf16": bool(has_avx512bf16()),
                  "cuda_torch": torch.version.cuda is not None}))
"""
REAL = ["torchao: a real problem", "Unknown separator token '<|eot_id|>'", "ours: a real warning"]


def _expected(facts: dict) -> list[quiet.Notice]:
    """The notices this machine's libraries emit: all of them on a CPU with AVX512-BF16."""
    skip = {"bitsandbytes.backends.cpu.ops"} if not facts["avx512bf16"] else set()
    skip |= {"torchao"} if facts["cuda_torch"] else set()
    return [n for n in quiet.NOTICES if n.logger not in skip]


def test_the_libraries_notices_are_dropped_and_real_messages_kept(demo_spec, tokenizer_cache, tmp_path):
    """Both runs in fresh processes: without the filters each expected notice appears (so a
    library that rewords one fails here, not silently), with them none does."""
    llama3.write_tokenizer(tmp_path, llama3.build_tokenizer(tokenizer_cache), demo_spec.chat, 2048)
    procs = {mode: subprocess.Popen([sys.executable, "-c", SCRIPT, mode, str(tmp_path)], cwd=tmp_path,
                                    env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for mode in ("quiet", "loud")}
    out = {mode: p.communicate(timeout=600) for mode, p in procs.items()}
    for mode, p in procs.items():
        assert p.returncode == 0, out[mode][1][-3000:]
    facts = json.loads(out["quiet"][0].splitlines()[-1])
    loud, quiet_err = out["loud"][1], out["quiet"][1]
    for n in _expected(facts):
        assert re.search(n.pattern, loud), f"{n.logger} no longer says {n.example!r}: update release/quiet.py"
    for n in quiet.NOTICES:
        assert not re.search(n.pattern, quiet_err), (n.logger, quiet_err)
    order = "Unsloth should be imported before [transformers]"
    assert order in loud and (order in quiet_err) == (facts["device"] != "cpu")
    for text in REAL:
        assert text in quiet_err and text in loud, (text, quiet_err)


def test_the_libraries_bars_are_off_when_stderr_is_not_a_terminal(monkeypatch):
    """A pipe or a file gets every frame of a tqdm bar as another line: the switches the libraries
    read are set then (and what the caller set is kept); a terminal keeps its bars."""
    import io

    from release import quiet

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for name in quiet.BAR_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    assert quiet.bars_only_on_a_terminal(Terminal()) is False
    assert not any(name in os.environ for name in quiet.BAR_SWITCHES)
    monkeypatch.setenv("TQDM_DISABLE", "0")  # the caller's choice stands
    assert quiet.bars_only_on_a_terminal(io.StringIO()) is True
    assert os.environ["TQDM_DISABLE"] == "0"
    assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    # as the tasks run: tasks.py switches them before the libraries are imported (tqdm reads
    # TQDM_DISABLE when it is imported), so a piped run's bars are off, and a terminal's are not
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import tasks, tqdm, transformers.utils.logging as t; "
             "print(tqdm.tqdm(range(3)).disable, t.is_progress_bar_enabled())")
    env = {k: v for k, v in os.environ.items() if k not in quiet.BAR_SWITCHES}
    piped = subprocess.run([sys.executable, "-c", probe, str(ROOT)], capture_output=True, text=True, env=env)
    assert piped.stdout.split() == ["True", "False"], piped.stderr[-2000:]
