"""GRPO: group-relative advantages and the clipped objective with a KL penalty, no critic.

Shao et al. 2024 ("DeepSeekMath", section 4.1): sample ``G`` completions per prompt, score them,
and use each completion's reward relative to its own group as the advantage of all its tokens
(eq. 3 with outcome supervision). The loss is PPO's clipped surrogate plus ``beta`` times the
k3 estimate of KL(policy || reference) on every token.

The loss matches TRL 1.16's ``GRPOTrainer`` (token-level importance sampling, no vLLM
correction, no entropy masking) for the normalisations it names ``grpo``, ``dapo`` and
``dr_grpo``; TRL's default is ``dapo``. Tensors are ``[batch, positions]`` with a ``mask`` of the
completion tokens; they may be completion-only or aligned with prompt+completion.
"""

from __future__ import annotations

from typing import Literal

import torch

from tunelab.train.rl.ppo import kl_estimate, masked_mean

AdvantageScale = Literal["group", "batch", "none"]
Normalisation = Literal["grpo", "dapo", "dr_grpo"]

DEFAULT_EPS = 1e-4  # TRL's: std + 1e-4, so a group whose rewards are all equal gets advantage 0


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: AdvantageScale = "group", eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Each sample's reward relative to the other samples of its prompt.

    ``A_i = (r_i - mean(group)) / (std(group) + eps)`` with the unbiased standard deviation
    (DeepSeekMath eq. 3). ``scale="none"`` skips the division (Dr. GRPO, Liu et al. 2025: the std
    favours questions that are too easy or too hard); ``scale="batch"`` divides by the std of the
    whole batch instead.

    Args:
        rewards: ``[num_prompts * group_size]`` rewards, the samples of one prompt consecutive
            (the order :func:`~tunelab.train.rl.rollout.generate_rollouts` returns).
        group_size: ``G``, samples per prompt (at least 2).
        scale: ``group``, ``batch`` or ``none``.
        eps: added to the std.

    Returns:
        ``[num_prompts * group_size]`` float32 advantages.

    Raises:
        ValueError: ``group_size`` below 2, or rewards that do not split into groups.
    """
    if group_size < 2:
        raise ValueError(f"GRPO needs at least 2 samples per prompt, got group_size={group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    rewards = rewards.to(torch.float32)
    groups = rewards.view(-1, group_size)
    centred = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = groups.std(dim=1, keepdim=True).expand_as(groups).reshape(-1)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards)
    else:
        raise ValueError(f"unknown advantage scale {scale!r}; choose group, batch or none")
    return centred / (std + eps)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    beta: float = 0.0,
    normalisation: Normalisation = "dapo",
    num_tokens: float | None = None,
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss and its metrics.

    Per token, with ``ratio = exp(logp - old_logp)``:
    ``-min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) + beta * k3``, where
    ``k3 = exp(ref - logp) - (ref - logp) - 1`` (DeepSeekMath eq. 4). Asymmetric clipping
    (``clip_high > clip_low``, "clip-higher") is DAPO's (Yu et al. 2025).

    Normalisations:

    - ``grpo``: mean over each sequence's tokens, then mean over sequences (the paper; it
      favours short correct and long wrong answers);
    - ``dapo``: sum over all tokens / number of tokens (DAPO; TRL's default). Pass ``num_tokens``,
      the completion tokens of the whole accumulation window, so micro-batches add up exactly;
    - ``dr_grpo``: sum over all tokens / (sequences * ``max_completion_length``) (Dr. GRPO).

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the current policy (with gradient).
        old_logp: their log-probs when sampled (treated as constants); ``logp.detach()`` for a
            single update per rollout batch.
        ref_logp: their log-probs under the reference model; may be None when ``beta`` is 0.
        advantages: ``[B]`` per-sequence (or ``[B, T]`` per-token) advantages.
        mask: ``[B, T]`` completion tokens.
        clip_low: lower clip range ``eps_low``.
        clip_high: upper clip range ``eps_high``.
        beta: KL coefficient (0 skips the reference model).
        normalisation: ``grpo``, ``dapo`` or ``dr_grpo``.
        num_tokens: ``dapo`` only: the denominator (default: the tokens in ``mask``).
        max_completion_length: ``dr_grpo`` only: the generation budget in tokens.

    Returns:
        ``(loss, metrics)``; metrics are detached scalars: ``clip_fraction`` (tokens whose ratio
        was clipped in the direction of their advantage), ``clip_fraction_low``,
        ``clip_fraction_high`` and, when ``beta`` is not 0, ``kl`` (mean k3 per token).

    Raises:
        ValueError: ``ref_logp`` missing with ``beta`` set, ``dr_grpo`` without
            ``max_completion_length``, or an unknown normalisation.
    """
    logp = logp.to(torch.float32)
    mask_f = mask.to(torch.float32)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    advantages = advantages.detach().to(torch.float32)
    ratio = torch.exp(logp - old_logp.detach().to(torch.float32))
    clipped_ratio = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
    kl = None
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("grpo_loss: beta is not 0, so ref_logp (reference log-probs) is needed")
        kl = kl_estimate(logp, ref_logp.detach(), "k3")
        per_token = per_token + beta * kl

    if normalisation == "grpo":
        loss = ((per_token * mask_f).sum(dim=-1) / mask_f.sum(dim=-1).clamp(min=1.0)).mean()
    elif normalisation == "dapo":
        loss = masked_mean(per_token, mask_f, num_tokens)
    elif normalisation == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("grpo_loss: normalisation 'dr_grpo' needs max_completion_length")
        loss = (per_token * mask_f).sum() / (per_token.shape[0] * max_completion_length)
    else:
        raise ValueError(f"unknown GRPO normalisation {normalisation!r}; choose grpo, dapo or dr_grpo")

    with torch.no_grad():
        low = ((ratio < 1.0 - clip_low) & (advantages < 0)).to(torch.float32)
        high = ((ratio > 1.0 + clip_high) & (advantages > 0)).to(torch.float32)
        metrics = {
            "clip_fraction": masked_mean(torch.maximum(low, high), mask_f),
            "clip_fraction_low": masked_mean(low, mask_f),
            "clip_fraction_high": masked_mean(high, mask_f),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl, mask_f)
    return loss, metrics
