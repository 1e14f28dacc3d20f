"""Constrained decoding for ``response_format`` and forced tool calls, with llguidance.

llguidance (Microsoft's Low-level Guidance: Rust, one 3 MB wheel, no dependencies, CPU) turns a
JSON schema into a grammar and, at each step, into the set of token ids that keep the text on
it. Why this library and not xgrammar, outlines-core or lm-format-enforcer: docs/deploy.md
("Structured output") and benchmarks/grammar_backends.py.

:class:`GrammarCompiler` is built once per server (wrapping the tokenizer takes about a second,
so it is built on first use, off the event loop); each request gets its own
:class:`TokenConstraint`. The model's stop ids are the grammar's end-of-sequence tokens: once the
JSON value is complete only they are allowed, so the answer ends right after it.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase


class GrammarError(ValueError):
    """A schema or grammar that cannot be used (the message says why)."""


class TokenConstraint:
    """One request's grammar state: which tokens may come next, advanced token by token."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher, self.vocab_size = matcher, vocab_size
        self._words = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """A boolean mask over the vocabulary: True where the token may come next."""
        self.matcher.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
        bits = np.unpackbits(self._words.numpy().view(np.uint8), bitorder="little")[: self.vocab_size]
        return torch.from_numpy(bits.astype(bool))

    def advance(self, token: int) -> None:
        """Take the sampled token.

        Raises:
            GrammarError: the token leaves the grammar (cannot happen when sampling from :meth:`allowed`).
        """
        if not self.matcher.consume_token(token) or self.matcher.is_error():
            raise GrammarError(f"token {token} does not fit the grammar: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """True when the value is complete and nothing but end-of-sequence can follow."""
        return self.matcher.is_stopped()


class GrammarCompiler:
    """Builds :class:`TokenConstraint` objects for one tokenizer and vocabulary.

    Args:
        tokenizer: a fast Hugging Face tokenizer (llguidance reads its tokenizer.json).
        vocab_size: width of the model's logits (may exceed the tokenizer's length).
        stop_ids: the tokens that end an answer; they are the grammar's end-of-sequence tokens.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_ids: set[int]) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.stop_ids = sorted(stop_ids) or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        self._lltokenizer: Any = None
        self._lock = threading.Lock()

    def _wrapped_tokenizer(self) -> Any:
        import llguidance.hf

        with self._lock:
            if self._lltokenizer is None:
                if not self.tokenizer.is_fast:
                    raise GrammarError("structured output needs a fast (tokenizer.json) tokenizer; this model has none")
                self._lltokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                                 eos_token=self.stop_ids or None)
        return self._lltokenizer

    def json_schema(self, schema: dict[str, Any]) -> TokenConstraint:
        """A constraint that admits exactly the JSON texts valid under ``schema`` (spaced as ``json.dumps`` writes it).

        Raises:
            GrammarError: the schema is not an object or uses what llguidance cannot enforce.
        """
        import llguidance

        if not isinstance(schema, dict):
            raise GrammarError("the schema must be a JSON object")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        except ValueError as exc:
            raise GrammarError(str(exc)) from None
        matcher = llguidance.LLMatcher(self._wrapped_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return TokenConstraint(matcher, self.vocab_size)
