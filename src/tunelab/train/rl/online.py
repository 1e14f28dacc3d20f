"""What every online RL objective shares: from scored rollouts to the engine's micro-batches.

An online objective (GRPO, PPO, RLOO, ...) gets one RL step's scored rollouts from the rollout
source (:mod:`tunelab.train.rl.source`) and :meth:`OnlineObjective.prepare` turns them into the
windows of that step's optimizer steps: the rollout batch goes to the device once, the policy's
own log-probs before the update (needed for several updates per batch, and by a critic) and the
reference's are computed without gradient, the objective's :meth:`~OnlineObjective.advantages`
are computed, and the rows are split into ``update_epochs × minibatches`` shuffled minibatches
(seeded by step and epoch), each cut into micro-batches of ``generation_batch_size`` rows. The
engine then runs each window like any other (backward over its micro-batches, clip, step), so
precision, accumulation and the distributed strategies are the engine's: with several processes,
each runs every W-th micro-batch of a window.

Losses are token means over the window's completion tokens (DAPO's normalisation), so a window's
micro-batches add up to one big batch on any number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tunelab.config import TrainConfig, TunelabConfig
from tunelab.train.objectives.base import Metrics
from tunelab.train.rl.ppo import AdaptiveKLController, FixedKLController, masked_mean
from tunelab.train.rl.rollout import RolloutBatch, Rollouts, TokenStats, collate_rollouts, forward_tokens

ONLINE_SETTINGS = ("reward_fn", "reward_weights", "reward_model", "num_generations", "prompts_per_step",
                   "max_new_tokens", "temperature", "top_p", "generation_batch_size", "rollout_generator",
                   "vllm_gpu_memory_utilization", "kl_coef", "clip_range", "update_epochs", "minibatches",
                   "entropy_coef")
"""The ``train.*`` keys every online objective reads (the rollout and update settings)."""


@dataclass
class PreparedRollouts:
    """One RL step's rollout batch on the device, with everything its losses need (no gradient).

    Attributes:
        batch: prompt + completion rows.
        start_logprobs: the policy's per-token log-probs before the update (None: not needed).
        start_hidden: its last hidden states (for a critic; None otherwise).
        reference_logprobs: the reference model's (None without a KL term).
        advantages: ``[B]`` per-sequence or ``[B, T]`` per-token advantages.
        extras: objective-specific tensors (PPO: old values, returns), ``[B, ...]``.
        multiple_updates: more than one optimizer step per rollout batch (the ratio is then not 1).
    """

    batch: RolloutBatch
    start_logprobs: torch.Tensor | None
    reference_logprobs: torch.Tensor | None
    advantages: torch.Tensor
    extras: dict[str, torch.Tensor]
    multiple_updates: bool


@dataclass
class RolloutPiece:
    """A micro-batch of an online step: some rows of the prepared rollouts."""

    prepared: PreparedRollouts
    rows: list[int]

    def to(self, device: torch.device | str) -> RolloutPiece:
        """Already on the device (the prepared tensors live there)."""
        return self

    @property
    def num_tokens(self) -> int:
        """Prompt and completion tokens of these rows."""
        return int(self.prepared.batch.attention_mask[self.rows].sum())

    def select(self) -> tuple[RolloutBatch, Callable[[torch.Tensor | None], torch.Tensor | None]]:
        """These rows trimmed to their longest sequence, and a function cutting aligned tensors the same way."""
        batch = self.prepared.batch
        index = torch.tensor(self.rows, device=batch.input_ids.device)
        width = int(batch.attention_mask[index].sum(dim=1).max())
        take = lambda t: t[index, :width]  # noqa: E731
        sub = RolloutBatch(take(batch.input_ids), take(batch.attention_mask), take(batch.position_ids),
                           take(batch.completion_mask))
        return sub, lambda x: None if x is None else (x[index] if x.dim() == 1 else x[index, :width])


def minibatch_rows(size: int, minibatches: int, seed: int, step: int, epoch: int) -> list[list[int]]:
    """Split rollout rows into ``minibatches`` shuffled groups (seeded by step and epoch)."""
    order = np.random.default_rng([seed, step, epoch, 7]).permutation(size).tolist()
    return [sorted(order[k::minibatches]) for k in range(minibatches) if order[k::minibatches]]


def chunks(rows: list[int], size: int) -> list[list[int]]:
    """``rows`` in pieces of at most ``size`` (micro-batches of one optimizer step)."""
    return [rows[k : k + size] for k in range(0, len(rows), size)]


def reference_tokens(policy: torch.nn.Module, reference: torch.nn.Module | None, batch: RolloutBatch,
                     temperature: float) -> torch.Tensor:
    """Per-token log-probs under the reference: the frozen copy, or the policy with adapters off."""
    with torch.no_grad():
        if reference is not None:
            return forward_tokens(reference, batch, temperature).logprobs
        with policy.disable_adapter():
            return forward_tokens(policy, batch, temperature).logprobs


def needs_a_reward(config: TunelabConfig) -> str | None:
    """The config rule every online objective shares: a reward, and one weight per reward function."""
    train = config.train
    if not train.reward_fn and not train.reward_model:
        return (f"train.objective {train.objective} needs a reward: set train.reward_fn (e.g. [gsm8k] or "
                "module:function) and/or train.reward_model")
    if train.reward_weights is not None and len(train.reward_weights) != len(train.reward_fn):
        return f"train.reward_weights has {len(train.reward_weights)} weights for {len(train.reward_fn)} reward functions"
    return None


def needs_groups(config: TunelabConfig) -> str | None:
    """:func:`needs_a_reward`, and at least 2 samples per prompt (group-relative advantages)."""
    if (problem := needs_a_reward(config)) is not None:
        return problem
    if config.train.num_generations < 2:
        return (f"train.num_generations must be at least 2 for {config.train.objective} (advantages compare "
                "the answers to the same prompt)")
    return None


class OnlineObjective:
    """The shared part of online objectives; subclasses define the advantages and the piece loss.

    Args:
        train: the ``train`` section.
        reference: the frozen reference model (full/freeze fine-tuning with a KL term); None for
            LoRA (adapters switched off) or no KL term.
    """

    uses_critic = False  # PPO: the policy's hidden states feed a value head

    def __init__(self, train: TrainConfig, reference: torch.nn.Module | None) -> None:
        self.train, self.reference = train, reference
        self.kl_controller = (AdaptiveKLController(train.kl_coef, train.kl_target, horizon=10_000)
                              if train.kl_target else FixedKLController(train.kl_coef))
        self.temperature = train.temperature or 1.0

    # -- what the engine and the rollout source ask ------------------------------------------------

    def heads(self) -> dict[str, torch.nn.Module]:
        """No modules besides the model (PPO adds its value head)."""
        return {}

    @property
    def samples_per_prompt(self) -> int:
        """Answers sampled per prompt."""
        return self.train.num_generations

    @property
    def optimizer_steps_per_step(self) -> int:
        """Optimizer steps one RL step takes (``update_epochs × minibatches``)."""
        return self.train.update_epochs * self.train.minibatches

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the weights (the KL coefficient)."""
        return {"kl_controller": self.kl_controller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.kl_controller.load_state_dict(state["kl_controller"])

    def prepare(self, model: torch.nn.Module, rollouts: Rollouts, rewards: Sequence[float], step: int, pad_id: int,
                device: torch.device, autocast: Callable[[], Any]) -> tuple[list[list[RolloutPiece]], dict[str, float]]:
        """One RL step's optimizer windows from its scored rollouts, and the step's metrics.

        Called with the model in training mode and, under a sharded strategy, its parameters
        reachable (the engine's generation context).
        """
        t = self.train
        batch = collate_rollouts(rollouts, pad_id).to(device)
        scores = torch.tensor(list(rewards), dtype=torch.float32, device=device)
        multiple_updates = self.optimizer_steps_per_step > 1
        start = None
        with torch.no_grad(), autocast():
            if multiple_updates or self.uses_critic:
                start = forward_tokens(model, batch, self.temperature, hidden=self.uses_critic)
            ref = (reference_tokens(model, self.reference, batch, self.temperature) if self.kl_controller.value
                   else None)
        advantages, extras, metrics = self.advantages(scores, rollouts, batch, start, ref)
        prepared = PreparedRollouts(batch, start.logprobs if start is not None else None, ref, advantages, extras,
                                    multiple_updates)
        windows = [
            [RolloutPiece(prepared, piece) for piece in chunks(rows, t.generation_batch_size)]
            for epoch in range(t.update_epochs)
            for rows in minibatch_rows(len(rollouts), t.minibatches, t.seed, step, epoch)
        ]
        return windows, {**metrics, "kl_coef": self.kl_controller.value}

    def window_totals(self, window: Sequence[RolloutPiece]) -> dict[str, float]:
        """The window's completion tokens (every loss is a token mean over them)."""
        rows = [row for piece in window for row in piece.rows]
        mask = window[0].prepared.batch.completion_mask
        return {"units": float(mask[rows].sum())}

    def loss(self, model: torch.nn.Module, piece: RolloutPiece, totals: dict[str, float]) -> tuple[torch.Tensor, Metrics]:
        """This piece's share of the window's loss (entropy bonus included), and its metrics."""
        sub, cut = piece.select()
        stats = forward_tokens(model, sub, self.temperature, entropy=True, hidden=self.uses_critic)
        prepared = piece.prepared
        old_logp = cut(prepared.start_logprobs) if prepared.multiple_updates else stats.logprobs.detach()
        mask = sub.completion_mask
        tokens = totals["units"]
        loss, metrics = self.piece_loss(stats, old_logp, cut(prepared.reference_logprobs), cut(prepared.advantages),
                                        {name: cut(value) for name, value in prepared.extras.items()}, mask, tokens)
        entropy = -self.train.entropy_coef * masked_mean(stats.entropy, mask, tokens)
        metrics["entropy"] = float(masked_mean(stats.entropy.detach(), mask))
        return loss + entropy, {name: (value, 1) for name, value in metrics.items()}

    # -- what each objective defines -------------------------------------------------------------

    def advantages(self, scores: torch.Tensor, rollouts: Rollouts, batch: RolloutBatch, start: TokenStats | None,
                   ref: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
        """Advantages (``[B]`` or ``[B, T]``), extra per-row tensors for the loss, and step metrics."""
        raise NotImplementedError

    def piece_loss(self, stats: TokenStats, old_logp: torch.Tensor, ref: torch.Tensor | None,
                   advantages: torch.Tensor, extras: dict[str, torch.Tensor], mask: torch.Tensor,
                   tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The policy (and critic) loss of some rows as their share of the window's token mean, and metrics."""
        raise NotImplementedError
