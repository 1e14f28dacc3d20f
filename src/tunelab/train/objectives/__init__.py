"""Objectives: each turns micro-batches into its share of a step's loss (see :mod:`.base`).

``sft``/``pretrain``: next-token loss; ``reward``: Bradley-Terry; ``dpo``/``simpo``/``orpo``:
preference pairs; ``kto``: labelled records.
"""

from __future__ import annotations

import torch

from tunelab.config import TrainConfig
from tunelab.train.objectives.base import Metrics, Objective
from tunelab.train.objectives.kto import KTOObjective
from tunelab.train.objectives.preference import PreferenceObjective
from tunelab.train.objectives.reward import RewardObjective
from tunelab.train.objectives.sft import SFTObjective

DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "simpo": 2.0, "orpo": 0.1}
REFERENCE_OBJECTIVES = {"dpo", "kto"}  # compare the policy with a frozen reference model

__all__ = ["Metrics", "Objective", "REFERENCE_OBJECTIVES", "build_objective"]


def build_objective(train: TrainConfig, reference: torch.nn.Module | None = None) -> Objective:
    """The objective a training config asks for.

    Args:
        train: the ``train`` section (objective, beta, loss_type, ...).
        reference: the frozen reference model for DPO/KTO with full or freeze fine-tuning; None
            for LoRA (adapters switched off) or precomputed reference log-probs.
    """
    beta = train.beta if train.beta is not None else DEFAULT_BETA.get(train.objective, 0.1)
    if train.objective in ("sft", "pretrain"):
        return SFTObjective()
    if train.objective == "reward":
        return RewardObjective()
    if train.objective == "kto":
        return KTOObjective(beta, train.desirable_weight, train.undesirable_weight, reference)
    return PreferenceObjective(train.objective, beta, train.loss_type, train.label_smoothing, train.gamma, reference,
                               train.rpo_alpha)
