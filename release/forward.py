"""The float32 forward of a Llama checkpoint, one decoder layer at a time: logits whose memory does
not grow with the model.

Verification measures the *weights* of every transformers variant (BF16, FP16, bitsandbytes NF4)
in float32 arithmetic, so that what it reports is the format's loss, not a runtime's rounding.
Loading an 8B model in float32 takes 32 GB. Here each decoder layer's tensors are read from the
safetensors files (``shards.SafetensorsReader``: file-backed maps, no copy), converted to float32
(NF4 projections dequantized by ``bitsandbytes.functional.dequantize_4bit`` from their stored
quantization state first), run through transformers' own ``LlamaDecoderLayer`` for every sequence,
and freed before the next layer is read. Anonymous memory is one layer in float32 (~0.9 GB at 8B
shapes), the hidden states of the sequences (positions x hidden x 4 bytes: 64 MB for 4,096
positions) and one sequence's logits; the embedding is gathered in its stored dtype (rows only)
and the output projection is applied in blocks of rows, so neither is ever whole in float32.

The arithmetic is the whole model's: the same modules (``LlamaDecoderLayer``, ``LlamaRMSNorm``,
``LlamaRotaryEmbedding``, ``create_causal_mask``), the same attention implementation as
``from_pretrained`` picks (SDPA), one sequence per call as the whole model runs it. The tests
compare both on the demo model (``tests/test_verify.py``).

Why not accelerate's big-model offload (``init_empty_weights`` + ``dispatch_model`` with an offload
folder): its hooks move each layer's weights in as one sequence reaches it, so every sequence would
read the whole model again (8 chunks x 16 GB at 8B), where running every sequence through a layer
before reading the next reads the model once; float32 arithmetic would need float32 copies of the
weights in its offload folder (32 GB written at 8B); and it has no notion of dequantizing NF4 from
the stored state, which is what measuring the 4-bit weights needs.

Everything takes one ``device``: ``"cuda"`` when torch sees a GPU, else ``"cpu"`` (``device()``);
the code path is the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from release import shards

HEAD_BLOCK_BYTES = 256 << 20  # float32 rows of the output projection converted at a time
# bitsandbytes stores a quantized weight's state beside it under these suffixes
_QUANT_STATE = (".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")


def device() -> str:
    """Where verification computes: the GPU when torch sees one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class Checkpoint:
    """A model folder's tensors by name, each read when asked for, and its transformers config."""

    def __init__(self, folder: Path):
        from transformers import AutoConfig

        self.folder = Path(folder)
        self.files = shards.model_files(self.folder)
        self._readers: dict[Path, shards.SafetensorsReader] = {}
        # the attention implementation from_pretrained picks by default: the same arithmetic
        self.config = AutoConfig.from_pretrained(self.folder, attn_implementation="sdpa")
        self.head = "lm_head.weight" if "lm_head.weight" in self.files else "model.embed_tokens.weight"

    def stored(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor (or rows of it) as stored: a read-only view of the file, nothing copied."""
        path = self.files[name]
        if path not in self._readers:
            self._readers[path] = shards.SafetensorsReader(path)
        return self._readers[path].read(name, rows)

    def float32(self, name: str, device: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The weight in float32 on ``device``: BF16 and FP16 convert exactly; a bitsandbytes
        4-bit weight is dequantized from its stored state (to its stored compute dtype) first."""
        state = next((name + s for s in _QUANT_STATE if name + s in self.files), None)
        if state is None:
            return self.stored(name, rows).to(device).float()
        import bitsandbytes.functional as F

        parts = {k[len(name) + 1:]: self.stored(k) for k in self.files if k.startswith(name + ".")}
        quant = F.QuantState.from_dict(parts, device=torch.device(device))
        return F.dequantize_4bit(self.stored(name).to(device), quant).float()

    def layer(self, index: int, device: str):
        """Decoder layer ``index`` as transformers' module, its weights in float32 on ``device``."""
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        prefix = f"model.layers.{index}."
        with torch.device("meta"):  # no random init: every parameter is assigned below
            module = LlamaDecoderLayer(self.config, index)
        names = [n for n, _ in module.named_parameters()]
        module.load_state_dict({n: self.float32(prefix + n, device) for n in names}, assign=True, strict=True)
        return module.eval()


def logits(ckpt: Checkpoint, sequences: list[list[int]], device: str,
           head_block_bytes: int = HEAD_BLOCK_BYTES) -> Iterator[tuple[int, torch.Tensor]]:
    """``(i, logits of sequences[i])`` for each sequence, logits float32 [length, vocab] on
    ``device``, as ``LlamaForCausalLM`` in float32 computes them for each sequence alone."""
    from transformers.masking_utils import create_causal_mask
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

    cfg = ckpt.config
    with torch.no_grad():
        table = ckpt.stored("model.embed_tokens.weight")
        # gather the rows in the stored dtype, then convert: exact, and the table stays on disk
        hidden = [table[torch.tensor(ids)].to(device).float()[None] for ids in sequences]
        del table  # its map goes with it
        rotary = LlamaRotaryEmbedding(cfg).to(device)
        context = []
        for h in hidden:
            position = torch.arange(h.shape[1], device=device)[None]
            context.append({"position_ids": position, "position_embeddings": rotary(h, position),
                            "attention_mask": create_causal_mask(config=cfg, inputs_embeds=h, attention_mask=None,
                                                                 past_key_values=None, position_ids=position)})
        for index in range(cfg.num_hidden_layers):
            layer = ckpt.layer(index, device)
            hidden = [layer(h, **c) for h, c in zip(hidden, context, strict=True)]
            del layer
        with torch.device("meta"):
            norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        norm.load_state_dict({"weight": ckpt.float32("model.norm.weight", device)}, assign=True)
        hidden = [norm(h)[0] for h in hidden]
        vocab, width = ckpt.stored(ckpt.head).shape
        blocks = shards.row_blocks(vocab, width * 4, head_block_bytes)
        for i, h in enumerate(hidden):
            out = torch.empty(h.shape[0], vocab, device=device)
            for r0, r1 in blocks:
                out[:, r0:r1] = torch.nn.functional.linear(h, ckpt.float32(ckpt.head, device, (r0, r1)))
            yield i, out
