"""Choosing the next token for one request: logit bias, penalties, grammar, temperature, top-p.

OpenAI's semantics: ``logit_bias`` adds to a token's logit; ``presence_penalty`` subtracts once
from every token already generated and ``frequency_penalty`` once per occurrence; then the
grammar (``response_format``, forced tool calls) removes every token that would leave it. A
temperature below :data:`GREEDY_BELOW` is greedy (as in vLLM), so no temperature can overflow
the softmax. Log-probabilities reported to the client are those of the model's own distribution,
before any of these changes (vLLM's default too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tunelab.serve.grammar import TokenConstraint

GREEDY_BELOW = 1e-5


class SamplingError(RuntimeError):
    """Nothing can be sampled for a request (for example its grammar allows no token)."""


@dataclass
class TokenChooser:
    """The per-request state of sampling: its generator, token counts and grammar.

    Args:
        vocab_size: width of the logits.
        temperature, top_p, seed: as in the API.
        presence_penalty, frequency_penalty: as in the API (-2 to 2).
        logit_bias: token id -> bias added to its logit (-100 to 100).
        constraint: the grammar the answer must follow, if any.
        stop_ids: tokens that end the answer; allowed by the grammar only where it is complete.
    """

    vocab_size: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    constraint: TokenConstraint | None = None
    stop_ids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.greedy = self.temperature < GREEDY_BELOW
        self.generator = torch.Generator().manual_seed(self.seed) if self.seed is not None and not self.greedy else None
        penalised = self.presence_penalty != 0 or self.frequency_penalty != 0
        self.counts = torch.zeros(self.vocab_size) if penalised else None
        if self.logit_bias:
            ids = list(self.logit_bias)
            self._bias_ids, self._bias = torch.tensor(ids), torch.tensor([self.logit_bias[i] for i in ids])

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from one row of float32 CPU logits.

        Raises:
            SamplingError: every token is excluded.
        """
        if self.logit_bias or self.counts is not None or self.constraint is not None:
            logits = logits.clone()
        if self.logit_bias:
            logits.index_add_(0, self._bias_ids, self._bias)
        if self.counts is not None:
            logits -= self.frequency_penalty * self.counts + self.presence_penalty * (self.counts > 0)
        if self.constraint is not None:
            allowed = self.constraint.allowed()
            if self.stop_ids and bool(allowed[sorted(self.stop_ids)].any()):
                allowed[sorted(self.stop_ids)] = True  # the value is complete: any stop id ends it
            logits[: len(allowed)][~allowed] = float("-inf")
            logits[len(allowed):] = float("-inf")
        if not bool(torch.isfinite(logits).any()):
            raise SamplingError("no token can follow (every token is excluded)")
        if self.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < self.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            raise SamplingError("the sampling distribution is not finite")
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def taken(self, token: int) -> None:
        """Record the token chosen (for penalties and the grammar)."""
        if self.counts is not None:
            self.counts[token] += 1
        if self.constraint is not None and token not in self.stop_ids:
            self.constraint.advance(token)

    @property
    def complete(self) -> bool:
        """True when the grammar is complete and admits nothing more."""
        return self.constraint is not None and self.constraint.done
