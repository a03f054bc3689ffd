"""Stage ``gguf``: HF Llama safetensors -> GGUF (F16 / BF16 / Q8_0), then llama.cpp's quant types.

The converter writes what llama.cpp's own ``convert_hf_to_gguf.py`` writes for a Llama 3.x model
(the tests compare the two tensor by tensor and key by key), using PyPI's ``gguf`` package:
``GGUFWriter`` for the file, its tensor-name map, its quantizers for Q8_0/BF16 and its
``SpecialVocab`` for merges and special tokens. Nothing is cloned or compiled at run time.

It streams: the header, metadata and tensor index go first, then every tensor is converted and
written in blocks of rows, so memory holds a few blocks, not the model. Quant types other than
F16/BF16/Q8_0 come from llama.cpp's quantizer itself, applied to the F16 file. When the spec names
a calibration text (``[variants.gguf.imatrix]``), the K- and IQ-quants are guided by an importance
matrix: llama.cpp's ``llama-imatrix`` runs the F16 file over that text, and ``llama-quantize
--imatrix`` quantizes (both built at install time, release/llamatools.py); other types go through
``llama_model_quantize`` in llama-cpp-python. Both paths call the same function of the same
libllama, so without an importance matrix they write the same bytes (the tests check).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from release import chat, children, shards
from release.artifacts import HashingFile, Manifest, Traits, atomic_path, full_disk_cause, output_sha256, stage_dir
from release.errors import GGUFError
from release.spec import CONVERTED, Spec

STAGE = "gguf"
TRAITS = Traits()
K_QUANTS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
IQ_QUANTS = ("IQ4_XS",)
# types whose blocks are 256 weights of a row (QK_K): rows must be multiples of 256
BLOCK_256 = (*K_QUANTS, *IQ_QUANTS)
# types quantized with the importance matrix when the spec has one
IMATRIX_TYPES = BLOCK_256
BLOCK_ELEMENTS = 4 * 1024 * 1024


@dataclass(frozen=True)
class Written:
    qtype: str
    path: Path
    bytes: int
    bits_per_weight: float
    seconds: float
    imatrix: bool = False  # an importance matrix guided the quantization


# --- metadata ---------------------------------------------------------------------------------


def general_metadata(spec: Spec) -> dict[str, object]:
    """``general.*`` values from the spec, in the form of llama.cpp's ``--metadata`` override
    file (the same dictionary feeds the reference converter in the tests)."""
    r = spec.release
    base_org, _, base_name = spec.base.model.rpartition("/")
    return {
        "general.name": r.name,
        "general.basename": r.basename,
        "general.finetune": r.finetune,
        "general.version": r.version,
        "general.organization": r.organization,
        "general.size_label": r.size_label,
        "general.license": r.license,
        "general.license.name": r.license_name,
        "general.license.link": r.license_link,
        "general.tags": list(r.tags),
        "general.languages": list(r.languages),
        "general.base_models": [{
            "name": base_name, "organization": base_org,
            "repo_url": f"https://huggingface.co/{spec.base.model}",
        }],
    }


def _add_general(w, meta: dict[str, object]) -> None:
    w.add_name(meta["general.name"])
    w.add_version(meta["general.version"])
    w.add_organization(meta["general.organization"])
    w.add_finetune(meta["general.finetune"])
    w.add_basename(meta["general.basename"])
    w.add_size_label(meta["general.size_label"])
    w.add_license(meta["general.license"])
    w.add_license_name(meta["general.license.name"])
    w.add_license_link(meta["general.license.link"])
    bases = meta["general.base_models"]
    w.add_base_model_count(len(bases))
    for i, b in enumerate(bases):
        w.add_base_model_name(i, b["name"])
        w.add_base_model_organization(i, b["organization"])
        w.add_base_model_repo_url(i, b["repo_url"])
    w.add_tags(meta["general.tags"])
    w.add_languages(meta["general.languages"])


def _add_sampling(w, model_dir: Path) -> None:
    """llama.cpp reads the recommended sampling from generation_config.json."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return
    g = json.loads(path.read_text(encoding="utf-8"))
    if "top_k" in g:
        w.add_sampling_top_k(g["top_k"])
    if "top_p" in g:
        w.add_sampling_top_p(g["top_p"])
    if "min_p" in g:
        w.add_sampling_min_p(g["min_p"])
    if "temperature" in g:
        w.add_sampling_temp(g["temperature"])
    if "repetition_penalty" in g:
        w.add_sampling_penalty_repeat(g["repetition_penalty"])


