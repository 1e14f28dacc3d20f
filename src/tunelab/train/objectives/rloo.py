"""RLOO: REINFORCE with a leave-one-out baseline, as an online objective.

Ahmadian et al. 2024 ("Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
Human Feedback in LLMs", eq. 7): sample ``k`` answers per prompt; each answer's baseline is the
mean reward of the *other* ``k - 1`` answers to the same prompt, so its advantage is

    A_i = r_i - 1/(k-1) * sum_{j != i} r_j = k/(k-1) * (r_i - mean(r))

an unbiased baseline that needs no critic and, unlike GRPO, no division by the group's standard
deviation. Every token of an answer gets its advantage; the update is the clipped surrogate with
an optional k3 KL term to the reference (``rloo.kl_coef``), token-averaged over each optimizer
step's completion tokens, exactly as GRPO's loss (:func:`tunelab.train.rl.grpo.grpo_loss`), so
several updates per rollout batch stay proximal. Its section (``rloo:``) holds the online RL
settings (``num_generations`` is ``k``, at least 2).
"""

from __future__ import annotations

import torch

from tunelab.train.objectives.registry import ObjectiveSpec, register
from tunelab.train.rl.grpo import grpo_loss
from tunelab.train.rl.online import GroupSettings, OnlineObjective
from tunelab.models.logprobs import RolloutBatch, TokenStats
from tunelab.train.rl.rollout import Rollouts


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each sample's reward minus the mean reward of the other samples of its prompt.

    Args:
        rewards: ``[num_prompts * group_size]``, the samples of one prompt consecutive.
        group_size: ``k``, samples per prompt (at least 2).

    Returns:
        ``[num_prompts * group_size]`` float32 advantages (each group sums to 0).

    Raises:
        ValueError: ``group_size`` below 2, or rewards that do not split into groups.
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got group_size={group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.to(torch.float32).view(-1, group_size)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


class RLOOObjective(OnlineObjective):
    """RLOO on the policy's own samples, ``num_generations`` per prompt."""

    def advantages(self, scores: torch.Tensor, rollouts: Rollouts, batch: RolloutBatch, start: TokenStats | None,
                   ref: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
        """Leave-one-out advantages (one per answer)."""
        advantages = leave_one_out_advantages(scores, rollouts.num_samples)
        return advantages, {}, {"advantage_abs": float(advantages.abs().mean())}

    def piece_loss(self, stats: TokenStats, old_logp: torch.Tensor, ref: torch.Tensor | None,
                   advantages: torch.Tensor, extras: dict[str, torch.Tensor], mask: torch.Tensor,
                   tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The clipped surrogate with the k3 KL term, as a share of the window's token mean."""
        t = self.settings
        loss, parts = grpo_loss(stats.logprobs, old_logp, ref, advantages, mask, t.clip_range, t.clip_range,
                                self.kl_controller.value, "dapo", tokens)
        return loss, {name: float(value) for name, value in parts.items()}


def build(settings: GroupSettings, reference: torch.nn.Module | None, model: torch.nn.Module) -> RLOOObjective:
    """RLOO from its section."""
    return RLOOObjective(settings, reference)


register(ObjectiveSpec(
    name="rloo", summary="RLOO: online RL, REINFORCE with the other answers to the prompt as baseline, no critic",
    data="prompts", build=build, settings=GroupSettings, reference="kl", packing=False, online=True))
