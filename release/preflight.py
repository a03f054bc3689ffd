"""Preflight: how much disk a release writes, estimated from the spec and the base's config.json
and checked before anything is built.

The 8B release writes about 100 GB (base, adapters and checkpoints, BF16, FP16, NF4, GGUF F16 and
its quants); finding out that the disk is full hours into a run loses the run. The estimate is
arithmetic on the model's shapes: parameter counts times bytes per parameter of each format. GGUF
quant sizes use the file sizes llama.cpp's own ``llama-quantize`` lists for Llama-3-8B, so the
per-type mixes (a Q6_K output tensor in Q4_K_M, ...) are included. What a stage removes when it
finishes (trainer checkpoints, SFT's merged base + CPT, verification's reference log-probs) is
counted once, at the peak, not summed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from release.errors import StageError
from release.spec import Spec

GIB = 1 << 30
# llama-quantize's type table (tools/quantize/quantize.cpp): file size at Llama-3-8B (8.03B
# parameters), in GiB; IQ4_XS is listed as 4.25 bits per weight, plus the Q6_K output tensor.
_LLAMA3_8B_PARAMETERS = 8.03e9
_GIB_AT_LLAMA3_8B = {"Q2_K": 2.96, "Q3_K_S": 3.41, "Q3_K_M": 3.74, "Q3_K_L": 4.03, "Q4_K_S": 4.37,
                     "Q4_K_M": 4.58, "Q5_K_S": 5.21, "Q5_K_M": 5.33, "Q6_K": 6.14, "Q8_0": 7.96,
                     "Q4_0": 4.34, "Q4_1": 4.78, "Q5_0": 5.21, "Q5_1": 5.65, "IQ4_XS": 4.15}
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes, an 8-bit absmax per 64, an fp32 one per 256 blocks
COMPRESSED = (".gz", ".zst", ".zstd", ".bz2", ".xz")
TEXT_EXPANSION = 4  # raw UTF-8 text is about 4x its gzip/zstd size
BYTES_PER_TOKEN = 5  # raw UTF-8 per Llama 3 token on Qalb's corpus (about 10 GB for 2B tokens)
# Llama 3's vocabulary, written beside the weights of every variant: tokenizer.json (indented, as
# transformers saves it) with tokenizer_config.json (the chat template) in a safetensors folder;
# its 128,256 tokens, their types and 280,147 merges as metadata in every GGUF file.
TOKENIZER_BYTES = 17_262_004
GGUF_VOCAB_BYTES = 7_820_823
BITS_PER_WEIGHT = {"F16": 16.0, "BF16": 16.0,
                   **{q: (gib * GIB - GGUF_VOCAB_BYTES) * 8 / _LLAMA3_8B_PARAMETERS
                      for q, gib in _GIB_AT_LLAMA3_8B.items()}}


@dataclass(frozen=True)
class Shapes:
    """Parameter counts of a Llama model, from its config.json."""

    total: int
    linear: int  # the decoder layers' projections (what LoRA targets and NF4 quantizes)
    embedding: int  # embed_tokens (and lm_head again when untied)
    vocab: int
    hidden: int
    layers: int
    lora_dims: dict[str, int]  # projection -> in + out features (a rank-r LoRA has r times as many)


@dataclass(frozen=True)
class Need:
    stage: str
    what: str
    bytes: int
    transient: bool = False  # removed when the stage finishes
    where: str = "build"  # "build" or "hub cache"


def shapes(config: dict) -> Shapes:
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    hd = config.get("head_dim") or h // heads
    dims = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    linear = layers * sum(i * o for i, o in dims.values())
    embedding = config["vocab_size"] * h * (1 if config.get("tie_word_embeddings") else 2)
    total = linear + embedding + layers * 2 * h + h
    return Shapes(total, linear, embedding, config["vocab_size"], h, layers, {k: i + o for k, (i, o) in dims.items()})


def base_config(spec: Spec, *, online: bool = True) -> dict | None:
    """The base's config.json: built from the scaffold, read from the local copy or the Hub cache,
    or (``online``) fetched alone, a few KB, from the Hub. None when offline and not cached."""
    if spec.base.scaffold is not None:
        from release import llama3

        return llama3.model_config(spec.base.scaffold)
    if spec.base.path:
        path = spec.resolve(spec.base.path) / "config.json"
    else:
        import httpx
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import HFValidationError

        cached = try_to_load_from_cache(spec.base.model, "config.json")
        if isinstance(cached, str):
            path = Path(cached)
        elif not online:
            return None
        else:
            try:
                path = Path(hf_hub_download(spec.base.model, "config.json"))
            except (httpx.HTTPError, OSError, HFValidationError) as e:  # offline, gated: say what the estimate needs
                raise StageError(f"base model {spec.base.model}: cannot read its config.json for the disk "
                                 f"estimate ({type(e).__name__}); log in (hf auth login) or set base.path") from e
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StageError(f"{path}: unreadable ({type(e).__name__}); "
                         "the disk estimate needs the base's config.json") from None


def _corpus_bytes(spec: Spec) -> int:
    """Raw text the data stage reads: the corpus files (compressed ones expanded), or, when they
    are not on this machine yet, the spec's token counts."""
    total = 0
    for c in (*spec.data.corpora, spec.data.instruct):
        path = spec.resolve(c.path)
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
        total += sum(p.stat().st_size * (TEXT_EXPANSION if p.suffix in COMPRESSED else 1) for p in files)
    return total or int((spec.data.urdu_tokens + spec.data.english_tokens) * BYTES_PER_TOKEN)


