"""Stage ``merge``: base model + PEFT LoRA adapters -> BF16 (and FP16) safetensors, streamed.

Each output tensor is made from its base tensor alone, in blocks of rows: read from the shard,
the adapters applied in order, written to its output shard. LoRA (``W + s B A``), DoRA (row
norms) and modules to save all work row by row, so peak memory is a few blocks of ~64 MB, not
the model nor even its largest tensor.

Numerics: PEFT's own (see below), so the result is what ``PeftModel.merge_and_unload`` gives,
bit for bit; each adapter's result is rounded to BF16, the weights the next stage trained on.

Adapter features: LoRA scaling ``alpha / r``, rsLoRA ``alpha / sqrt(r)``, ``rank_pattern`` and
``alpha_pattern`` (PEFT's matching), DoRA, ``modules_to_save`` (replace the base tensor), and
``fan_in_fan_out`` as PEFT treats it (ignored for ``nn.Linear`` weights, which is every Llama
projection). Everything else is refused before any file is written.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from release import chat, llama3, shards
from release.artifacts import Manifest, Traits, peak_rss_mb, run_stage, stage_dir, track, write_json
from release.errors import MergeError
from release.spec import Spec

STAGE = "merge"
TRAITS = Traits()
TOOLS = ("torch", "safetensors")
PREFIXES = ("base_model.model.",)
FP16_MAX = 65504.0
BLOCK_ELEMENTS = 4 * 1024 * 1024  # about 16 MB of float32 per block: see _blocks
# adapter_config.json settings that change what the adapter computes and that this merge does
# not implement; any of them set is refused.
UNSUPPORTED = ("use_qalora", "use_bdlora", "alora_invocation_tokens", "trainable_token_indices",
               "layer_replication", "target_parameters", "lora_bias")


@dataclass
class Lora:
    a: str  # tensor names in the adapter file
    b: str
    magnitude: str | None
    scale: float
    rank: int


@dataclass
class Adapter:
    folder: Path
    file: Path
    config: dict
    lora: dict[str, Lora] = field(default_factory=dict)  # base tensor name -> LoRA
    replace: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter tensor


# --- reading and checking ---------------------------------------------------------------------


def read_adapter(folder: Path, base_shapes: dict[str, tuple[int, ...]], expected_base: str | None = None) -> Adapter:
    """Parse and check one PEFT adapter folder against the base's tensor shapes."""
    folder = Path(folder)
    file = folder / "adapter_model.safetensors"
    adapter = Adapter(folder, file, _read_config(folder, expected_base))
    reader = _open(file)
    shapes = {k: reader.shape(k) for k in reader.keys()}
    for module, parts in sorted(_group(adapter, shapes, base_shapes).items()):
        adapter.lora[f"{module}.weight"] = _lora(adapter, module, parts, shapes, base_shapes)
    overlap = set(adapter.lora) & set(adapter.replace)
    if overlap:
        raise MergeError(f"{file}: {sorted(overlap)[0]} is both a LoRA target and a module to save")
    return adapter


