"""Stage ``cpt``: continued pre-training, a LoRA on the base model over the curated CPT set.

The training loop is shared with SFT and lives in ``training/stages.py``.
"""

from training.stages import face

STAGE, folder, inputs, run = face("cpt")
