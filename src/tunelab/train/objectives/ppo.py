"""PPO as an online objective: per-token KL penalty, the score on the last token, GAE over a value head.

The math (KL estimators and controllers, token rewards, GAE, whitening, clipped policy and value
losses, the value head) is in :mod:`tunelab.train.rl.ppo`; rollouts, reference log-probs and
minibatches are :class:`~tunelab.train.rl.online.OnlineObjective`'s. The value head shares the
policy's backbone; the engine trains, distributes and checkpoints it with the model and saves it
as ``value_head.safetensors`` in ``final/``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from tunelab.train.objectives.registry import ObjectiveSpec, register
from tunelab.train.rl.online import OnlineObjective, OnlineSettings
from tunelab.train.rl.ppo import (
    VALUE_HEAD_FILE,
    ValueHead,
    gae,
    kl_estimate,
    policy_loss,
    token_rewards,
    token_values,
    value_loss,
    whiten,
)
from tunelab.models.logprobs import RolloutBatch, TokenStats
from tunelab.train.rl.rollout import Rollouts

VALUE_HEAD = VALUE_HEAD_FILE.removesuffix(".safetensors")


class PPOSettings(OnlineSettings):
    """ppo: the online RL settings, the critic (GAE, value loss) and an adaptive KL coefficient."""

    kl_target: float | None = Field(None, gt=0, description="Adapt kl_coef (its start value) towards this KL per "
                                    "sequence (null: fixed).")
    discount: float = Field(1.0, gt=0, le=1.0, description="Discount gamma of GAE.")
    gae_lambda: float = Field(0.95, ge=0, le=1.0, description="Lambda of GAE.")
    value_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    value_clip_range: float = Field(0.2, gt=0, description="Clip range of the value update.")
    whiten_advantages: bool = Field(True, description="Normalise advantages over the batch.")

    @property
    def uses_kl_penalty(self) -> bool:
        """A KL term when kl_coef is not 0, or an adaptive one (kl_target)."""
        return self.kl_coef > 0 or self.kl_target is not None


class PPOObjective(OnlineObjective):
    """PPO (Schulman et al. 2017) in the RLHF recipe of Ziegler et al. 2019, with a critic.

    Args:
        hidden_size: the policy's hidden size (the value head's input).
    """

    uses_critic = True

    def __init__(self, settings: PPOSettings, reference: torch.nn.Module | None, hidden_size: int) -> None:
        super().__init__(settings, reference)
        self.value_head = ValueHead(hidden_size)

    def heads(self) -> dict[str, torch.nn.Module]:
        """The value head (``value_head.safetensors``)."""
        return {VALUE_HEAD: self.value_head}

    def advantages(self, scores: torch.Tensor, rollouts: Rollouts, batch: RolloutBatch, start: TokenStats | None,
                   ref: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
        """GAE over per-token rewards (KL penalty on every token, the score on the last); moves the KL coefficient."""
        t, mask = self.settings, batch.completion_mask
        kl = kl_estimate(start.logprobs, ref, "k1") if ref is not None else torch.zeros_like(start.logprobs)
        with torch.no_grad():
            old_values = token_values(self.value_head, start.hidden, mask)
        rewards = token_rewards(scores, kl, self.kl_controller.value, mask)
        advantages, returns = gae(rewards, old_values, mask, t.discount, t.gae_lambda)
        if t.whiten_advantages:
            advantages = whiten(advantages, mask)
        sequence_kl = float(((kl * mask).sum(dim=1)).mean())
        self.kl_controller.update(sequence_kl, len(rollouts))
        return advantages, {"old_values": old_values, "returns": returns}, {"kl": sequence_kl}

    def piece_loss(self, stats: TokenStats, old_logp: torch.Tensor, ref: torch.Tensor | None,
                   advantages: torch.Tensor, extras: dict[str, torch.Tensor], mask: torch.Tensor,
                   tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Clipped policy loss plus ``value_coef`` times the clipped value loss."""
        t = self.settings
        loss, clip_fraction, approx_kl = policy_loss(stats.logprobs, old_logp, advantages, mask, t.clip_range, tokens)
        values = token_values(self.value_head, stats.hidden, mask)
        critic, value_clip = value_loss(values, extras["old_values"], extras["returns"], mask, t.value_clip_range,
                                        tokens)
        return loss + t.value_coef * critic, {
            "clip_fraction": float(clip_fraction), "approx_kl": float(approx_kl),
            "value_loss": float(critic.detach()) * tokens / max(float(mask.sum()), 1.0),
            "value_clip_fraction": float(value_clip)}


def build(settings: PPOSettings, reference: torch.nn.Module | None, model: torch.nn.Module) -> PPOObjective:
    """PPO from its section; the value head fits ``model``'s hidden size."""
    return PPOObjective(settings, reference, model.config.hidden_size)


register(ObjectiveSpec(
    name="ppo", summary="PPO: online RL with a value head (GAE) and a per-token KL penalty", data="prompts",
    build=build, settings=PPOSettings, reference="kl", packing=False, online=True))
