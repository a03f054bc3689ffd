"""Known-harmless notices of the libraries we call, dropped where they are emitted; nothing else.

A release run imports torch, torchao, bitsandbytes, transformers, gguf-py and Unsloth, and each
has something to say on stderr that is not about the release. Each of ``NOTICES`` is matched by
the logger that emits it and by its exact text, and is dropped only inside ``known_notices()``
(every task runs its work there): an unlisted message, even from the same logger, and every
warning of our own still shows. Unsloth's import-order warning is a ``warnings`` one that is void
on one backend only, so ``import_unsloth`` decides it once the backend is known.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Notice:
    logger: str  # the logger that emits it (records of child loggers are not matched)
    pattern: str  # matched from the start of the formatted message
    example: str  # the message as it was seen
    why: str  # what it is and why it needs no action


NOTICES: tuple[Notice, ...] = (
    Notice("torchao", r"Failed to load .*torchao.*_C\w*[^/\\]*\.so: ",
           "Failed to load /venv/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: "
           "Could not load this library: /venv/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-"
           "linux-gnu.so",
           "torchao's wheel carries CUDA extensions (mxfp8, CUTLASS sm90a) that link against torch's "
           "CUDA libraries; a CPU build of torch has none, so they are skipped. Nothing here uses them "
           "(4-bit is bitsandbytes', GGUF quants are llama.cpp's)."),
    Notice("torch.utils._pytree", r"<enum '\w+'> is an Enum subclass and is now natively supported by torch.compile",
           "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile as an "
           "opaque value type. Calling register_constant() on Enum subclasses is deprecated and will be an error "
           "in a future release.",
           "torchao registers its enums (KernelPreference, ScaleCalculationMode) as pytree constants, "
           "which this torch supports natively: a deprecation addressed to torchao, not to its users."),
    Notice("bitsandbytes.backends.cpu.ops",
           r"Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'",
           "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make "
           "sure you already `pip install kernels` and the kernels >= 0.11.1",
           "on CPUs with AVX512-BF16 bitsandbytes tries an optional kernel that the `kernels` package "
           "downloads from the Hub, and otherwise uses its own compiled 4-bit CPU kernel (what runs here)."),
    Notice("gguf.vocab", r"Unknown separator token '<\|begin_of_text\|>' in TemplateProcessing<pair>",
           "Unknown separator token '<|begin_of_text|>' in TemplateProcessing<pair>",
           "Llama 3's tokenizer marks a second sequence of a pair with <|begin_of_text|>; GGUF has no key "
           "for it and gguf-py (like llama.cpp's converter) leaves it out. Chat prompts are single sequences."),
    Notice("transformers.generation.configuration_utils",
           r"The following generation flags are not valid and may be ignored: "
           r"\['(temperature|top_p|top_k|min_p)'(, '(temperature|top_p|top_k|min_p)')*\]",
           "The following generation flags are not valid and may be ignored: ['temperature', 'top_p']. "
           "Set `TRANSFORMERS_VERBOSITY=info` for more details.",
           "verification decodes greedily on purpose, while the release's generation_config.json holds "
           "the sampling settings for users: transformers says that temperature/top_p are unused."),
    Notice("transformers.trainer_utils",
           r"mtime may not be reliable on this filesystem, falling back to numerical ordering",
           "mtime may not be reliable on this filesystem, falling back to numerical ordering",
           "the Trainer orders checkpoints by mtime when it rotates them, and when two were saved less "
           "than a second apart (tiny models on a fast machine) it orders them by step number instead, "
           "which is the order the release resumes from anyway."),
)

# Unsloth warns when transformers was imported first. On its CPU backend ("stock transformers +
# PEFT + TRL", unsloth/_cpu_init.py) it patches nothing, so the order cannot matter there.
UNSLOTH_IMPORT_ORDER = re.compile(r"WARNING: Unsloth should be imported before \[")


class _Drop(logging.Filter):
    """Drops a logger's records whose message matches one of ``patterns``."""

    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


@contextmanager
def known_notices() -> Iterator[None]:
    """Within the block, the ``NOTICES`` are dropped at their loggers (import-time ones too, as
    long as the import happens inside). The filters are removed on exit."""
    by_logger: dict[str, list[str]] = {}
    for n in NOTICES:
        by_logger.setdefault(n.logger, []).append(n.pattern)
    installed = [(logging.getLogger(name), _Drop(patterns)) for name, patterns in by_logger.items()]
    for logger, f in installed:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger, f in installed:
            logger.removeFilter(f)


def import_unsloth():
    """``import unsloth``, showing every warning it raises except the import-order one when it
    chose its CPU backend (see ``UNSLOTH_IMPORT_ORDER``); on a GPU that one is real and shows.

    The warnings are held (not caught with ``catch_warnings``, which would also undo the warning
    filters Unsloth installs while importing) and shown once the backend is known."""
    shown = warnings.showwarning
    held: list[tuple] = []

    def hold(*args, **kwargs):
        held.append((args, kwargs))

    warnings.showwarning = hold
    try:
        import unsloth
    finally:
        if warnings.showwarning is hold:
            warnings.showwarning = shown
        cpu = getattr(sys.modules.get("unsloth"), "DEVICE_TYPE", None) == "cpu"
        for args, kwargs in held:
            message, category = args[0], args[1]
            if not (cpu and issubclass(category, UserWarning) and UNSLOTH_IMPORT_ORDER.match(str(message))):
                shown(*args, **kwargs)
    return unsloth


def silence_open_bars() -> bool:
    """Silence the tqdm bars an interrupt left open (the trainer's, a download's): they would
    draw their last frame at exit, after the interrupt's one line. True when there were any, so
    the line they were drawn on is unfinished."""
    tqdm = sys.modules.get("tqdm.std")  # loaded only if a library drew a bar
    bars = list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()))
    for bar in bars:
        bar.disable = True
    return bool(bars)


# The libraries' own progress bars (tqdm: datasets' "Map", transformers' "Loading weights", the
# trainer's steps, downloads) and the switches each reads at import.
BAR_SWITCHES = {"TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def bars_only_on_a_terminal(stream=None) -> bool:
    """Turn the libraries' progress bars off when ``stream`` (stderr) is not a terminal: piped
    into a file or CI log, each redraw is another line of ``0%|...``. Set in the environment, so
    imports not yet made, and the processes started from here (the training workers), see it too;
    a container's task decides alike (its stderr is not a terminal either). A value the caller
    set is kept. True when the bars were turned off."""
    import os

    stream = stream if stream is not None else sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return False
    for name, value in BAR_SWITCHES.items():
        os.environ.setdefault(name, value)
    return True
