"""Settings and helpers shared by the objectives that score whole sequences (dpo, simpo, orpo, kto).

The log-probs themselves come from :mod:`tunelab.models.logprobs`.
"""

from __future__ import annotations

import torch
from pydantic import Field

from tunelab.config.base import ObjectiveSettings


class ReferenceSettings(ObjectiveSettings):
    """Settings of the objectives that compare the policy with a frozen reference (dpo, kto)."""

    precompute_reference: bool = Field(
        False,
        description="Compute the reference log-probs once before training and cache them on disk (no reference "
        "forward per step; a full fine-tune then needs no second model in memory).",
    )


def first_and_second(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per-sequence values of a pair batch into (first of each pair, second of each pair)."""
    return values[0::2], values[1::2]
