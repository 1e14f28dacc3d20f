"""Causal language-model loss for SFT and continued pretraining.

Both objectives predict the next token; they differ only in which tokens carry a label, which
the data pipeline decides (assistant turns for SFT, every token for pretraining).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.data.packing import Batch
from tunelab.data.templates import IGNORE_INDEX


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
    logits = model(**inputs).logits
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
