"""Causal language-model loss for SFT and continued pretraining.

Both objectives predict the next token; they differ only in which tokens carry a label, which
the data pipeline decides (assistant turns for SFT, every token for pretraining).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tunelab.data.packing import Batch
from tunelab.data.templates import IGNORE_INDEX
from tunelab.models.logprobs import chunked_token_logps
from tunelab.train.objectives.base import Metrics
from tunelab.train.objectives.registry import ObjectiveSpec, register


def causal_lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Sum of next-token cross-entropy over the batch's trained tokens (in float32).

    The engine divides by the trained tokens of the whole accumulation window, so a window of
    micro-batches gives the same loss and gradients as one big batch. For a packed row, logits
    are computed only at the positions that have a target (``logits_to_keep``): prompt tokens
    never go through the output layer.
    """
    inputs, targets = batch.model_inputs(), batch.targets
    if batch.trained_positions is not None:
        inputs["logits_to_keep"] = batch.trained_positions
        targets = targets[:, batch.trained_positions]
    # Prompt tuning prepends its virtual tokens' logits; the targets are the last positions.
    logits = model(**inputs).logits[:, -targets.shape[1] :]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def chunked_causal_lm_loss(model: torch.nn.Module, batch: Batch, chunk_tokens: int = 4096) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's trained tokens, ``chunk_tokens`` logits at a time.

    The same value and gradients as :func:`causal_lm_loss` without the full logits (see
    :func:`~tunelab.models.logprobs.chunked_token_logps`).
    """
    return -chunked_token_logps(model, batch.model_inputs(), batch.trained_positions, batch.targets,
                                chunk_tokens).sum()


class SFTObjective:
    """Next-token cross-entropy, averaged over the trained tokens of the window (SFT, pretraining).

    Args:
        chunk_tokens: compute the output layer and loss this many trained positions at a time
            (:func:`chunked_causal_lm_loss`: the same numbers without the full logits); None: all at once.
    """

    needs_reference = False
    reference = None

    def __init__(self, chunk_tokens: int | None = None) -> None:
        self.chunk_tokens = chunk_tokens

    def heads(self) -> dict[str, torch.nn.Module]:
        """No modules besides the model."""
        return {}

    def window_totals(self, window: Sequence[Batch]) -> dict[str, int]:
        """Trained tokens of the window."""
        return {"units": sum(batch.num_trained for batch in window)}

    def loss(self, model: torch.nn.Module, batch: Batch, totals: dict[str, int]) -> tuple[torch.Tensor, Metrics]:
        """This batch's summed token loss divided by the window's trained tokens."""
        if self.chunk_tokens:
            return chunked_causal_lm_loss(model, batch, self.chunk_tokens) / totals["units"], {}
        return causal_lm_loss(model, batch) / totals["units"], {}


register(ObjectiveSpec(
    name="sft", summary="chat fine-tuning: next-token loss on the assistant turns", data="conversations",
    build=lambda settings, reference, model: SFTObjective(), token_level=True))
register(ObjectiveSpec(
    name="pretrain", summary="continued pretraining: next-token loss on every token of plain text or chats",
    data="text", build=lambda settings, reference, model: SFTObjective(), token_level=True))
