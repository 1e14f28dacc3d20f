"""Objectives: each turns micro-batches into its share of a step's loss (see :mod:`.base`).

Every objective is declared by its own file here through :mod:`.registry` (name, data kind,
reference need, packing support, settings); :func:`build_objective` builds the one a config names.
"""

from __future__ import annotations

import torch

from tunelab.config import TunelabConfig
from tunelab.train.objectives.base import Metrics, Objective
from tunelab.train.objectives.registry import ObjectiveSpec, objective_spec, objective_specs, register

__all__ = ["Metrics", "Objective", "ObjectiveSpec", "build_objective", "objective_spec", "objective_specs",
           "register"]


def build_objective(config: TunelabConfig, reference: torch.nn.Module | None = None,
                    model: torch.nn.Module | None = None) -> Objective:
    """The objective a config asks for, built from its own section (it sees no other key).

    Args:
        config: the run's config (``train.objective`` and the section named after it).
        reference: the frozen reference model when the objective needs one and the method has no
            adapters to switch off; None for LoRA (adapters switched off), precomputed reference
            log-probs, or an objective without a reference.
        model: the policy, for objectives whose own modules fit it (PPO's value head).
    """
    return objective_spec(config.train.objective).build(config.objective_settings, reference, model)
