"""Deterministic random-init Llama-3 models with the real Llama 3 tokenizer.

The demo, the tests and the benchmarks need a *base model* without a model hub: this writes one
in the layout of ``unsloth/Meta-Llama-3.1-8B`` (BF16 safetensors, sharded with an index when
asked, config.json, generation_config.json, tokenizer files), at any size from a toy to real 8B
layer shapes.

Every tensor has its own random generator seeded from ``(seed, tensor name)``, so the same
scaffold gives the same bytes whatever the order or sharding. Weights are drawn with standard
deviation ``init_std * sqrt(256 / fan_in)``: with the usual 0.02 the logits of a random model are
nearly flat and a test could not tell a wrong rope from a right one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from release import llama3, shards
from release.artifacts import Manifest, run_stage, write_json
from release.errors import UsageError
from release.spec import Chat, Scaffold, Spec

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def tensor_shapes(sc: Scaffold) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes in the order transformers' LlamaForCausalLM declares them."""
    h, f, v = sc.hidden_size, sc.intermediate_size, llama3.VOCAB_SIZE
    d = h // sc.num_attention_heads
    kv = d * sc.num_key_value_heads
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(sc.num_hidden_layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.mlp.gate_proj.weight", (f, h)),
            (f"{p}.mlp.up_proj.weight", (f, h)),
            (f"{p}.mlp.down_proj.weight", (h, f)),
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not sc.tie_word_embeddings:
        out.append(("lm_head.weight", (v, h)))
    return out


def make_tensor(sc: Scaffold, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(f"{sc.seed}:{name}".encode()).digest()[:8], "little") >> 1
    gen = torch.Generator().manual_seed(seed)
    if len(shape) == 1:  # RMSNorm gains: around 1, not exactly 1, so converters are exercised
        t = 1.0 + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float32)
    else:
        std = sc.init_std * math.sqrt(256 / shape[-1])
        t = torch.randn(shape, generator=gen, dtype=torch.float32) * std
    return t.to(dtype)


def write_model(
    out_dir: Path,
    sc: Scaffold,
    chat: Chat,
    *,
    dtype: str = "bfloat16",
    max_shard_bytes: int | None = None,
    model_max_length: int = 131072,
    tokenizer_cache: Path | None = None,
    progress: bool = False,
) -> dict:
    """Write a complete base-model folder; return figures (parameters, bytes, shards)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_dtype = DTYPES[dtype]
    shapes = tensor_shapes(sc)
    writer = shards.ShardedWriter(out_dir, [shards.Entry(n, torch_dtype, s) for n, s in shapes], max_shard_bytes)
    for name, shape in _progress(shapes, progress, "scaffold tensors"):
        writer.write(name, make_tensor(sc, name, shape, torch_dtype))
    writer.close()
    write_json(out_dir / "config.json", llama3.model_config(sc, dtype))
    write_json(out_dir / "generation_config.json", {
        "_from_model_config": True,
        "bos_token_id": llama3.SPECIAL_TOKENS[chat.bos_token],
        "eos_token_id": llama3.SPECIAL_TOKENS[chat.eos_token],
    })
    llama3.write_tokenizer(out_dir, llama3.build_tokenizer(tokenizer_cache), chat, model_max_length)
    params = sum(math.prod(s) for _, s in shapes)
    return {"parameters": params, "bytes": writer.bytes, "shards": len(writer.shards), "dtype": dtype}


def describe(sc: Scaffold) -> str:
    """A stable text of a scaffold's settings (what a standalone scaffold's manifest records)."""
    return ",".join(f"{k}={getattr(sc, k)}" for k in sorted(sc.__dataclass_fields__))


def eight_b_shaped(layers: int, seed: int = 0) -> Scaffold:
    """Llama 3.1 8B's real layer shapes with a chosen number of layers (for benchmarks)."""
    return replace(llama3.LLAMA_31_8B, num_hidden_layers=layers, seed=seed)


def _progress(items: list, enabled: bool, desc: str) -> Iterator:
    if not enabled:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=desc)


SHAPES = ("spec", "8b")


def standalone(spec: Spec, out: Path, *, shape: str = "spec", layers: int | str = 2, seed: int | str = 0,
               force: bool = False, progress: bool = True) -> Manifest:
    """A random-init model in ``out`` outside any release (``./inv scaffold --out``): the spec's
    ``[base.scaffold]`` (``shape`` ``spec``) or Llama 3.1 8B's layer shapes (``8b``) with
    ``layers`` layers, built aside and swapped in with a manifest like a stage, so an interrupted
    run leaves no model."""
    if not (str(layers).isdigit() and int(layers) > 0 and str(seed).isdigit()):
        raise UsageError(f"--layers {layers} --seed {seed}: expected a positive layer count and a seed >= 0")
    if shape == "8b":
        sc = eight_b_shaped(int(layers), int(seed))
    elif shape == "spec" and spec.base.scaffold is not None:
        sc = replace(spec.base.scaffold, seed=int(seed))
    else:
        raise UsageError(f"--shape {shape}: expected 'spec' (with a [base.scaffold] in {spec.path}) or '8b'")
    return run_stage("scaffold", Path(out),
                     lambda tmp: write_model(tmp, sc, spec.chat, max_shard_bytes=spec.max_shard_bytes,
                                             progress=progress),
                     release=spec.release.name, spec_sections={"scaffold": describe(sc)}, force=force)
