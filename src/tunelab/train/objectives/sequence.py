"""Per-sequence log-probabilities of the labelled tokens, for packed and padded batches.

Preference objectives score whole continuations: ``log pi(y | x)`` is the sum of the token
log-probs of the continuation. In a packed row only the labelled positions go through the
output layer (``logits_to_keep``), and each position's log-prob is added to its own sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel
from pydantic import Field

from tunelab.config.base import ObjectiveSettings
from tunelab.data.packing import Batch, sequence_index
from tunelab.data.templates import IGNORE_INDEX
from tunelab.train.objectives.chunked_loss import chunked_token_logps


class ReferenceSettings(ObjectiveSettings):
    """Settings of the objectives that compare the policy with a frozen reference (dpo, kto)."""

    precompute_reference: bool = Field(
        False,
        description="Compute the reference log-probs once before training and cache them on disk (no reference "
        "forward per step; a full fine-tune then needs no second model in memory).",
    )


def sequence_logps(model: torch.nn.Module, batch: Batch,
                   chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each sequence's labelled tokens, and how many tokens that is.

    ``chunk_tokens``: run the output layer over that many labelled positions at a time
    (:func:`~tunelab.train.objectives.chunked_loss.chunked_token_logps`), so the logits of the
    whole batch never exist; None: all at once.

    Returns:
        ``(logps, counts)``, both ``[num_sequences]``; logps in float32.
    """
    inputs, targets = batch.model_inputs(), batch.targets
    if batch.trained_positions is not None:  # one packed row
        positions = batch.trained_positions
        if chunk_tokens:
            token_logps = chunked_token_logps(model, inputs, positions, targets, chunk_tokens)
        else:
            inputs["logits_to_keep"] = positions
            logits = model(**inputs).logits[0]
            token_logps = -F.cross_entropy(logits.float(), targets[0, positions], reduction="none")
        owner = sequence_index(batch)[positions]
    elif chunk_tokens:
        token_logps = chunked_token_logps(model, inputs, None, targets, chunk_tokens)  # row-major labelled positions
        rows = torch.arange(targets.shape[0], device=targets.device)
        owner = torch.repeat_interleave(rows, (targets != IGNORE_INDEX).sum(dim=1))
    else:
        logits = model(**inputs).logits
        token_logps = -F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(targets.shape)
        return token_logps.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)
    # Summed in float64: index_add adds a ~1,000-token sequence one term at a time, and float32 drifted
    # by ~1e-6 relative (1e-4 in a DPO loss) where a tree-reduced .sum() does not.
    count = batch.num_sequences
    logps = torch.zeros(count, device=token_logps.device, dtype=torch.float64).index_add(
        0, owner, token_logps.double()).float()
    return logps, torch.bincount(owner, minlength=count)


def reference_logps(policy: torch.nn.Module, reference: torch.nn.Module | None, batch: Batch,
                    chunk_tokens: int | None = None) -> torch.Tensor:
    """Log-probs of each sequence under the reference model, without gradient.

    Precomputed values travel with the batch. Otherwise the reference is the frozen copy when
    there is one, or, for a LoRA policy, the same model with its adapters switched off (no
    second copy in memory).
    """
    if batch.reference_logps is not None:
        return batch.reference_logps
    with torch.no_grad():
        if reference is not None:
            return sequence_logps(reference, batch, chunk_tokens)[0]
        if not isinstance(policy, PeftModel):
            raise RuntimeError("a reference model is needed: the policy has no adapters to switch off")
        with policy.disable_adapter():
            return sequence_logps(policy, batch, chunk_tokens)[0]


def first_and_second(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per-sequence values of a pair batch into (first of each pair, second of each pair)."""
    return values[0::2], values[1::2]