def _read_config(folder: Path, expected_base: str | None) -> dict:
    """adapter_config.json, refused when it asks for something this merge does not do."""
    cfg_path, file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for p in (cfg_path, file):
        if not p.is_file():
            raise MergeError(f"{p}: missing; an adapter folder needs adapter_config.json and "
                             "adapter_model.safetensors (PEFT save_pretrained)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise MergeError(f"{cfg_path}: not valid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise MergeError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported; only LORA adapters merge")
    if cfg.get("bias", "none") != "none":
        raise MergeError(f"{cfg_path}: bias={cfg['bias']!r}: bias training is not supported; train with bias='none'")
    for key in UNSUPPORTED:
        if cfg.get(key):
            raise MergeError(f"{cfg_path}: {key}={cfg[key]!r} is not supported by this merge")
    base_id = cfg.get("base_model_name_or_path")
    if (expected_base and base_id and base_id != expected_base and not Path(base_id).exists()
            and re.fullmatch(r"[\w.-]+/[\w.-]+", base_id)):
        raise MergeError(f"{cfg_path}: adapter was made for {base_id!r}, not {expected_base!r}; "
                         "merge it into its own base")
    return cfg


def _group(adapter: Adapter, shapes: dict[str, tuple[int, ...]],
           base_shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, str]]:
    """The adapter's LoRA tensors by module (``a``, ``b``, ``m`` -> tensor name); modules to save
    go into ``adapter.replace``."""
    groups: dict[str, dict[str, str]] = {}
    for key in shapes:
        name = key
        for prefix in PREFIXES:
            name = name.removeprefix(prefix)
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)", name)
        if m:
            part = {"lora_A.weight": "a", "lora_B.weight": "b"}.get(m.group(2), "m")
            groups.setdefault(m.group(1), {})[part] = key
        elif name in base_shapes and adapter.config.get("modules_to_save"):
            if shapes[key] != base_shapes[name]:
                raise MergeError(f"{adapter.file}: {key} has shape {list(shapes[key])} but the base's {name} is "
                                 f"{list(base_shapes[name])}; the adapter was made for another base")
            adapter.replace[name] = key
        else:
            raise MergeError(f"{adapter.file}: tensor {key!r} is not a LoRA A/B/magnitude weight nor a module to "
                             "save of this base; unsupported adapter or another base")
    return groups


