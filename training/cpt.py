"""Stage ``cpt``: continued pre-training, a LoRA on the base model over the curated CPT set.

The training loop is shared with SFT and lives in ``training/stages.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from release.artifacts import Manifest, Traits
from release.spec import Spec
from training import stages

STAGE = "cpt"
TRAITS = Traits(image="train", gpu=True, distributed=True)


def run(spec: Spec, inputs: Mapping[str, Path], *, force: bool = False, progress: bool = True) -> Manifest:
    """``inputs``: ``base`` (the base model's folder) and ``data`` (the data stage's folder)."""
    return stages.run(spec, STAGE, inputs, force=force, progress=progress)
