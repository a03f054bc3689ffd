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


def load_gguf(path: Path, n_ctx: int = 512, vocab_only: bool = False):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, vocab_only=vocab_only, verbose=False,
                 n_threads=2, seed=0)


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