def _add_vocab(w, model_dir: Path, vocab_size: int) -> None:
    """Llama 3's BPE vocabulary as llama.cpp's converter writes it: ``gpt2`` model, ``llama-bpe``
    pre-tokenizer, every id's token and type, merges, special ids, add_bos, chat template."""
    import gguf
    from tokenizers import Tokenizer

    from release import llama3

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFError(f"{path}: missing; a Llama 3 tokenizer.json is needed")
    tok = Tokenizer.from_file(str(path))
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    patterns = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", [])]
    if llama3.SPLIT_PATTERN not in patterns:
        raise GGUFError(f"{path}: not the Llama 3 pre-tokenizer; only Llama 3 (llama-bpe) vocabularies are supported")
    vocab = tok.get_vocab(with_added_tokens=True)
    added = tok.get_added_tokens_decoder()
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True)
    special.chat_template = None  # the release's template is written once, by the caller
    # add_bos/add_eos as the tokenizer's post-processor does it (newer gguf-py reads both)
    single = _template_single(json.loads(path.read_text(encoding="utf-8")).get("post_processor"))
    if single is not None:
        special.add_special_token.setdefault("bos", any(tok.token_to_id(t) == special.special_token_ids.get("bos")
                                                        for t in single))
        special.add_special_token.setdefault("eos", any(tok.token_to_id(t) == special.special_token_ids.get("eos")
                                                        for t in single))
    # bos and eos first, in the order llama.cpp's converter writes them: the same file bytes
    first = {"bos": 0, "eos": 1}
    special.add_special_token = dict(sorted(special.add_special_token.items(), key=lambda kv: first.get(kv[0], 2)))
    special.add_to_gguf(w, quiet=True)


def _template_single(post: dict | None) -> list[str] | None:
    """Special tokens of a TemplateProcessing post-processor's single-sequence template."""
    if not post:
        return None
    for p in [post, *post.get("processors", [])]:
        if p.get("type") == "TemplateProcessing":
            return [item["SpecialToken"]["id"] for item in p["single"] if "SpecialToken" in item]
    return None


# --- tensors ----------------------------------------------------------------------------------


def permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order for its rope (``LlamaModel.permute``), for whole heads."""
    return (t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:])
            .swapaxes(1, 2).reshape(t.shape))


def llama3_rope_factors(hp: dict) -> torch.Tensor | None:
    """``rope_freqs``: per-frequency divisors of Llama 3.1's rope scaling, as llama.cpp computes
    them (float32), or None without llama3 scaling."""
    rp = hp.get("rope_parameters") or {**(hp.get("rope_scaling") or {}), "rope_theta": hp.get("rope_theta", 10000.0)}
    if (rp.get("rope_type") or "").lower() != "llama3":
        return None
    base = rp.get("rope_theta", 10000.0)
    dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rp.get("factor", 8.0), rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old = rp.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


@dataclass
class _Plan:
    gguf_name: str
    source: str | None  # safetensors tensor name, or None for a generated tensor
    shape: tuple[int, ...]  # torch order
    qtype: object  # gguf.GGMLQuantizationType
    heads: int = 0  # rows are permuted in groups of this many heads (q/k), else 0
    data: torch.Tensor | None = None


class _Streamed:
    """What GGUFWriter.write_tensor_data needs of an array (``nbytes``, ``tofile``), produced
    block by block when written."""

    def __init__(self, nbytes: int, blocks):
        self.nbytes = nbytes
        self._blocks = blocks

    def tofile(self, fout) -> None:
        written = 0
        for block in self._blocks():
            fout.write(np.ascontiguousarray(block).data)  # through fout: hashed on the way (HashingFile)
            written += block.nbytes
        if written != self.nbytes:
            raise GGUFError(f"wrote {written} bytes for a tensor of {self.nbytes}")


def convert(model_dir: Path, out_path: Path, spec: Spec, outtype: str = "F16", progress: bool = True) -> dict:
    """Write ``out_path`` (F16, BF16 or Q8_0) from the HF Llama folder ``model_dir``."""
    import gguf

    model_dir = Path(model_dir)
    if outtype not in CONVERTED:
        raise GGUFError(f"{outtype}: convert writes {', '.join(CONVERTED)}; other types are quantized from F16")
    try:
        hp = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GGUFError(f"{model_dir / 'config.json'}: unreadable ({e})") from None
    arch = (hp.get("architectures") or ["?"])[0]
    if arch != "LlamaForCausalLM" or hp.get("model_type") != "llama":
        raise GGUFError(f"{model_dir / 'config.json'}: architecture {arch!r} is not supported; "
                        "this converter writes Llama (LlamaForCausalLM) models")
    try:
        files = shards.model_files(model_dir)
        readers = {p: shards.SafetensorsReader(p) for p in sorted(set(files.values()))}
    except (OSError, ValueError, KeyError) as e:
        raise GGUFError(f"{model_dir}: unreadable or truncated safetensors ({e}); copy the model again") from None
    n_layers, n_head, n_kv = (hp["num_hidden_layers"], hp["num_attention_heads"],
                              hp.get("num_key_value_heads", hp["num_attention_heads"]))
    qtype = gguf.GGMLQuantizationType[outtype]
    ftype = gguf.LlamaFileType[f"MOSTLY_{outtype}"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)

    plan: list[_Plan] = []
    rope = llama3_rope_factors(hp)
    if rope is not None:
        plan.append(_Plan(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", None, tuple(rope.shape),
                          gguf.GGMLQuantizationType.F32, data=rope))
    # shard by shard, each shard's tensors by name: the order llama.cpp's converter writes them in
    shard = {p: i for i, p in enumerate(sorted(set(files.values())))}
    for name, path in sorted(files.items(), key=lambda item: (shard[item[1]], item[0])):
        if name.endswith(".rotary_emb.inv_freq"):
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise GGUFError(f"{path}: tensor {name!r} has no llama.cpp name; not a Llama model")
        shape = readers[path].shape(name)
        t = gguf.GGMLQuantizationType.F32 if len(shape) <= 1 or new.endswith("_norm.weight") else qtype
        heads = n_head if name.endswith("q_proj.weight") else n_kv if name.endswith("k_proj.weight") else 0
        plan.append(_Plan(new, name, shape, t, heads))

    # written beside its destination, synced and renamed: an interrupted run leaves no .gguf
    with atomic_path(Path(out_path)) as tmp:
        return _write(tmp, model_dir, hp, spec, plan, readers, files, ftype, outtype, progress)


def _write(path: Path, model_dir: Path, hp: dict, spec: Spec, plan: list, readers, files, ftype, outtype: str,
           progress: bool) -> dict:
    import gguf

    n_layers, n_head = hp["num_hidden_layers"], hp["num_attention_heads"]
    n_kv = hp.get("num_key_value_heads", n_head)
    class Writer(gguf.GGUFWriter):
        """gguf-py's writer, its file hashed as it is written (the stage reads it no more)."""

        def open_output_file(self, path: Path | None = None) -> None:
            super().open_output_file(path)
            self.fout = [f if isinstance(f, HashingFile) else HashingFile(f) for f in self.fout or []] or self.fout

    w = Writer(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_type(gguf.GGUFType.MODEL)
    _add_sampling(w, model_dir)
    _add_general(w, general_metadata(spec))
    w.add_block_count(n_layers)
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(hp.get("rope_theta", (hp.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_file_type(ftype)
    w.add_vocab_size(hp["vocab_size"])
    w.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // n_head)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)  # where llama.cpp's converter puts it: same bytes
    _add_vocab(w, model_dir, hp["vocab_size"])
    w.add_chat_template(chat.jinja_template(spec.chat))

    for p in plan:
        byte_shape = gguf.quant_shape_to_byte_shape(p.shape, p.qtype)
        w.add_tensor_info(p.gguf_name, byte_shape, np.uint8, math.prod(byte_shape), raw_dtype=p.qtype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    start = time.perf_counter()
    items = plan
    if progress:
        from rich.progress import track

        items = track(plan, description=f"GGUF {outtype}", transient=True)
    for p in items:
        w.write_tensor_data(_Streamed(w.tensors[0][p.gguf_name].nbytes, lambda p=p: _blocks(p, readers, files)))
    w.close()
    return {"seconds": round(time.perf_counter() - start, 2)}


def _blocks(p: _Plan, readers, files):
    import gguf

    if p.data is not None:
        yield gguf.quants.quantize(p.data.numpy(), p.qtype)
        return
    reader = readers[files[p.source]]
    rows = p.shape[0] if p.shape else 1
    cols = max(1, math.prod(p.shape[1:]))
    group = rows // p.heads if p.heads else 1  # permutation works on whole heads
    step = max(group, (BLOCK_ELEMENTS // cols) // group * group)
    for r0 in range(0, rows, step):
        rows_ = (r0, min(rows, r0 + step)) if p.shape else None
        t = reader.read(p.source, rows_).to(torch.float32)
        if p.heads:
            t = permute(t, t.shape[0] // group)
        yield gguf.quants.quantize(t.numpy(), p.qtype)


# --- quantization -----------------------------------------------------------------------------


_QUANTIZE = """
import ctypes, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
params.nthread = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def quantize(src: Path, dst: Path, qtype: str, threads: int = 0, imatrix: Path | None = None) -> None:
    """llama.cpp's own quantizer on a converted GGUF file: ``llama-quantize --imatrix`` when an
    importance matrix is given, else ``llama_model_quantize`` through llama-cpp-python. Either runs
    in a child process: llama.cpp logs every tensor, and its state stays out of ours."""
    import gguf

    ftype = int(gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    with atomic_path(Path(dst)) as tmp:
        if imatrix is None:
            cmd, cwd = [sys.executable, "-c", _QUANTIZE, str(src), str(tmp), str(ftype), str(threads)], None
        else:
            from release import llamatools

            # run beside the matrix and name it bare: the file records the name it was given
            cmd = [str(llamatools.tool("llama-quantize")), "--imatrix", Path(imatrix).name,
                   str(Path(src).resolve()), str(tmp.resolve()), qtype, *([str(threads)] if threads > 0 else [])]
            cwd = Path(imatrix).parent
        out = children.run(cmd, cwd=cwd, capture_output=True, text=True)
        if out.returncode != 0:
            last = ((out.stderr or out.stdout).strip().splitlines() or ["no output"])[-1]
            raise GGUFError(f"{dst}: llama.cpp's quantizer failed for {qtype} (exit {out.returncode}: {last})") \
                from full_disk_cause(tmp.parent)  # before the unfinished file goes and frees its space


def compute_imatrix(spec: Spec, source: Path, out: Path, progress: bool = True) -> dict:
    """llama.cpp's importance matrix of ``source`` (the F16/BF16 GGUF) over the spec's
    calibration text, written as ``<Name>-imatrix.gguf`` in ``out``; its figures.

    The tool runs in the spec's folder and is given the text's spec-relative path, which the
    matrix (and every file quantized with it) records as its dataset; one sequence per batch, so
    the sums, and the bytes, do not depend on the machine."""
    from gguf import GGUFReader

    from release import llamatools

    im = spec.gguf_imatrix()
    exe = llamatools.tool("llama-imatrix")
    dest = Path(out) / spec.imatrix_file_name()
    start = time.perf_counter()
    with atomic_path(dest) as tmp:
        cmd = [str(exe), "-m", str(Path(source).resolve()), "-f", im.calibration, "-o", str(tmp.resolve()),
               "-c", str(im.chunk_tokens), "-b", str(im.chunk_tokens), "--chunks", str(im.chunks or -1),
               "--no-ppl", "--no-repack", "-t", str(len(os.sched_getaffinity(0)))]
        _run_tool(cmd, spec.path.parent, f"importance matrix over {im.calibration}", progress)
    fields = GGUFReader(dest).fields
    chunks = int(fields["imatrix.chunk_count"].contents())
    return {"file": dest.name, "calibration": im.calibration, "chunk_tokens": im.chunk_tokens, "chunks": chunks,
            "tokens": chunks * im.chunk_tokens, "seconds": round(time.perf_counter() - start, 2)}


def _run_tool(cmd: list[str], cwd: Path, what: str, progress: bool) -> None:
    """Run a llama.cpp tool with its log kept out of the terminal: a spinner showing the tool's own
    estimate of the time left when ``progress``; a failure is one line, the tool's last words."""
    import collections
    import contextlib

    tail: collections.deque[str] = collections.deque(maxlen=20)
    status = contextlib.nullcontext()
    if progress:
        from rich.console import Console

        status = Console(stderr=True).status(what)
    with status as shown, children.popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True, errors="replace") as proc:
        for line in proc.stdout:
            if line.strip():
                tail.append(re.sub(r"^[\d.]+ [A-Z] ", "", line.strip()))  # without the log's time and level
            if shown is not None and "ETA" in line:  # "compute_imatrix: 41.2 seconds per pass - ETA 25.4 minutes"
                shown.update(f"{what}: {line.split('compute_imatrix:')[-1].strip()}")
    if proc.returncode != 0:
        written = Path(cmd[cmd.index("-o") + 1]).parent if "-o" in cmd else cwd
        raise GGUFError(f"{Path(cmd[0]).name} failed for the {what} (exit {proc.returncode}: "
                        f"{tail[-1] if tail else 'no output'})") from full_disk_cause(written)


def check_quantizable(model_dir: Path, qtypes: list[str]) -> None:
    """Refuse K- and IQ-quants a model's shapes would silently replace: llama.cpp falls back to
    another type for any weight whose rows are not a multiple of 256, and the file still says
    Q4_K_M (or IQ4_XS)."""
    ks = [q for q in qtypes if q in BLOCK_256]
    if not ks:
        return
    hp = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    for key in ("hidden_size", "intermediate_size"):
        if hp[key] % 256:
            raise GGUFError(f"{model_dir / 'config.json'}: {key} {hp[key]} is not a multiple of 256, so "
                            f"{', '.join(ks)} would fall back to other types; drop them from the spec")


def tensor_infos(path: Path) -> list[tuple[str, tuple[int, ...], str, int]]:
    """(name, shape, ggml type, bytes) of every tensor, read from the header alone."""
    return _header(path)[1]


def _header(path: Path) -> tuple[list[str], list[tuple[str, tuple[int, ...], str, int]]]:
    """The metadata keys and the tensor infos of a GGUF file.

    gguf's GGUFReader parses every metadata value into numpy objects, which takes seconds for a
    Llama 3 vocabulary; this skips over the values."""
    import struct

    import gguf

    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with open(path, "rb") as f:
        data = f.read(min(Path(path).stat().st_size, 64 << 20))
    pos = 4 + 4
    n_tensors, n_kv = struct.unpack_from("<QQ", data, pos)
    pos += 16

    def skip_value(vtype: int) -> None:
        nonlocal pos
        if vtype == 8:  # string
            (n,) = struct.unpack_from("<Q", data, pos)
            pos += 8 + n
        elif vtype == 9:  # array
            itype, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if itype in scalar:
                pos += scalar[itype] * count
            else:
                for _ in range(count):
                    skip_value(itype)
        else:
            pos += scalar[vtype]

    keys = []
    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", data, pos)
        keys.append(data[pos + 8:pos + 8 + n].decode())
        pos += 8 + n
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        skip_value(vtype)
    out = []
    for _ in range(n_tensors):
        (n,) = struct.unpack_from("<Q", data, pos)
        name = data[pos + 8:pos + 8 + n].decode()
        pos += 8 + n
        (n_dims,) = struct.unpack_from("<I", data, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", data, pos + 4)
        ttype, _offset = struct.unpack_from("<IQ", data, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        qtype = gguf.GGMLQuantizationType(ttype)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        out.append((name, tuple(reversed(dims)), qtype.name, math.prod(dims) // block * size))
    return keys, out


def describe(path: Path) -> dict:
    """Size, real bits per weight and tensor types of a GGUF file (a quant whose rows fell back to
    other types shows it here, whatever its name says), and whether an importance matrix guided
    it (llama-quantize records ``quantize.imatrix.*``)."""
    keys, infos = _header(path)
    params = sum(math.prod(shape) for _, shape, _, _ in infos)
    data = sum(n for *_, n in infos)
    types: dict[str, int] = {}
    for _, _, t, _ in infos:
        types[t] = types.get(t, 0) + 1
    return {"bytes": Path(path).stat().st_size, "parameters": params,
            "bits_per_weight": round(8 * data / params, 3), "tensor_types": types,
            "imatrix": "quantize.imatrix.file" in keys}


# --- stage ------------------------------------------------------------------------------------


def build(spec: Spec, model_dir: Path, out: Path, progress: bool = True) -> dict:
    """Every GGUF file of the spec into ``out``: the converted types, then llama.cpp's quants of
    the F16/BF16 one, with their sizes and bits per weight. Fidelity against BF16 is the verify
    stage's to measure, once, for every variant."""
    types = spec.gguf_types()
    check_quantizable(model_dir, types)
    source = next((t for t in types if t in ("F16", "BF16")), None)
    if source is None and any(t not in CONVERTED for t in types):
        raise GGUFError(f"{spec.path}: llama.cpp quant types need an F16 or BF16 GGUF to start from; "
                        "set variants.gguf.dtype to 'F16'")
    files: dict[str, Written] = {}
    figures: dict = {}
    imatrix = None  # computed before the first type that uses it
    for qtype in types:
        path = Path(out) / spec.gguf_file_name(qtype)
        start = time.perf_counter()
        if qtype in CONVERTED:
            convert(model_dir, path, spec, qtype, progress=progress)
        else:
            if imatrix is None and qtype in IMATRIX_TYPES and spec.gguf_imatrix() is not None:
                figures["imatrix"] = compute_imatrix(spec, Path(out) / spec.gguf_file_name(source), out, progress)
                imatrix = Path(out) / figures["imatrix"]["file"]
                start = time.perf_counter()  # the matrix has its own seconds
            quantize(Path(out) / spec.gguf_file_name(source), path, qtype,
                     imatrix=imatrix if qtype in IMATRIX_TYPES else None)
        d = describe(path)
        files[qtype] = Written(qtype, path, d["bytes"], d["bits_per_weight"], round(time.perf_counter() - start, 2),
                               d["imatrix"])
    figures["files"] = {q: {"file": wr.path.name, "bytes": wr.bytes, "bits_per_weight": wr.bits_per_weight,
                            "seconds": wr.seconds, "sha256": output_sha256(wr.path), "imatrix": wr.imatrix}
                        for q, wr in files.items()}
    return figures


def run(spec: Spec, inputs: Mapping[str, Path], *, force: bool = False, progress: bool = True) -> Manifest:
    """Stage ``gguf``: every GGUF type of the spec from ``inputs["model"]``, the flagship BF16
    model (or the folder ``./inv gguf --model DIR`` names)."""
    from release.artifacts import run_stage

    model_dir = inputs["model"]
    if not (Path(model_dir) / "config.json").is_file():
        raise GGUFError(f"{model_dir}: no config.json; build the merge stage first or give --model")
    sections = {k: spec.section_hash(k) for k in ("release", "base.model", "chat", "variants")}
    im = spec.gguf_imatrix()
    feeds = {"model": Path(model_dir), **({"calibration": spec.resolve(im.calibration)} if im else {})}
    return run_stage(STAGE, stage_dir(spec.build_dir, STAGE), lambda out: build(spec, Path(model_dir), out, progress),
                     release=spec.release.name, inputs=feeds, spec_sections=sections,
                     tools=("gguf", "llama-cpp-python", "torch", "transformers"), force=force)


def summary_rows(figures: dict) -> list[tuple[str, ...]]:
    """Type, file, size, bits/weight, sha256 and seconds of every GGUF file the stage wrote."""
    from release.artifacts import human_bytes

    return [(q, f["file"], human_bytes(f["bytes"]), f"{f['bits_per_weight']:.2f}", f["sha256"][:12],
             f"{f['seconds']:.1f}") for q, f in figures.items()]
