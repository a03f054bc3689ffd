"""Llama 3.1's special-token table: the one list of names and ids the whole release uses.

The tokenizer (release/llama3.py) is built from this table and the spec's [chat] tokens are
checked against it (release/spec.py, which re-exports it), so a token the spec accepts is one
the tokenizer, the templates and the Modelfiles know by the same name and id. A leaf module: it
imports nothing of the package.
"""

from __future__ import annotations

__all__ = ["SPECIAL_TOKENS", "VOCAB_BASE", "described"]

# Meta's tokenizer for 3.1: the special tokens follow the tiktoken ranks, in this id order.
VOCAB_BASE = 128_000  # tiktoken ranks; the special tokens follow them
_NAMED_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]
SPECIAL_TOKENS: dict[str, int] = {
    tok: VOCAB_BASE + i
    for i, tok in enumerate(_NAMED_TOKENS + [f"<|reserved_special_token_{3 + i}|>"
                                             for i in range(256 - len(_NAMED_TOKENS))])
}


def described() -> str:
    """The table in words for a problem message: the named tokens, then the reserved range
    (256 names would bury the line)."""
    named = [t for t in SPECIAL_TOKENS if not t.startswith("<|reserved_special_token_")]
    last = len(SPECIAL_TOKENS) - len(named) - 1
    return (f"one of the Llama 3 special tokens ({', '.join(named)}, or <|reserved_special_token_0|> "
            f"to <|reserved_special_token_{last}|>)")
