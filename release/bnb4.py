"""BF16 -> bitsandbytes 4-bit (NF4, double quantization, BF16 compute), streamed.

The output is what ``AutoModelForCausalLM.from_pretrained(bf16, quantization_config=...)`` followed
by ``save_pretrained`` writes: every linear projection of the decoder layers packed by
``bitsandbytes.functional.quantize_4bit`` with its quantization state stored beside it (``absmax``,
``quant_map``, ``nested_absmax``, ``nested_quant_map``, ``quant_state.bitsandbytes__nf4``), the
embeddings, norms and ``lm_head`` kept in BF16, and ``quantization_config`` in config.json. Unlike
that route, the model is never loaded: one tensor is quantized at a time.

A shard's safetensors header must precede its data, but the packed quantization state is a JSON
blob whose length is known only after quantizing (it holds the mean of the block maxima). So the
states go at the end of each shard's data and its header is rewritten, to the same length, once
they are known (see ``shards.ShardWriter``): every byte is written once and memory stays at one
tensor.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from release.artifacts import Manifest, Traits, peak_rss_mb, stage_dir, track, write_json
from release.errors import Bnb4Error
from release.shards import Entry, SafetensorsReader, ShardedWriter, model_files, row_blocks
from release.spec import Spec, Variant

STAGE = "bnb4"
TRAITS = Traits()
FORMAT = "bnb-4bit"
BLOCKSIZE = 64  # transformers' Params4bit default
NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for the double quantization of absmax
# transformers quantizes every nn.Linear except the output embedding (lm_head)
QUANTIZED = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj\.weight")
ROW_BLOCK_BYTES = 64 << 20
# the longest a packed quantization state can be: its only free field is a float's repr
_STATE_MAX = 256


def variant(spec: Spec) -> tuple[str, Variant] | None:
    return next(((k, v) for k, v in spec.variants.items() if v.format == FORMAT), None)


def quantization_config(v: Variant) -> dict:
    """``quantization_config`` exactly as transformers writes it into config.json."""
    from transformers import BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=v.dtype,
                             bnb_4bit_use_double_quant=v.double_quant,
                             bnb_4bit_compute_dtype=getattr(torch, v.compute_dtype or "bfloat16"))
    return json.loads(json.dumps(cfg.to_dict(), sort_keys=True))


def quantize_tensor(name: str, weight: torch.Tensor, v: Variant) -> list[tuple[str, torch.Tensor]]:
    """The tensors transformers saves for one quantized weight, in its key names."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(weight, blocksize=BLOCKSIZE, compress_statistics=v.double_quant,
                                    quant_type=v.dtype, quant_storage=torch.uint8)
    return [(name, packed), *((f"{name}.{k}", t) for k, t in state.as_dict(packed=True).items())]


