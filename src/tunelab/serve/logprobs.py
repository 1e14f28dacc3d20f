"""Log-probabilities in the two shapes of the OpenAI API.

Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal": null}``.
Completions (legacy): ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``, where
``top_logprobs`` maps token text to log-probability (the chosen token is always in it, as in
vLLM, so a client can tell whether it was the most likely one) and, with ``echo``, the prompt's
tokens come first with ``null`` for the first one. JSON has no infinity: a log-probability of
-inf is written as :data:`FLOOR` (vLLM's choice too).
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PreTrainedTokenizerBase

from tunelab.serve.engine import TopLogprobs

FLOOR = -9999.0


def finite(value: float | None) -> float | None:
    """``value`` with -inf and NaN replaced by :data:`FLOOR`."""
    if value is None:
        return None
    return value if math.isfinite(value) else FLOOR


def token_texts(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    """Each token's own text."""
    return tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False) if ids else []


def chat_logprobs(tokenizer: PreTrainedTokenizerBase, ids: list[int], logprobs: list[float],
                  tops: list[TopLogprobs] | None) -> dict[str, Any]:
    """The chat ``logprobs`` object for generated tokens ``ids``."""
    texts = token_texts(tokenizer, ids)
    alternatives = [token_texts(tokenizer, [i for i, _ in top]) for top in tops] if tops else [[] for _ in ids]
    content = []
    for position, (text, logprob) in enumerate(zip(texts, logprobs)):
        top = tops[position] if tops else []
        content.append({"token": text, "logprob": finite(logprob), "bytes": list(text.encode("utf-8", "replace")),
                        "top_logprobs": [{"token": alt, "logprob": finite(lp), "bytes": list(alt.encode("utf-8", "replace"))}
                                         for alt, (_, lp) in zip(alternatives[position], top)]})
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer: PreTrainedTokenizerBase, ids: list[int], logprobs: list[float | None],
                        tops: list[TopLogprobs | None], offset: int = 0) -> dict[str, Any]:
    """The legacy ``logprobs`` object; ``offset`` is where the first token's text starts in the answer."""
    texts = token_texts(tokenizer, ids)
    flat = token_texts(tokenizer, [i for top in tops for i, _ in top or []])  # one decode call for all
    top_dicts: list[dict[str, float] | None] = []
    offsets, used = [], 0
    for position, (text, logprob) in enumerate(zip(texts, logprobs)):
        offsets.append(offset)
        offset += len(text)
        top = (tops[position] if position < len(tops) else None) or []
        alternatives, used = flat[used:used + len(top)], used + len(top)
        if logprob is None:
            top_dicts.append(None)
            continue
        entry = {alt: finite(lp) for alt, (_, lp) in zip(alternatives, top)}
        entry.setdefault(text, finite(logprob))
        top_dicts.append(entry)
    return {"tokens": texts, "token_logprobs": [finite(lp) for lp in logprobs], "top_logprobs": top_dicts,
            "text_offset": offsets}
