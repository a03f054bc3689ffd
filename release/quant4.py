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
they are known (see ``_Shard``): every byte is written once and memory stays at one tensor.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from release.errors import Quant4Error, StageError
from release.artifacts import Manifest, peak_rss_mb, track, write_json
from release.shards import INDEX, Entry, SafetensorsReader, file_names, header, model_files, plan
from release.spec import Spec, Variant

STAGE = "bnb4"
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
    """Upper bounds of the sizes ``quantize_tensor`` will produce, for planning the shards."""
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
                      Entry(f"{name}.quant_state.bitsandbytes__{v.dtype}", torch.uint8, (_STATE_MAX,))]


def _is_state(name: str) -> bool:
    return ".quant_state.bitsandbytes__" in name


class _Shard:
    """One output shard, written once, in place.

    The header must precede the data, and the packed quantization states' lengths are known only
    after quantizing. So the fixed-size tensors (their sizes follow from the shapes) are laid out
    first and written at their offsets as they come; the states (a few hundred bytes each) go at
    the end of the data. The header is written first with every state at its longest possible
    length, then rewritten once the states are known, padded with spaces to the same length
    (JSON allows the whitespace; safetensors pads its own headers the same way).
    """

    def __init__(self, path: Path, entries: list[Entry]):
        self.path = path
        self.fixed = [e for e in entries if not _is_state(e.name)]
        self.states: dict[str, torch.Tensor | None] = {e.name: None for e in entries if _is_state(e.name)}
        self.offsets: dict[str, tuple[int, Entry]] = {}
        offset = 0
        for e in self.fixed:
            self.offsets[e.name] = (offset, e)
            offset += e.nbytes
        blob = self._header({n: _STATE_MAX for n in self.states})
        self.header_bytes = len(blob)
        self.done = {e.name: 0 for e in self.fixed}
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(blob)) + blob)
        # the file is written by a thread while the next tensor is quantized (writes release the GIL)
        self.writer = ThreadPoolExecutor(max_workers=1)
        self.pending: Future | None = None

    def _header(self, state_lengths: dict[str, int], pad_to: int = 0) -> bytes:
        return header([*self.fixed, *(Entry(n, torch.uint8, (length,)) for n, length in state_lengths.items())],
                      pad_to=pad_to)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (a whole one, or the next rows of one) at its place."""
        if name in self.states:
            if tensor.dtype != torch.uint8 or tensor.dim() != 1 or tensor.numel() > _STATE_MAX:
                raise Quant4Error(f"{self.path.name}: {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                                  f"expected at most {_STATE_MAX} bytes")
            self.states[name] = tensor.clone()
            return
        if name not in self.offsets:
            raise Quant4Error(f"{self.path.name}: {name} was not planned for this shard")
        offset, e = self.offsets[name]
        if tensor.dtype != e.dtype or tuple(tensor.shape[1:]) != e.shape[1:] or \
                self.done[name] + tensor.numel() * tensor.element_size() > e.nbytes:
            raise Quant4Error(f"{self.path.name}: {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                              f"planned {e.dtype} {e.shape}")
        self._wait()  # at most one block in flight: memory stays at two blocks
        self.pending = self.writer.submit(self._write, 8 + self.header_bytes + offset + self.done[name],
                                          tensor.contiguous().view(torch.uint8).numpy())
        self.done[name] += tensor.numel() * tensor.element_size()

    def _write(self, position: int, data) -> None:
        self.file.seek(position)
        self.file.write(data.data)

    def _wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def finish(self) -> int:
        self._wait()
        self.writer.shutdown()
        short = [e.name for e in self.fixed if self.done[e.name] != e.nbytes]
        missing = [n for n, s in self.states.items() if s is None]
        if short or missing:
            self.file.close()
            raise Quant4Error(f"{self.path.name}: incomplete tensors {(short + missing)[:3]}")
        self.file.seek(8 + self.header_bytes + sum(e.nbytes for e in self.fixed))
        for s in self.states.values():
            self.file.write(s.numpy().tobytes())
        self.file.truncate()
        blob = self._header({n: s.numel() for n, s in self.states.items()}, pad_to=self.header_bytes)
        if len(blob) != self.header_bytes:  # cannot happen: every state and offset is at most its placeholder
            self.file.close()
            raise Quant4Error(f"{self.path.name}: header grew from {self.header_bytes} to {len(blob)} bytes")
        self.file.seek(8)
        self.file.write(blob)
        self.file.close()  # the stage syncs every output once, before its manifest
        return sum(e.nbytes for e in self.fixed) + sum(s.numel() for s in self.states.values())


def quantize_model(model_dir: Path, out: Path, v: Variant, max_shard_bytes: int | None,
                   progress: bool = True) -> dict:
    """Write the 4-bit model of ``model_dir`` (BF16 safetensors) into ``out``; returns figures."""
    model_dir, out = Path(model_dir), Path(out)
    sources = model_files(model_dir)
    if not sources:
        raise Quant4Error(f"{model_dir}: no safetensors files; build the merge stage first")
    readers = {p: SafetensorsReader(p) for p in set(sources.values())}
    names = sorted(sources)
    shapes = {n: readers[sources[n]].shape(n) for n in names}
    dtypes = {n: readers[sources[n]].dtype(n) for n in names}
    if not any(QUANTIZED.fullmatch(n) for n in names):
        raise Quant4Error(f"{model_dir}: no Llama projection weights (model.layers.N.*_proj.weight) to quantize")
    for n in names:
        if QUANTIZED.fullmatch(n) and dtypes[n] != torch.bfloat16:
            raise Quant4Error(f"{sources[n]}: {n} is {dtypes[n]}, expected bfloat16; quantize the BF16 merge")
    estimates = [e for n in names for e in _estimate(n, shapes[n], dtypes[n], v)]
    groups = plan(estimates, max_shard_bytes)
    files = file_names(len(groups))
    shard_of = {e.name: i for i, g in enumerate(groups) for e in g}
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    current: tuple[int, _Shard] | None = None
    weight_map: dict[str, str] = {}
    total = quantized_params = quantized_bytes = 0
    # reads: whole projection weights, other tensors in blocks of rows
    blocks: list[tuple[str, tuple[int, int] | None]] = []
    for n in names:
        shape = shapes[n]
        row_bytes = max(1, math.prod(shape[1:]) * dtypes[n].itemsize) if len(shape) > 1 else 0
        step = max(1, ROW_BLOCK_BYTES // row_bytes) if row_bytes else 0
        if QUANTIZED.fullmatch(n) or not step or shape[0] <= step:
            blocks.append((n, None))
        else:
            blocks += [(n, (r, min(r + step, shape[0]))) for r in range(0, shape[0], step)]
    for n, rows in track(blocks, progress, f"bnb 4-bit ({v.dtype})"):
        tensor = readers[sources[n]].read(n) if rows is None else readers[sources[n]].read(n, rows)
        i = shard_of[n]
        if current is None or current[0] != i:
            if current is not None:
                total += current[1].finish()
            current = (i, _Shard(out / files[i], groups[i]))
        shard = current[1]
        if QUANTIZED.fullmatch(n):
            for key, q in quantize_tensor(n, tensor, v):
                shard.add(key, q)
                weight_map[key] = files[i]
                quantized_bytes += q.numel() * q.element_size()
            quantized_params += math.prod(shapes[n])
        else:
            shard.add(n, tensor)
            weight_map[n] = files[i]
        del tensor
    if current is not None:
        total += current[1].finish()
    if len(files) > 1:
        write_json(out / INDEX, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return {"bytes": total, "files": len(files), "quantized_parameters": quantized_params,
            "bits_per_weight": round(8 * quantized_bytes / quantized_params, 3),
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


def stage_dir(spec: Spec) -> Path:
    return spec.build_dir / STAGE


def run(spec: Spec, model_dir: Path, *, force: bool = False, progress: bool = True) -> tuple[Manifest, bool]:
    """The spec's bitsandbytes variant of the BF16 model in ``model_dir``, as a stage."""
    from release.artifacts import run_stage

    found = variant(spec)
    if found is None:
        raise Quant4Error(f"{spec.path}: no [variants.*] with format = '{FORMAT}'")
    key, v = found
    if v.dtype not in ("nf4", "fp4"):
        raise Quant4Error(f"{spec.path}: variants.{key}.dtype: expected 'nf4' or 'fp4', got {v.dtype!r}")
    if not (Path(model_dir) / "config.json").is_file():
        raise Quant4Error(f"{model_dir}: no config.json; build the merge stage first")

    def build(tmp: Path) -> dict:
        figures = quantize_model(Path(model_dir), tmp, v, spec.max_shard_bytes, progress)
        write_model_files(Path(model_dir), tmp, v)
        return figures

    return run_stage(STAGE, stage_dir(spec), build, release=spec.release.name, inputs={"model": Path(model_dir)},
                     spec_sections={f"variants.{key}": spec.section_hash(f"variants.{key}"),
                                    "build.max_shard_size": spec.section_hash("build.max_shard_size")},
                     tools=("bitsandbytes", "torch", "transformers"), force=force)