def _training(spec: Spec, s: Shapes, stage: str) -> list[Need]:
    """Adapter (float32), two trainer checkpoints (adapter + optimizer moments), and for SFT the
    merged base + CPT it trains on."""
    st = getattr(spec.training, stage)
    lora = s.layers * sum(spec.lora.r * s.lora_dims[m] for m in spec.lora.target_modules)
    trainable = lora + s.vocab * s.hidden * len(st.modules_to_save)  # embed_tokens, lm_head in full
    adapter = trainable * 4
    moments = trainable * (2 if "8bit" in st.optimizer else 8)
    needs = [Need(stage, "adapter", adapter),
             Need(stage, "checkpoints (2 kept while training)", 2 * (adapter + moments), transient=True)]
    if stage == "sft":
        needs.append(Need(stage, "base + CPT merged, BF16 (while training)", 2 * s.total, transient=True))
    return needs


def estimate(spec: Spec, config: dict | None = None) -> list[Need]:
    """What every stage of the release writes."""
    config = config or base_config(spec)
    s = shapes(config)
    needs = []
    if spec.base.scaffold is not None:
        needs.append(Need("base", "scaffold model, BF16", 2 * s.total))
    elif not spec.base.path:
        needs.append(Need("base", f"{spec.base.model}, downloaded", 2 * s.total, where="hub cache"))
    needs.append(Need("data", "curated CPT and SFT sets", int(_corpus_bytes(spec) * spec.data.retained_fraction)))
    needs += _training(spec, s, "cpt") + _training(spec, s, "sft")
    for key, v in spec.variants.items():
        if v.format == "safetensors":
            needs.append(Need("merge", f"{key}: {v.dtype} safetensors", 2 * s.total + TOKENIZER_BYTES))
        elif v.format == "bnb-4bit":
            needs.append(Need("bnb4", f"{key}: bitsandbytes {v.dtype}",
                              int(s.linear * NF4_BITS / 8) + 2 * (s.total - s.linear) + TOKENIZER_BYTES))
        else:
            for q in spec.gguf_types():
                needs.append(Need("gguf", f"{key}: {spec.gguf_file_name(q)}",
                                  int(s.total * BITS_PER_WEIGHT[q] / 8) + GGUF_VOCAB_BYTES))
    positions = spec.evaluation.fidelity_chunks * spec.evaluation.fidelity_chunk_tokens
    needs.append(Need("verify", "reference logits (while measuring)", positions * s.vocab * 4, transient=True))
    return needs


def total(needs: list[Need], where: str = "build") -> int:
    """The peak: everything kept, plus the largest transient of any one stage."""
    kept = sum(n.bytes for n in needs if n.where == where and not n.transient)
    by_stage: dict[str, int] = {}
    for n in needs:
        if n.where == where and n.transient:
            by_stage[n.stage] = by_stage.get(n.stage, 0) + n.bytes
    return kept + max(by_stage.values(), default=0)


def free_bytes(path: Path) -> int:
    """Free space on the file system that holds ``path`` (or will: its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check(spec: Spec, stages: list[str], *, force: bool = False, built: set[str] = frozenset()) -> list[Need]:
    """Refuse, in one line, when the build folder's file system lacks the room for ``stages``.
    Stages already built (``built``) count only if ``force`` rebuilds them beside their old copy."""
    from release.artifacts import human_bytes

    needs = [n for n in estimate(spec) if n.stage in stages and (force or n.stage not in built)]
    need, free = total(needs), free_bytes(spec.build_dir)
    if need > free:
        top = sorted(_by_stage(needs).items(), key=lambda kv: -kv[1])[:4]
        raise StageError(f"the release needs {human_bytes(need)} in {spec.build_dir} ({human_bytes(free)} free): "
                         + ", ".join(f"{k} {human_bytes(v)}" for k, v in top)
                         + "; free some space or set build.dir to a larger disk")
    return needs


def _by_stage(needs: list[Need]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in needs:
        out[n.stage] = out.get(n.stage, 0) + n.bytes
    return out
