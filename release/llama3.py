"""Facts of the Llama 3.1 family that every stage writes the same way.

- the tokenizer: Meta's tiktoken ranks (shipped by the ``llama-models`` package) turned into a
  Hugging Face fast tokenizer with the Llama 3.1 special tokens at their official ids;
- ``config.json`` / ``tokenizer_config.json`` in a form that transformers 4.4x and 5.x both read
  correctly: transformers 5 writes only ``rope_parameters`` and ``TokenizersBackend``, which 4.x
  misreads silently (rope_theta 10000, no llama3 scaling), so the legacy fields are written too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from release.artifacts import atomic_path, write_json

# The special-token table lives in the spec module, which checks [chat] against it.
from release.spec import SPECIAL_TOKENS, VOCAB_BASE, Chat, Scaffold

VOCAB_SIZE = VOCAB_BASE + len(SPECIAL_TOKENS)  # 128,256: tiktoken ranks + 256 special tokens

# Meta's pre-tokenizer split pattern for Llama 3 (llama_models.llama3.tokenizer.Tokenizer.pat_str).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama 3.1 8B's shapes (Meta's config.json), for 8B-shaped models with fewer layers.
LLAMA_31_8B = Scaffold(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, rope_theta=500000.0, rope_scaling=True, max_position_embeddings=131072,
    tie_word_embeddings=False, init_std=0.1, seed=0,
)
LLAMA3_ROPE_SCALING = {
    "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192, "rope_type": "llama3",
}
RMS_NORM_EPS = 1e-5
# Written as config.json's transformers_version: the oldest transformers that reads llama3 rope
# scaling. Without a version field transformers 5 suspects a broken Mistral tokenizer and warns
# on every load.
COMPATIBLE_TRANSFORMERS = "4.43.0"


def tiktoken_file() -> Path:
    """Meta's Llama 3 tokenizer ranks, as shipped in the ``llama-models`` package."""
    import llama_models.llama3

    return Path(llama_models.llama3.__file__).parent / "tokenizer.model"


def build_tokenizer(cache_dir: Path | None = None) -> Tokenizer:
    """The Llama 3.1 fast tokenizer from Meta's tiktoken ranks.

    Recovering BPE merges from tiktoken ranks takes ~30 s; with ``cache_dir`` the result is kept
    as ``llama3-<sha>.json`` keyed by the ranks file, so tests and demos pay it once.
    """
    ranks = tiktoken_file()
    key = hashlib.sha256(ranks.read_bytes() + SPLIT_PATTERN.encode() + json.dumps(SPECIAL_TOKENS).encode())
    cached = Path(cache_dir) / f"llama3-{key.hexdigest()[:16]}.json" if cache_dir else None
    if cached and cached.is_file():
        return Tokenizer.from_file(str(cached))

    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab, merges = TikTokenConverter(vocab_file=str(ranks)).extract_vocab_merges_from_model(str(ranks))
    if len(vocab) != VOCAB_BASE:
        raise ValueError(f"{ranks}: expected {VOCAB_BASE} ranks, found {len(vocab)}")
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, SPECIAL_TOKENS[bos])],
        ),
    ])
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE
    if cached:
        with atomic_path(cached) as tmp:
            tok.save(str(tmp))
    return tok


def tokenizer_config(chat: Chat, model_max_length: int, chat_template: str | None = None) -> dict:
    """``tokenizer_config.json`` readable by transformers 4.4x and 5.x alike."""
    cfg = {
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for t, i in SPECIAL_TOKENS.items()
        },
        "bos_token": chat.bos_token,
        "clean_up_tokenization_spaces": False,
        "eos_token": chat.eos_token,
        "pad_token": chat.pad_token,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    return cfg


def write_tokenizer(out_dir: Path, tokenizer: Tokenizer, chat: Chat, model_max_length: int,
                    chat_template: str | None = None) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json (each atomically)."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "tokenizer.json") as tmp:
        tokenizer.save(str(tmp))
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(chat, model_max_length, chat_template))
    write_json(out_dir / "special_tokens_map.json", {
        "bos_token": chat.bos_token, "eos_token": chat.eos_token, "pad_token": chat.pad_token,
    })


def model_config(sc: Scaffold, dtype: str = "bfloat16", eos_token_id: int | list[int] | None = None) -> dict:
    """``config.json`` for a Llama 3.x model: Meta's layout (top-level ``rope_theta`` and
    ``rope_scaling``, ``torch_dtype``) for transformers 4.x, plus ``rope_parameters`` and
    ``dtype`` as transformers 5 writes them. Both describe the same rope."""
    rope_scaling = dict(LLAMA3_ROPE_SCALING) if sc.rope_scaling else None
    rope_parameters = {"rope_type": "default", "rope_theta": sc.rope_theta}
    if rope_scaling:
        rope_parameters = {**rope_scaling, "rope_theta": sc.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": SPECIAL_TOKENS["<|begin_of_text|>"],
        "eos_token_id": eos_token_id if eos_token_id is not None else SPECIAL_TOKENS["<|end_of_text|>"],
        "head_dim": sc.hidden_size // sc.num_attention_heads,
        "hidden_act": "silu",
        "hidden_size": sc.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": sc.intermediate_size,
        "max_position_embeddings": sc.max_position_embeddings,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": sc.num_attention_heads,
        "num_hidden_layers": sc.num_hidden_layers,
        "num_key_value_heads": sc.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_scaling": rope_scaling,
        "rope_theta": sc.rope_theta,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": sc.tie_word_embeddings,
        "torch_dtype": dtype,
        "dtype": dtype,
        "transformers_version": COMPATIBLE_TRANSFORMERS,
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }


def compatible_config(cfg: dict, dtype: str, eos_token_id: int | list[int]) -> dict:
    """A model's config.json rewritten for a release: dtype and eos ids set, and the rope written
    both ways (legacy ``rope_theta``/``rope_scaling`` for transformers 4.x, ``rope_parameters``
    for 5.x), whichever of the two the input had."""
    out = dict(cfg)
    rp = out.get("rope_parameters")
    if rp and "rope_theta" not in out:
        out["rope_theta"] = rp["rope_theta"]
    if rp and "rope_scaling" not in out:
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        out["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    if not rp and "rope_theta" in out:
        out["rope_parameters"] = {**(out.get("rope_scaling") or {"rope_type": "default"}),
                                  "rope_theta": out["rope_theta"]}
    out["torch_dtype"] = out["dtype"] = dtype
    out["eos_token_id"] = eos_token_id
    out.setdefault("transformers_version", COMPATIBLE_TRANSFORMERS)
    return out
