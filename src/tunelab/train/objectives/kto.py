"""KTO (Ethayarajh et al. 2024): preference learning from records labelled desirable or not.

For a record with policy/reference log-ratio ``r = log pi(y|x) - log ref(y|x)`` and a batch
estimate ``z`` of KL(pi || ref) (from prompts paired with other records' completions, clamped
at 0, no gradient), the loss is ``w_d (1 - sigmoid(beta (r - z)))`` for a desirable record and
``w_u (1 - sigmoid(beta (z - r)))`` for an undesirable one, averaged over records.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from tunelab.data.packing import Batch
from tunelab.train.objectives.base import Metrics
from tunelab.train.objectives.registry import ObjectiveSpec, register
from tunelab.models.logprobs import reference_logps, sequence_logps
from tunelab.train.objectives.sequence import ReferenceSettings, first_and_second


class KTOSettings(ReferenceSettings):
    """kto: preference learning from records labelled desirable or undesirable, against a reference."""

    beta: float = Field(0.1, gt=0, description="Inverse temperature of the implicit reward.")
    desirable_weight: float = Field(1.0, gt=0, description="Weight of the loss on desirable records.")
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of the loss on undesirable records.")


def kto_losses(policy: torch.Tensor, reference: torch.Tensor, kl: torch.Tensor, desirable: torch.Tensor, beta: float,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-record KTO losses (see the module docstring)."""
    ratio = policy - reference
    return torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )


def kl_estimate(policy_mismatched: torch.Tensor, reference_mismatched: torch.Tensor) -> torch.Tensor:
    """The batch's KL estimate: mean log-ratio on mismatched pairs, at least 0, without gradient."""
    return (policy_mismatched - reference_mismatched).mean().clamp(min=0).detach()


class KTOObjective:
    """KTO on pair batches whose second sequence is the mismatched (KL) pair; mean over records."""

    needs_reference = True

    def __init__(self, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 reference: torch.nn.Module | None = None) -> None:
        self.beta, self.reference = beta, reference
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.chunk_tokens: int | None = None  # set by train.chunked_loss (see SFTObjective)

    def heads(self) -> dict[str, torch.nn.Module]:
        """No modules besides the model."""
        return {}

    def window_totals(self, window: Sequence[Batch]) -> dict[str, int]:
        """Records in the window (the loss is their mean)."""
        return {"units": sum(batch.num_sequences // 2 for batch in window)}

    def loss(self, model: torch.nn.Module, batch: Batch, totals: dict[str, int]) -> tuple[torch.Tensor, Metrics]:
        """This batch's share of the window's loss, and reward/KL metrics."""
        policy, policy_mismatched = first_and_second(sequence_logps(model, batch, self.chunk_tokens)[0])
        reference, reference_mismatched = first_and_second(
            reference_logps(model, self.reference, batch, self.chunk_tokens))
        kl = kl_estimate(policy_mismatched, reference_mismatched)
        desirable = batch.pair_labels
        losses = kto_losses(policy, reference, kl, desirable, self.beta, self.desirable_weight, self.undesirable_weight)
        rewards = self.beta * (policy - reference).detach()
        n_good, n_bad = int(desirable.sum()), int((~desirable).sum())
        metrics: Metrics = {"kl": (float(kl) * len(rewards), len(rewards))}
        if n_good:
            metrics["rewards/chosen"] = (float(rewards[desirable].sum()), n_good)
        if n_bad:
            metrics["rewards/rejected"] = (float(rewards[~desirable].sum()), n_bad)
        return losses.sum() / totals["units"], metrics


def build(settings: KTOSettings, reference: torch.nn.Module | None, model: torch.nn.Module) -> KTOObjective:
    """KTO from its section."""
    return KTOObjective(settings.beta, settings.desirable_weight, settings.undesirable_weight, reference)


register(ObjectiveSpec(
    name="kto", summary="KTO: preference learning from records labelled desirable or undesirable", data="feedback",
    build=build, settings=KTOSettings, reference="always"))
