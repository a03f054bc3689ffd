"""Verification: every variant loads in its runtime and generates with the release's template.

GGUF files run in llama.cpp (llama-cpp-python). Generation follows Ollama's runner: greedy or
sampled tokens are turned into text *with* special tokens, the run ends at an end-of-generation
token, and stop strings are matched on the text (the text before the first stop is returned).
This is what makes a missing stop token visible: header tokens in the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: list[int]
    reason: str  # "eog" (end-of-generation token), "stop:<string>", or "length"


def load_gguf(path: Path, n_ctx: int = 512, vocab_only: bool = False, **kwargs):
    """A llama.cpp model without the CPU backend's extra buffer types (weight repacking for
    AMX/AVX-512 kernels): on CPUs that report AMX without the OS enabling its tile state (seen in
    virtual machines) those kernels crash on any quantized batch. Verification needs the
    numbers, not the speed."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    defaults = llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, vocab_only=vocab_only, verbose=False,
                               n_threads=2, seed=0, **kwargs)
    finally:
        llama_module.llama_cpp.llama_model_default_params = defaults


def generate_gguf(llm, prompt: str, stops: list[str], max_tokens: int) -> Generation:
    """Greedy generation of ``prompt`` (rendered by the release's template, without BOS: llama.cpp
    adds it) with Ollama's stop semantics."""
    import llama_cpp

    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    out: list[int] = []
    raw = b""
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            return Generation(raw.decode("utf-8", "replace"), out, "eog")
        out.append(token)
        raw += llm.detokenize([token], special=True)
        text = raw.decode("utf-8", "replace")
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            at, stop = min(hits)
            return Generation(text[:at], out, f"stop:{stop}")
        if len(out) >= max_tokens:
            break
    return Generation(raw.decode("utf-8", "replace"), out, "length")


# Fixed prompts for fidelity measurements: Urdu first (the release's language), then English.
PROMPTS = [
    "پاکستان کا دارالحکومت کون سا شہر ہے؟",
    "اردو زبان کی تاریخ مختصراً بیان کریں۔",
    "علامہ اقبال کی ایک مشہور نظم کا نام بتائیں اور اس کا مرکزی خیال لکھیں۔",
    "صحت مند رہنے کے لیے تین مشورے دیں۔",
    "What is the capital of Pakistan?",
    "Write one sentence about the monsoon in Lahore.",
]


@dataclass(frozen=True)
class Reference:
    """Token ids of the prompts (rendered with the release's chat template) and the BF16 model's
    next-token log-probabilities at every position, computed by transformers in float32."""

    ids: list[list[int]]
    logprobs: list  # list of torch tensors [positions, vocab]
    logits: list


def hf_logits(model_dir: Path, spec, prompts: list[str] | None = None) -> Reference:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from release import chat

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # bf16 -> f32 is exact
    ids, logprobs, logits = [], [], []
    for text in prompts or PROMPTS:
        x = tok.apply_chat_template([{"role": "user", "content": text}], chat_template=chat.jinja_template(spec.chat),
                                    add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        x = list(x)
        with torch.no_grad():
            out = model(torch.tensor([x])).logits[0].float()
        ids.append(x)
        logits.append(out)
        logprobs.append(torch.log_softmax(out, dim=-1))
    return Reference(ids, logprobs, logits)


def gguf_fidelity(path: Path, ref: Reference) -> dict:
    """Mean KL divergence KL(BF16 || GGUF) of the next-token distributions over every position of
    the prompts, the share of positions whose top token agrees, and the largest logit difference."""
    import numpy as np
    import torch

    n_ctx = max(len(x) for x in ref.ids) + 8
    # float32 KV cache: measure the weights, not llama.cpp's default f16 cache
    llm = load_gguf(path, n_ctx=n_ctx, logits_all=True, type_k=0, type_v=0)
    kl, agree, positions, max_dlogit = 0.0, 0, 0, 0.0
    for ids, lp, lg in zip(ref.ids, ref.logprobs, ref.logits):
        llm.reset()
        llm.eval(ids)
        q = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
        lq = torch.log_softmax(q, dim=-1)
        kl += float((lp.exp() * (lp - lq)).sum(dim=-1).sum())
        agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        positions += len(ids)
        max_dlogit = max(max_dlogit, float((q - lg).abs().max()))
    llm.close()
    return {"kld_mean": round(kl / positions, 6), "top1": round(agree / positions, 4),
            "max_abs_dlogit": round(max_dlogit, 4), "positions": positions}
