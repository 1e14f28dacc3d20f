"""GRPO as an online objective: group-relative advantages, the clipped loss with a k3 KL term, no critic.

The math (advantages, the loss and its normalisations) is in :mod:`tunelab.train.rl.grpo`; the
rollouts, reference log-probs and minibatches are :class:`~tunelab.train.rl.online.OnlineObjective`'s.
Losses use DAPO's token normalisation over each optimizer step's completion tokens, and the upper
clip range can be raised (``grpo.clip_range_high``, DAPO's clip-higher).
"""

from __future__ import annotations

import torch
from pydantic import Field

from tunelab.train.objectives.registry import ObjectiveSpec, register
from tunelab.train.rl.grpo import group_advantages, grpo_loss
from tunelab.train.rl.online import GroupSettings, OnlineObjective
from tunelab.models.logprobs import RolloutBatch, TokenStats
from tunelab.train.rl.rollout import Rollouts


class GRPOSettings(GroupSettings):
    """grpo: the online RL settings, and DAPO's clip-higher."""

    clip_range_high: float | None = Field(None, gt=0, description="Upper clip range (DAPO clip-higher; null: clip_range).")


class GRPOObjective(OnlineObjective):
    """GRPO (Shao et al. 2024) on the policy's own samples, ``num_generations`` per prompt."""

    def advantages(self, scores: torch.Tensor, rollouts: Rollouts, batch: RolloutBatch, start: TokenStats | None,
                   ref: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
        """Each answer's reward relative to its group (mean and standard deviation)."""
        return group_advantages(scores, rollouts.num_samples), {}, {}

    def piece_loss(self, stats: TokenStats, old_logp: torch.Tensor, ref: torch.Tensor | None,
                   advantages: torch.Tensor, extras: dict[str, torch.Tensor], mask: torch.Tensor,
                   tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The clipped GRPO loss with its KL term, as a share of the window's token mean."""
        t = self.settings
        loss, parts = grpo_loss(stats.logprobs, old_logp, ref, advantages, mask, t.clip_range,
                                t.clip_range_high or t.clip_range, self.kl_controller.value, "dapo", tokens)
        return loss, {name: float(value) for name, value in parts.items()}


def build(settings: GRPOSettings, reference: torch.nn.Module | None, model: torch.nn.Module) -> GRPOObjective:
    """GRPO from its section."""
    return GRPOObjective(settings, reference)


register(ObjectiveSpec(
    name="grpo", summary="GRPO: online RL, answers compared within their prompt's group, no critic",
    data="prompts", build=build, settings=GRPOSettings, reference="kl", packing=False, online=True))