def _estimate(name: str, shape: tuple[int, ...], dtype: torch.dtype, v: Variant) -> list[Entry]:
    """The tensors ``quantize_tensor`` will produce, for planning the shards: exact sizes, but for
    the packed quantization state's, which is its longest (a ``variable`` entry)."""
    if not QUANTIZED.fullmatch(name):
        return [Entry(name, dtype, shape)]
    n = math.prod(shape)
    blocks = -(-n // BLOCKSIZE)
    entries = [Entry(name, torch.uint8, ((n + 1) // 2, 1))]
    if v.double_quant:
        entries += [Entry(f"{name}.absmax", torch.uint8, (blocks,)),
                    Entry(f"{name}.nested_absmax", torch.float32, (-(-blocks // NESTED_BLOCKSIZE),)),
                    Entry(f"{name}.nested_quant_map", torch.float32, (256,))]
    else:
        entries.append(Entry(f"{name}.absmax", torch.float32, (blocks,)))
    return entries + [Entry(f"{name}.quant_map", torch.float32, (16,)),
                      Entry(f"{name}.quant_state.bitsandbytes__{v.dtype}", torch.uint8, (_STATE_MAX,),
                            variable=True)]


def _open_bf16(model_dir: Path) -> dict[str, SafetensorsReader]:
    """tensor name -> its reader, in name order; refused unless the projections are BF16."""
    try:
        sources = model_files(model_dir)
        files = {p: SafetensorsReader(p) for p in set(sources.values())}
    except (OSError, ValueError, KeyError) as e:
        raise Bnb4Error(f"{model_dir}: no readable safetensors model ({e}); build the merge stage first") from None
    if not sources:
        raise Bnb4Error(f"{model_dir}: no safetensors files; build the merge stage first")
    readers = {n: files[sources[n]] for n in sorted(sources)}
    if not any(QUANTIZED.fullmatch(n) for n in readers):
        raise Bnb4Error(f"{model_dir}: no Llama projection weights (model.layers.N.*_proj.weight) to quantize")
    for n, r in readers.items():
        if QUANTIZED.fullmatch(n) and r.dtype(n) != torch.bfloat16:
            raise Bnb4Error(f"{sources[n]}: {n} is {r.dtype(n)}, expected bfloat16; quantize the BF16 merge")
    return readers


def _reads(readers: dict[str, SafetensorsReader]) -> list[tuple[str, tuple[int, int] | None]]:
    """What to read, in order: projection weights whole (they are quantized whole), other tensors
    in row blocks of about ROW_BLOCK_BYTES."""
    out: list[tuple[str, tuple[int, int] | None]] = []
    for n, r in readers.items():
        shape = r.shape(n)
        if QUANTIZED.fullmatch(n) or not shape:
            out.append((n, None))
        else:
            row_bytes = math.prod(shape[1:]) * r.dtype(n).itemsize
            out += [(n, rows) for rows in row_blocks(shape[0], row_bytes, ROW_BLOCK_BYTES)]
    return out


def _write_tensors(readers: dict[str, SafetensorsReader], writer: ShardedWriter, v: Variant,
                   progress: bool) -> tuple[int, int]:
    """Quantize or copy every tensor into ``writer``; returns the quantized parameters and the
    bytes they take (packed weights and their states)."""
    params = packed = 0
    for n, rows in track(_reads(readers), progress, f"bnb 4-bit ({v.dtype})"):
        tensor = readers[n].read(n, rows)
        if QUANTIZED.fullmatch(n):
            for key, q in quantize_tensor(n, tensor, v):
                writer.write(key, q)
                packed += q.numel() * q.element_size()
            params += tensor.numel()
        else:
            writer.write(n, tensor)
        del tensor
    return params, packed


def quantize_model(model_dir: Path, out: Path, v: Variant, max_shard_bytes: int | None,
                   progress: bool = True) -> dict:
    """Write the 4-bit model of ``model_dir`` (BF16 safetensors) into ``out``; returns figures.
    One tensor is read, quantized and written at a time, the writing in the background."""
    model_dir, out = Path(model_dir), Path(out)
    readers = _open_bf16(model_dir)
    entries = [e for n, r in readers.items() for e in _estimate(n, r.shape(n), r.dtype(n), v)]
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    writer = ShardedWriter(out, entries, max_shard_bytes, background=True)
    try:
        params, packed = _write_tensors(readers, writer, v, progress)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return {"bytes": writer.bytes, "files": len(writer.names), "quantized_parameters": params,
            "bits_per_weight": round(8 * packed / params, 3),
            "seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": peak_rss_mb()}


def write_model_files(model_dir: Path, out: Path, v: Variant) -> None:
    """config.json with ``quantization_config``; generation config and tokenizer as in BF16."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    cfg["quantization_config"] = quantization_config(v)
    write_json(Path(out) / "config.json", cfg)
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(model_dir) / name).is_file():
            shutil.copyfile(Path(model_dir) / name, Path(out) / name)


# --- stage ------------------------------------------------------------------------------------


def run(spec: Spec, inputs: Mapping[str, Path], *, force: bool = False, progress: bool = True) -> Manifest:
    """Stage ``bnb4``: the spec's bitsandbytes variant of ``inputs["model"]``, the flagship BF16
    model."""
    from release.artifacts import run_stage

    model_dir = inputs["model"]
    found = variant(spec)
    if found is None:
        raise Bnb4Error(f"{spec.path}: no [variants.*] with format = '{FORMAT}'")
    key, v = found
    if v.dtype not in ("nf4", "fp4"):
        raise Bnb4Error(f"{spec.path}: variants.{key}.dtype: expected 'nf4' or 'fp4', got {v.dtype!r}")
    if not (Path(model_dir) / "config.json").is_file():
        raise Bnb4Error(f"{model_dir}: no config.json; build the merge stage first")

    def build(tmp: Path) -> dict:
        figures = quantize_model(Path(model_dir), tmp, v, spec.max_shard_bytes, progress)
        write_model_files(Path(model_dir), tmp, v)
        return figures

    return run_stage(STAGE, stage_dir(spec.build_dir, STAGE), build, release=spec.release.name,
                     inputs={"model": Path(model_dir)},
                     spec_sections={f"variants.{key}": spec.section_hash(f"variants.{key}"),
                                    "build.max_shard_size": spec.section_hash("build.max_shard_size")},
                     tools=("bitsandbytes", "torch", "transformers"), force=force)
