"""Offline preference objectives on (chosen, rejected) pairs: DPO (sigmoid, IPO, hinge), SimPO, ORPO.

Notation: ``pc``/``pr`` are the policy's summed log-probs of the chosen and rejected
continuations, ``rc``/``rr`` the reference model's, ``nc``/``nr`` their token counts.

- DPO (Rafailov et al. 2023): ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))``; with label
  smoothing eps (cDPO) ``-(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)``; with
  ``rpo_alpha`` (RPO, Pang et al. 2024) plus ``rpo_alpha`` x the chosen answers' NLL per token.
- IPO (Azar et al. 2023, eq. 17): ``((pc - rc)/nc - (pr - rr)/nr - 1/(2 beta))^2`` (log-ratios
  averaged per token, as the IPO authors and TRL do).
- hinge (SLiC, Zhao et al. 2023): ``relu(1 - beta d)``.
- SimPO (Meng et al. 2024): no reference; ``-log sigmoid(beta (pc/nc - pr/nr) - gamma)``.
- ORPO (Hong et al. 2024): no reference; chosen NLL (token mean) ``- beta * log sigmoid(log odds
  ratio)`` with ``log odds(y) = log p - log(1 - p)`` and ``p = exp(mean token log-prob)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from tunelab.config.base import ObjectiveSettings
from tunelab.data.packing import Batch
from tunelab.data.templates import IGNORE_INDEX
from tunelab.train.objectives.base import Metrics
from tunelab.train.objectives.registry import ObjectiveSpec, register
from tunelab.models.logprobs import reference_logps, sequence_logps
from tunelab.train.objectives.sequence import ReferenceSettings, first_and_second


class DPOSettings(ReferenceSettings):
    """dpo: DPO (sigmoid), IPO or hinge loss against a reference."""

    beta: float = Field(0.1, gt=0, description="Inverse temperature of the implicit reward.")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="sigmoid (DPO), ipo (IPO, length-normalised) or hinge (SLiC)."
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="sigmoid loss: probability that a preference label is flipped (cDPO)."
    )
    rpo_alpha: float = Field(
        0.0, ge=0.0,
        description="Weight of a negative log-likelihood term on the chosen answer (RPO, Pang et al. 2024; TRL's "
        "rpo_alpha; 1.0 in the paper). DPO can widen the margin by lowering the chosen answer's likelihood too, "
        "which costs accuracy where there is one right answer (math). 0: plain DPO.",
    )


class SimPOSettings(ObjectiveSettings):
    """simpo: length-normalised preference optimisation without a reference."""

    beta: float = Field(2.0, gt=0, description="Reward scale.")
    gamma: float = Field(0.5, ge=0.0, description="Target reward margin.")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="Probability that a preference label is flipped (as cDPO)."
    )


class ORPOSettings(ObjectiveSettings):
    """orpo: chosen NLL plus an odds-ratio preference term, no reference."""

    beta: float = Field(0.1, gt=0, description="Weight of the odds-ratio term.")


def smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1 - eps) log sigmoid(x) - eps log sigmoid(-x)`` per pair."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_losses(
    pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, nc: torch.Tensor, nr: torch.Tensor,
    beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair DPO-family losses (see the module docstring)."""
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    if loss_type == "sigmoid":
        return smoothed_sigmoid_loss(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    if loss_type == "ipo":
        delta = chosen_ratio / nc.clamp_min(1) - rejected_ratio / nr.clamp_min(1)
        return (delta - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss_type {loss_type!r}")


def simpo_losses(pc: torch.Tensor, pr: torch.Tensor, nc: torch.Tensor, nr: torch.Tensor, beta: float, gamma: float,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair SimPO losses: length-normalised log-probs, a target margin, no reference."""
    delta = pc / nc.clamp_min(1) - pr / nr.clamp_min(1)
    return smoothed_sigmoid_loss(beta * delta - gamma, label_smoothing)


def orpo_log_odds_ratio(pc: torch.Tensor, pr: torch.Tensor, nc: torch.Tensor, nr: torch.Tensor) -> torch.Tensor:
    """``log odds(chosen) - log odds(rejected)`` from mean token log-probs."""
    mean_c, mean_r = pc / nc.clamp_min(1), pr / nr.clamp_min(1)
    return (mean_c - mean_r) - (torch.log1p(-torch.exp(mean_c)) - torch.log1p(-torch.exp(mean_r)))


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, pc: torch.Tensor,
                 pr: torch.Tensor) -> dict[str, tuple[float, int]]:
    """Metrics as ``(sum over the batch's pairs, pair count)``; the engine averages them over a log interval."""
    n = chosen_rewards.numel()
    return {
        "rewards/chosen": (float(chosen_rewards.sum()), n),
        "rewards/rejected": (float(rejected_rewards.sum()), n),
        "rewards/accuracy": (float((chosen_rewards > rejected_rewards).float().sum()), n),
        "rewards/margin": (float((chosen_rewards - rejected_rewards).sum()), n),
        "logps/chosen": (float(pc.detach().sum()), n),
        "logps/rejected": (float(pr.detach().sum()), n),
    }


class PreferenceObjective:
    """DPO (sigmoid/ipo/hinge), SimPO or ORPO on pair batches; the loss is a mean over pairs.

    Args:
        kind: ``dpo``, ``simpo`` or ``orpo``.
        beta: objective strength (see :class:`DPOSettings`, :class:`SimPOSettings`, :class:`ORPOSettings`).
        reference: frozen reference model for DPO with full/freeze fine-tuning; None for LoRA
            (adapters switched off), SimPO/ORPO (no reference) or precomputed log-probs.
        rpo_alpha: DPO only: weight of the chosen answers' NLL (mean over their tokens in the window).
    """

    def __init__(self, kind: str, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 gamma: float = 0.5, reference: torch.nn.Module | None = None, rpo_alpha: float = 0.0) -> None:
        self.kind, self.beta, self.loss_type = kind, beta, loss_type
        self.label_smoothing, self.gamma, self.reference = label_smoothing, gamma, reference
        self.rpo_alpha = rpo_alpha if kind == "dpo" else 0.0
        self.chunk_tokens: int | None = None  # set by train.chunked_loss (see SFTObjective)

    @property
    def needs_reference(self) -> bool:
        """Whether the loss compares with a reference model (DPO does; SimPO and ORPO do not)."""
        return self.kind == "dpo"

    def heads(self) -> dict[str, torch.nn.Module]:
        """No modules besides the model."""
        return {}

    def window_totals(self, window: Sequence[Batch]) -> dict[str, int]:
        """Pairs (the loss is their mean) and, for ORPO's and RPO's NLL term, chosen tokens in the window."""
        totals = {"units": sum(batch.num_sequences // 2 for batch in window)}
        if self.kind == "orpo" or self.rpo_alpha:
            totals["chosen_tokens"] = sum(_chosen_tokens(batch) for batch in window)
        return totals

    def loss(self, model: torch.nn.Module, batch: Batch, totals: dict[str, int]) -> tuple[torch.Tensor, Metrics]:
        """This batch's share of the window's loss, and metric sums over its pairs."""
        logps, counts = sequence_logps(model, batch, self.chunk_tokens)
        pc, pr = first_and_second(logps)
        nc, nr = first_and_second(counts)
        if self.kind == "dpo":
            rc, rr = first_and_second(reference_logps(model, self.reference, batch, self.chunk_tokens))
            losses = dpo_losses(pc, pr, rc, rr, nc, nr, self.beta, self.loss_type, self.label_smoothing)
            chosen_rewards, rejected_rewards = self.beta * (pc - rc).detach(), self.beta * (pr - rr).detach()
            metrics = pair_metrics(chosen_rewards, rejected_rewards, pc, pr)
            if not self.rpo_alpha:
                return losses.sum() / totals["units"], metrics
            nll = -pc.sum() / totals["chosen_tokens"]
            metrics["nll"] = (float(-pc.detach().sum()), _chosen_tokens(batch))  # mean per chosen token
            return losses.sum() / totals["units"] + self.rpo_alpha * nll, metrics
        chosen_rewards = self.beta * (pc / nc.clamp_min(1)).detach()
        rejected_rewards = self.beta * (pr / nr.clamp_min(1)).detach()
        if self.kind == "simpo":
            losses = simpo_losses(pc, pr, nc, nr, self.beta, self.gamma, self.label_smoothing)
            return losses.sum() / totals["units"], pair_metrics(chosen_rewards, rejected_rewards, pc, pr)
        log_odds = orpo_log_odds_ratio(pc, pr, nc, nr)
        odds_term = -self.beta * F.logsigmoid(log_odds)
        nll = -pc.sum() / totals["chosen_tokens"]
        metrics = pair_metrics(chosen_rewards, rejected_rewards, pc, pr)
        metrics["log_odds_ratio"] = (float(log_odds.detach().sum()), log_odds.numel())
        return nll + odds_term.sum() / totals["units"], metrics


def _chosen_tokens(batch: Batch) -> int:
    """Labelled tokens of the chosen (first) sequences of a pair batch."""
    if batch.seq_lens is None:
        return int((batch.targets[0::2] != IGNORE_INDEX).sum())
    lengths = batch.seq_lens[0]
    starts = [sum(lengths[:k]) for k in range(len(lengths))]
    targets = batch.targets[0]
    return int(sum((targets[s : s + n] != IGNORE_INDEX).sum() for s, n in zip(starts[0::2], lengths[0::2])))


def build_dpo(settings: DPOSettings, reference: torch.nn.Module | None, model: torch.nn.Module) -> PreferenceObjective:
    """DPO (or IPO, hinge) from its section."""
    return PreferenceObjective("dpo", settings.beta, settings.loss_type, settings.label_smoothing,
                               reference=reference, rpo_alpha=settings.rpo_alpha)


def build_simpo(settings: SimPOSettings, reference: torch.nn.Module | None, model: torch.nn.Module) -> PreferenceObjective:
    """SimPO from its section."""
    return PreferenceObjective("simpo", settings.beta, label_smoothing=settings.label_smoothing, gamma=settings.gamma)


def build_orpo(settings: ORPOSettings, reference: torch.nn.Module | None, model: torch.nn.Module) -> PreferenceObjective:
    """ORPO from its section."""
    return PreferenceObjective("orpo", settings.beta)


register(ObjectiveSpec(
    name="dpo", summary="DPO (sigmoid), IPO or hinge loss on preference pairs against a reference", data="pairs",
    build=build_dpo, settings=DPOSettings, reference="always"))
register(ObjectiveSpec(
    name="simpo", summary="SimPO: length-normalised preference optimisation without a reference", data="pairs",
    build=build_simpo, settings=SimPOSettings))
register(ObjectiveSpec(
    name="orpo", summary="ORPO: chosen NLL plus an odds-ratio preference term, no reference", data="pairs",
    build=build_orpo, settings=ORPOSettings))
