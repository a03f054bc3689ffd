"""Stage ``sft``: instruction fine-tuning, a LoRA on base + CPT over the curated chats.

The training loop is shared with CPT and lives in ``training/stages.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from release.artifacts import Manifest, Traits
from release.spec import Spec
from training import stages

STAGE = "sft"
TRAITS = Traits(image="train", gpu=True, distributed=True)


def run(spec: Spec, inputs: Mapping[str, Path], *, force: bool = False, progress: bool = True) -> Manifest:
    """``inputs``: ``base`` (the base model's folder), ``data`` (the data stage's folder) and
    ``cpt`` (the CPT adapter, merged into the base before SFT trains)."""
    return stages.run(spec, STAGE, inputs, force=force, progress=progress)
