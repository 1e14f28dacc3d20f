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
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, ValidationInfo, model_validator

from tunelab.config.base import ObjectiveSettings, objective_name
from tunelab.train.objectives.base import Metrics
from tunelab.train.rl.ppo import AdaptiveKLController, FixedKLController, masked_mean
from tunelab.models.logprobs import RolloutBatch, TokenStats, forward_tokens
from tunelab.train.rl.rollout import Rollouts, collate_rollouts

class OnlineSettings(ObjectiveSettings):
    """The settings every online objective shares: rollouts (sampling, rewards) and the update.

    An online objective's settings class extends this one (GRPO adds ``clip_range_high``, PPO its
    critic and adaptive KL settings); its section is named after the objective (``grpo:``, ``ppo:``).
    """

    reward_fn: list[str] = Field(
        default_factory=list,
        description="Reward functions, built-in (exact_match, gsm8k, format, length) or module:function / "
        "path/file.py:function; several are summed with reward_weights.",
    )
    reward_weights: list[float] | None = Field(None, description="One weight per reward_fn (default 1 each).")
    reward_model: str | None = Field(
        None, description="A reward model directory (tunelab train.objective: reward output) scoring answers."
    )
    num_generations: int = Field(
        4, ge=1, description="Answers sampled per prompt (the group size of the group-relative objectives, at least 2 there)."
    )
    prompts_per_step: int = Field(8, ge=1, description="Prompts per rollout phase (one RL step).")
    max_new_tokens: int = Field(64, ge=1, description="Longest sampled answer.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    generation_batch_size: int = Field(
        32, ge=1, description="Sequences per generate call, and rows per micro-batch of the update.")
    rollout_generator: Literal["batched", "one_by_one", "vllm"] = Field(
        "batched",
        description="What samples the rollouts. batched: the policy in memory, generation_batch_size sequences per "
        "generate call; one_by_one: one sequence per call (slow; for comparison); vllm: a vLLM engine in the "
        "training process on the same GPU (pip install vllm; CUDA), synced with the policy after every update.",
    )
    vllm_gpu_memory_utilization: float = Field(
        0.3, gt=0.0, lt=1.0,
        description="rollout_generator vllm: the share of the GPU's memory vLLM may take (its weights and KV cache); "
        "the rest is the training's.",
    )
    kl_coef: float = Field(0.04, ge=0.0, description="Weight of the KL penalty to the reference model.")
    clip_range: float = Field(0.2, gt=0, description="Clip range of the policy ratio.")
    update_epochs: int = Field(1, ge=1, description="Optimisation passes over each rollout batch.")
    minibatches: int = Field(1, ge=1, description="Optimizer steps per pass (the rollout batch is split).")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight.")

    @property
    def uses_kl_penalty(self) -> bool:
        """Whether the loss has a KL term to the reference (which then has to be computed)."""
        return self.kl_coef > 0

    @model_validator(mode="after")
    def _needs_a_reward(self, info: ValidationInfo) -> OnlineSettings:
        """A reward, and one weight per reward function."""
        name = objective_name(info)
        if not self.reward_fn and not self.reward_model:
            raise ValueError(f"{name} needs a reward: set {name}.reward_fn (e.g. [gsm8k] or module:function) "
                             f"and/or {name}.reward_model")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_fn):
            raise ValueError(f"{name}.reward_weights has {len(self.reward_weights)} weights for {len(self.reward_fn)} "
                             "reward functions")
        return self


class GroupSettings(OnlineSettings):
    """The settings of the group-relative objectives (GRPO, RLOO): at least 2 answers per prompt."""

    @model_validator(mode="after")
    def _needs_groups(self, info: ValidationInfo) -> GroupSettings:
        """Advantages compare the answers to the same prompt."""
        if self.num_generations < 2:
            name = objective_name(info)
            raise ValueError(f"{name}.num_generations must be at least 2 for {name} (advantages compare the answers "
                             "to the same prompt)")
        return self


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


class OnlineObjective:
    """The shared part of online objectives; subclasses define the advantages and the piece loss.

    Args:
        settings: the objective's own section.
        reference: the frozen reference model (full/freeze fine-tuning with a KL term); None for
            LoRA (adapters switched off) or no KL term.
    """

    uses_critic = False  # PPO: the policy's hidden states feed a value head

    def __init__(self, settings: OnlineSettings, reference: torch.nn.Module | None) -> None:
        self.settings, self.reference = settings, reference
        kl_target = getattr(settings, "kl_target", None)  # PPO's adaptive KL
        self.kl_controller = (AdaptiveKLController(settings.kl_coef, kl_target, horizon=10_000)
                              if kl_target else FixedKLController(settings.kl_coef))
        self.temperature = settings.temperature or 1.0

    # -- what the engine and the rollout source ask ------------------------------------------------

    def heads(self) -> dict[str, torch.nn.Module]:
        """No modules besides the model (PPO adds its value head)."""
        return {}

    @property
    def samples_per_prompt(self) -> int:
        """Answers sampled per prompt."""
        return self.settings.num_generations

    @property
    def optimizer_steps_per_step(self) -> int:
        """Optimizer steps one RL step takes (``update_epochs × minibatches``)."""
        return self.settings.update_epochs * self.settings.minibatches

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the weights (the KL coefficient)."""
        return {"kl_controller": self.kl_controller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.kl_controller.load_state_dict(state["kl_controller"])

    def prepare(self, model: torch.nn.Module, rollouts: Rollouts, rewards: Sequence[float], step: int, pad_id: int,
                device: torch.device, autocast: Callable[[], Any],
                seed: int) -> tuple[list[list[RolloutPiece]], dict[str, float]]:
        """One RL step's optimizer windows from its scored rollouts, and the step's metrics.

        Called with the model in training mode and, under a sharded strategy, its parameters
        reachable (the engine's generation context). ``seed`` (``train.seed``) seeds the minibatch split.
        """
        t = self.settings
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
            for rows in minibatch_rows(len(rollouts), t.minibatches, seed, step, epoch)
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
        entropy = -self.settings.entropy_coef * masked_mean(stats.entropy, mask, tokens)
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
