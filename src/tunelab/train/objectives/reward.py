"""Reward model: a scalar head over the base, trained with the Bradley-Terry loss on pairs.

``loss = -log sigmoid(r(chosen) - r(rejected))``, where ``r`` is the score head's output at the
last token of each sequence. The model is a transformers sequence classifier with one label
(``score`` head), so the saved model (or LoRA adapter, head included) loads with
``AutoModelForSequenceClassification`` without tunelab.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tunelab.data.packing import Batch
from tunelab.train.objectives.base import Metrics
from tunelab.train.objectives.preference import pair_metrics
from tunelab.train.objectives.registry import ObjectiveSpec, register
from tunelab.train.objectives.sequence import first_and_second
from tunelab.models.reward_scoring import sequence_rewards


class RewardObjective:
    """Bradley-Terry pairwise loss; the mean over pairs."""

    needs_reference = False
    reference = None

    def heads(self) -> dict[str, torch.nn.Module]:
        """No modules besides the model."""
        return {}

    def window_totals(self, window: Sequence[Batch]) -> dict[str, int]:
        """Pairs in the window."""
        return {"units": sum(batch.num_sequences // 2 for batch in window)}

    def loss(self, model: torch.nn.Module, batch: Batch, totals: dict[str, int]) -> tuple[torch.Tensor, Metrics]:
        """This batch's share of the window's loss; accuracy and margin of the scores."""
        chosen, rejected = first_and_second(sequence_rewards(model, batch))
        losses = -F.logsigmoid(chosen - rejected)
        metrics = pair_metrics(chosen.detach(), rejected.detach(), chosen.detach(), rejected.detach())
        metrics = {k: v for k, v in metrics.items() if k.startswith("rewards/")}
        return losses.sum() / totals["units"], metrics


register(ObjectiveSpec(
    name="reward", summary="a Bradley-Terry reward model (a score head) on preference pairs", data="pairs",
    build=lambda settings, reference, model: RewardObjective(), score_head=True))
