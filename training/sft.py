"""Stage ``sft``: instruction fine-tuning, a LoRA on base + CPT over the curated chats.

The training loop is shared with CPT and lives in ``training/stages.py``.
"""

from training.stages import face

STAGE, folder, inputs, run = face("sft")