def _lora(adapter: Adapter, module: str, parts: dict[str, str], shapes: dict[str, tuple[int, ...]],
          base_shapes: dict[str, tuple[int, ...]]) -> Lora:
    """One module's LoRA, checked against the base weight and the config (rank, alpha, DoRA)."""
    file, cfg, cfg_path = adapter.file, adapter.config, adapter.folder / "adapter_config.json"
    target = f"{module}.weight"
    if "a" not in parts or "b" not in parts:
        raise MergeError(f"{file}: {module} has {'lora_A' if 'a' in parts else 'lora_B'} without its pair")
    if target not in base_shapes:
        raise MergeError(f"{file}: targets {module}, which the base model does not have; "
                         "the adapter was made for another base")
    (r, n_in), (n_out, r2) = shapes[parts["a"]], shapes[parts["b"]]
    w = base_shapes[target]
    if r != r2 or w != (n_out, n_in):
        raise MergeError(f"{file}: {module}: lora_B @ lora_A is {n_out}x{n_in} (rank {r}/{r2}) but the base "
                         f"weight is {w[0]}x{w[1]}; the adapter was made for another base")
    pattern_r = _pattern(cfg.get("rank_pattern") or {}, module, cfg.get("r", r))
    if pattern_r != r:
        raise MergeError(f"{cfg_path}: {module}: config says rank {pattern_r}, the weights have rank {r}")
    a = _pattern(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
    scale = a / math.sqrt(r) if cfg.get("use_rslora") else a / r
    magnitude = parts.get("m")
    if bool(magnitude) != bool(cfg.get("use_dora")):
        raise MergeError(f"{file}: {module}: use_dora={cfg.get('use_dora')} but magnitude vector "
                         f"{'present' if magnitude else 'missing'}")
    if magnitude and shapes[magnitude] != (n_out,):
        raise MergeError(f"{file}: {magnitude} has shape {list(shapes[magnitude])}, expected [{n_out}]")
    return Lora(parts["a"], parts["b"], magnitude, scale, r)


def _pattern(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first pattern whose regex matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _open(file: Path) -> shards.SafetensorsReader:
    try:
        return shards.SafetensorsReader(file)
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
        raise MergeError(f"{file}: unreadable or truncated safetensors file ({e}); copy it again") from None


# --- numerics ---------------------------------------------------------------------------------
# The arithmetic is PEFT's (LoraLayer.get_delta_weight, DoraLinearVariant.merge_unsafe), operation
# for operation, so the merged weights are PEFT's bits: the delta in float32 (``B @ A`` then the
# scaling), added to the weight in float32 and rounded to BF16 once. Row blocks give the same bits
# as whole matrices (float32 GEMM sums over the rank the same way for any number of rows >= 8).


def merge_lora(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    delta = (b.to(torch.float32) @ a.to(torch.float32)) * scale
    return delta.add_(w).to(torch.bfloat16)


def merge_dora(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
               magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA: ``m * (W + dW) / ||W + dW||``, the norm over each output row's input features."""
    v = ((b.to(torch.float32) @ a.to(torch.float32)) * scale).add_(w)
    norm = torch.linalg.norm(v, dim=1)
    return ((magnitude.to(torch.float32) / norm).view(-1, 1) * v).to(torch.bfloat16)


def _to_bf16(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.bfloat16 else t.to(torch.bfloat16)


def _blocks(shape: tuple[int, ...]) -> list[tuple[int, int] | None]:
    """Row ranges of about BLOCK_ELEMENTS values, split evenly, of at most ``max(16, BLOCK_ELEMENTS
    // columns)`` rows and so never fewer than 8 unless the tensor is smaller (a GEMM of a handful
    of rows may sum in another order than the whole matrix's); a scalar is read whole."""
    if not shape:
        return [None]
    return shards.row_blocks(shape[0], math.prod(shape[1:]), BLOCK_ELEMENTS, min_rows=16)


# --- the merge --------------------------------------------------------------------------------


def merge(base_dir: Path, adapter_dirs: list[Path], out_bf16: Path, *, chat_spec, inference,
          out_fp16: Path | None = None, max_shard_bytes: int | None = None, expected_base: str | None = None,
          progress: bool = True) -> dict:
    """Merge ``adapter_dirs`` in order into ``base_dir``; write BF16 (and FP16) model folders.
    Every input is checked before the first byte is written."""
    start = time.perf_counter()
    base, shapes, adapters = _open_inputs(base_dir, adapter_dirs, expected_base)
    w16 = _writer(out_bf16, torch.bfloat16, shapes, list(base), max_shard_bytes)
    w_fp16 = None if out_fp16 is None else _writer(out_fp16, torch.float16, shapes, list(base), max_shard_bytes)
    try:
        merged, replaced, overflow = _merge_tensors(base, shapes, adapters, w16, w_fp16, progress)
    except BaseException:
        for w in (w16, w_fp16):
            if w is not None:
                w.abort()
        raise
    w16.close()
    if w_fp16 is not None:
        w_fp16.close()
    if overflow:
        listed = ", ".join(f"{k} ({v})" for k, v in list(overflow.items())[:5])
        raise MergeError(f"FP16 variant: {sum(overflow.values())} values beyond float16's range ±65504 in "
                         f"{len(overflow)} tensors: {listed}; publish BF16 only or fix the adapter")

    for folder, dtype in ((out_bf16, "bfloat16"), (out_fp16, "float16")):
        if folder is not None:
            write_model_files(base_dir, folder, dtype, chat_spec, inference)
    return {
        "tensors": len(base), "lora_merged": merged, "replaced": replaced, "adapters": len(adapters),
        "bytes_written": w16.bytes + (w_fp16.bytes if w_fp16 else 0),
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mb": peak_rss_mb(),
    }


def _open_inputs(base_dir: Path, adapter_dirs: list[Path], expected_base: str | None) -> tuple[
        dict[str, shards.SafetensorsReader], dict[str, tuple[int, ...]],
        list[tuple[Adapter, shards.SafetensorsReader]]]:
    """The base's tensors (name -> reader, in the model's order), every base shape, and the
    adapters with their readers; all checked, nothing written."""
    for d in (base_dir, *adapter_dirs):
        if not Path(d).is_dir():
            raise MergeError(f"{d}: folder not found; give the base model or adapter folder")
    try:
        files = shards.model_files(base_dir)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise MergeError(f"{base_dir}: not a safetensors model folder ({e})") from None
    readers = {path: _open(path) for path in sorted(set(files.values()))}
    shapes = {k: r.shape(k) for r in readers.values() for k in r.keys()}
    missing = sorted(set(files) - set(shapes))
    if missing:
        raise MergeError(f"{base_dir}: index lists {missing[0]} but no shard holds it")
    adapters = [read_adapter(d, shapes, expected_base) for d in adapter_dirs]
    return {n: readers[f] for n, f in files.items()}, shapes, [(ad, _open(ad.file)) for ad in adapters]


def _writer(folder: Path, dtype: torch.dtype, shapes: dict[str, tuple[int, ...]], names: list[str],
            max_shard_bytes: int | None) -> shards.ShardedWriter:
    folder.mkdir(parents=True, exist_ok=True)
    return shards.ShardedWriter(folder, [shards.Entry(n, dtype, shapes[n]) for n in names], max_shard_bytes,
                                background=True)


def _merge_tensors(base: dict[str, shards.SafetensorsReader], shapes: dict[str, tuple[int, ...]],
                   adapters: list[tuple[Adapter, shards.SafetensorsReader]], w16: shards.ShardedWriter,
                   w_fp16: shards.ShardedWriter | None, progress: bool) -> tuple[int, int, dict[str, int]]:
    """Merge and write every tensor, block by block; returns the LoRAs merged, the tensors
    replaced by a module to save, and per tensor the values FP16 cannot hold."""
    overflow: dict[str, int] = {}
    merged = replaced = 0
    for name in track(list(base), progress, "merging tensors"):
        source, steps = _sources(name, base[name], adapters)
        for t in _merged_blocks(shapes[name], source, steps):
            w16.write(name, t)
            if w_fp16 is not None:
                big = int((t.float().abs() > FP16_MAX).sum())
                if big:
                    overflow[name] = overflow.get(name, 0) + big
                w_fp16.write(name, t.to(torch.float16))
            del t
        merged += len(steps)
        replaced += any(name in ad.replace for ad, _ in adapters)
    return merged, replaced, overflow


def _sources(name: str, base: shards.SafetensorsReader, adapters: list[tuple[Adapter, shards.SafetensorsReader]]
             ) -> tuple[tuple[shards.SafetensorsReader, str], list[tuple[Lora, shards.SafetensorsReader]]]:
    """Where tensor ``name`` starts (the base's, or the last module to save that replaces it: it
    replaces everything before it) and the LoRAs applied after that, in order."""
    first = max([i for i, (ad, _) in enumerate(adapters) if name in ad.replace], default=-1)
    source = (adapters[first][1], adapters[first][0].replace[name]) if first >= 0 else (base, name)
    return source, [(ad.lora[name], rd) for ad, rd in adapters[first + 1:] if name in ad.lora]


def _merged_blocks(shape: tuple[int, ...], source: tuple[shards.SafetensorsReader, str],
                   steps: list[tuple[Lora, shards.SafetensorsReader]]) -> Iterator[torch.Tensor]:
    """The merged tensor, block of rows after block of rows, in BF16."""
    reader, name = source
    a_full = [rd.read(lo.a) for lo, rd in steps]  # rank x in: small
    for block in _blocks(shape):
        t = _to_bf16(reader.read(name, block))
        for (lo, rd), a in zip(steps, a_full, strict=True):
            b = rd.read(lo.b, block)
            if lo.magnitude:
                t = merge_dora(t, a, b, lo.scale, rd.read(lo.magnitude, block))
            else:
                t = merge_lora(t, a, b, lo.scale)
        yield t


def write_model_files(base_dir: Path, out: Path, dtype: str, chat_spec, inference) -> None:
    """config.json, generation_config.json and the tokenizer with the release's chat template,
    in the form transformers 4.4x and 5.x both read."""
    cfg = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))
    eos = chat.eos_token_ids(chat_spec)
    write_json(out / "config.json", llama3.compatible_config(cfg, dtype, eos))
    write_json(out / "generation_config.json", {
        "bos_token_id": llama3.SPECIAL_TOKENS[chat_spec.bos_token],
        "eos_token_id": eos,
        "pad_token_id": llama3.SPECIAL_TOKENS[chat_spec.pad_token],
        "do_sample": inference.do_sample,
        "temperature": inference.temperature,
        "top_p": inference.top_p,
        "repetition_penalty": inference.repetition_penalty,
        "max_new_tokens": inference.max_new_tokens,
        "transformers_version": cfg.get("transformers_version", llama3.COMPATIBLE_TRANSFORMERS),
    })
    shutil.copyfile(Path(base_dir) / "tokenizer.json", out / "tokenizer.json")
    tok_cfg_path = Path(base_dir) / "tokenizer_config.json"
    max_len = 131072
    if tok_cfg_path.is_file():
        max_len = json.loads(tok_cfg_path.read_text(encoding="utf-8")).get("model_max_length", max_len)
    write_json(out / "tokenizer_config.json",
               llama3.tokenizer_config(chat_spec, max_len, chat.jinja_template(chat_spec)))
    write_json(out / "special_tokens_map.json", {
        "bos_token": chat_spec.bos_token, "eos_token": chat_spec.eos_token, "pad_token": chat_spec.pad_token})


# --- stage ------------------------------------------------------------------------------------


def subfolder(dtype: str) -> str:
    """The folder inside the stage's that holds the model of ``dtype``."""
    return {"bfloat16": "bf16", "float16": "fp16"}[dtype]


def run(spec: Spec, inputs: Mapping[str, Path], *, force: bool = False, progress: bool = True) -> Manifest:
    """Stage ``merge``: ``inputs["base"]`` (the base model's folder) plus the adapters
    ``inputs["adapter0"]``, ``["adapter1"]``, ... merged in that order."""
    adapters = [inputs[k] for k in sorted(inputs, key=_adapter_index) if k.startswith("adapter")]
    return run_merge(spec, inputs["base"], adapters, stage_dir(spec.build_dir, STAGE), force=force,
                     progress=progress)


def _adapter_index(key: str) -> int:
    return int(key.removeprefix("adapter")) if key.startswith("adapter") else -1


def run_merge(spec: Spec, base_dir: Path, adapters: list[Path], out: Path, *, force: bool = False,
              progress: bool = True) -> Manifest:
    """Merge into ``out``/bf16 (and ``out``/fp16 when the spec has an FP16 variant), as a stage:
    built aside, manifest last, skipped when nothing changed."""
    for d in (base_dir, *adapters):
        if not Path(d).is_dir():
            raise MergeError(f"{d}: folder not found; give the base model or adapter folder")
    fp16 = any(v.format == "safetensors" and v.dtype == "float16" for v in spec.variants.values())
    sections = {k: spec.section_hash(k) for k in ("chat", "inference", "variants", "build.max_shard_size")}
    found = {"base": Path(base_dir), **{f"adapter{i}": Path(a) for i, a in enumerate(adapters)}}

    def build(tmp: Path) -> dict:
        return merge(Path(base_dir), [Path(a) for a in adapters], tmp / subfolder("bfloat16"),
                     out_fp16=tmp / subfolder("float16") if fp16 else None,
                     chat_spec=spec.chat, inference=spec.inference, max_shard_bytes=spec.max_shard_bytes,
                     expected_base=spec.base.model, progress=progress)

    return run_stage(STAGE, Path(out), build, release=spec.release.name, inputs=found, spec_sections=sections,
                     tools=TOOLS, force=force)
