"""PPO for language models: KL penalty, per-token rewards, GAE, clipped losses and the value head.

The recipe is the RLHF one of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
Preferences") and Ouyang et al. 2022 (InstructGPT), with the losses of Schulman et al. 2017
("Proximal Policy Optimization Algorithms"). Every completion token is an action; the reward of
the whole sequence arrives on its last token, and each token pays a KL penalty for moving away
from the reference model.

All tensors are ``[batch, positions]`` with a ``mask`` that is 1 on the completion tokens that
count and 0 elsewhere (prompt, padding). Positions with mask 0 never affect a result; the
functions return 0 there. Arithmetic is done in float32 whatever the input dtype.

Token means divide by the number of masked tokens in the batch, or by ``num_tokens`` when it is
given: pass the completion-token count of the whole accumulation window so that accumulating
micro-batches gives the same loss and gradients as one big batch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tunelab.errors import TunelabError

KLKind = Literal["k1", "k2", "k3"]

VALUE_HEAD_FILE = "value_head.safetensors"


def masked_mean(x: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """Mean of ``x`` over the masked positions (or their sum divided by ``num_tokens``).

    Returns 0 for an empty mask instead of NaN.
    """
    mask = mask.to(torch.float32)
    total = (x.to(torch.float32) * mask).sum()
    denominator = num_tokens if num_tokens is not None else mask.sum().clamp(min=1.0)
    return total / denominator


def kl_estimate(
    logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLKind = "k1", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy.

    With ``log r = ref_logp - logp`` (J. Schulman, "Approximating KL Divergence", 2020):

    - ``k1 = -log r``: unbiased, high variance, can be negative (the classic RLHF penalty);
    - ``k2 = (log r)^2 / 2``: biased, low variance, never negative;
    - ``k3 = (r - 1) - log r``: unbiased and never negative (GRPO's estimator).

    Args:
        logp: log-probs of the sampled tokens under the policy.
        ref_logp: log-probs of the same tokens under the reference model.
        kind: ``k1``, ``k2`` or ``k3``.
        mask: when given, the estimate is 0 where the mask is 0.

    Returns:
        A float32 tensor shaped like ``logp``.
    """
    log_ratio = ref_logp.to(torch.float32) - logp.to(torch.float32)
    if kind == "k1":
        kl = -log_ratio
    elif kind == "k2":
        kl = 0.5 * log_ratio.square()
    elif kind == "k3":
        kl = torch.expm1(log_ratio) - log_ratio
    else:
        raise ValueError(f"unknown KL estimator {kind!r}; choose k1, k2 or k3")
    return kl if mask is None else kl * mask.to(torch.float32)


class FixedKLController:
    """A constant KL coefficient (``update`` changes nothing)."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Keep the coefficient as it is."""

    def state_dict(self) -> dict[str, float]:
        """The coefficient, for checkpoints."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the coefficient from a checkpoint."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """The adaptive KL coefficient of Ziegler et al. 2019 (section 2.2).

    After each rollout batch with measured KL ``kl``, the coefficient moves toward the value that
    keeps the KL at ``target``: ``e = clip(kl / target - 1, -0.2, 0.2)`` and
    ``beta <- beta * (1 + e * n_steps / horizon)``.

    Args:
        init: the starting coefficient.
        target: the KL (in nats per sequence, as the caller measures it) to hold.
        horizon: how many steps (samples, as the caller counts them) a full correction takes.
    """

    def __init__(self, init: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target} and {horizon}")
        self.value = float(init)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient after a batch of ``n_steps`` whose mean KL was ``current_kl``."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """The coefficient, for checkpoints (target and horizon come from the config)."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the coefficient from a checkpoint."""
        self.value = float(state["value"])


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Position of the last masked token of each row (0 for a row without any)."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * (mask != 0)).argmax(dim=-1)


def token_rewards(
    score: torch.Tensor, kl: torch.Tensor, kl_coef: float | torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per-token rewards: ``-kl_coef * kl`` on every completion token, plus the score on the last one.

    This is the RLHF reward of Ziegler et al. 2019 (eq. 2), ``R(x, y) - beta * log(pi / ref)``,
    spread over tokens so that GAE assigns credit.

    Args:
        score: ``[batch]`` sequence scores (reward model or rule reward).
        kl: ``[batch, positions]`` per-token KL estimates (see :func:`kl_estimate`).
        kl_coef: the KL coefficient (a controller's ``value``).
        mask: the completion tokens.

    Returns:
        ``[batch, positions]`` float32 rewards, 0 outside the mask.
    """
    mask_f = mask.to(torch.float32)
    rewards = -kl_coef * kl.to(torch.float32) * mask_f
    rows = torch.arange(mask.shape[0], device=mask.device)
    has_tokens = mask_f.sum(dim=-1) > 0
    bonus = torch.where(has_tokens, score.to(torch.float32), torch.zeros_like(score, dtype=torch.float32))
    return rewards.index_put((rows, last_token_index(mask)), bonus, accumulate=True)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over each row's masked tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, where
    ``t + 1`` is the row's next masked token; after the last one the episode ends (``V = 0``).
    Masked-out positions (prompt, padding, or a gap such as a tool reply) are skipped, so rows may
    be right-padded and may start at different positions.

    Args:
        rewards: per-token rewards (see :func:`token_rewards`).
        values: value estimates of the same tokens, from the rollout (no gradient).
        mask: the completion tokens.
        gamma: discount.
        lam: GAE lambda (1 gives Monte-Carlo returns minus values, 0 gives one-step TD).

    Returns:
        ``(advantages, returns)``, float32, 0 outside the mask; ``returns = advantages + values``
        are the value targets.
    """
    rewards = rewards.detach().to(torch.float32)
    values = values.detach().to(torch.float32)
    valid = mask != 0
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        here = valid[:, t]
        advantages[:, t] = torch.where(here, advantage, 0.0)
        next_value = torch.where(here, values[:, t], next_value)
        next_advantage = torch.where(here, advantage, next_advantage)
    returns = (advantages + values) * valid
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to unit variance over the masked positions (and zero mean with ``shift_mean``).

    The variance is the unbiased (Bessel-corrected) one; with fewer than two masked values it
    counts as 0. Used on advantages before the policy loss (PPO's advantage normalisation).

    Returns:
        float32, 0 outside the mask.
    """
    x = x.to(torch.float32)
    mask_f = mask.to(torch.float32)
    count = mask_f.sum()
    mean = (x * mask_f).sum() / count.clamp(min=1.0)
    centred = (x - mean) * mask_f
    variance = centred.square().sum() / (count - 1.0).clamp(min=1.0) if count > 1 else torch.zeros_like(count)
    white = (x - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        white = white + mean
    return white * mask_f


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate loss (Schulman et al. 2017, eq. 7), as a token mean.

    With ``ratio = exp(logp - old_logp)``, each token contributes
    ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))``.

    Args:
        logp: log-probs of the sampled tokens under the current policy (with gradient).
        old_logp: their log-probs under the policy that sampled them (treated as constants).
        advantages: per-token advantages (usually whitened).
        mask: the completion tokens.
        clip_range: ``eps``.
        num_tokens: the token-mean denominator (see the module docstring).

    Returns:
        ``(loss, clip_fraction, approx_kl)``: the clip fraction is the share of tokens whose
        clipped term was the larger; ``approx_kl`` estimates KL(old || new) with k3 (both
        metrics detached).
    """
    # Rollout-time quantities are constants of the update, whatever graph they came from.
    log_ratio = logp.to(torch.float32) - old_logp.detach().to(torch.float32)
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach().to(torch.float32)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, num_tokens)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(torch.float32), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped value loss of PPO implementations (OpenAI baselines ppo2; Ziegler et al. 2019).

    ``V_clip = old + clip(V - old, -c, c)``; each token contributes
    ``0.5 * max((V - R)^2, (V_clip - R)^2)``.

    Args:
        values: current value predictions (with gradient).
        old_values: the predictions made at rollout time (treated as constants).
        returns: value targets from :func:`gae`.
        mask: the completion tokens.
        clip_range_value: ``c``.
        num_tokens: the token-mean denominator (see the module docstring).

    Returns:
        ``(loss, clip_fraction)``: the share of tokens where the clipped error was the larger
        (detached).
    """
    values = values.to(torch.float32)
    old_values = old_values.detach().to(torch.float32)
    returns = returns.detach().to(torch.float32)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    error = (values - returns).square()
    clipped_error = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(error, clipped_error), mask, num_tokens)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > error).to(torch.float32), mask)
    return loss, clip_fraction


def entropy_bonus(
    entropy: torch.Tensor, mask: torch.Tensor, coef: float, num_tokens: float | None = None
) -> torch.Tensor:
    """The entropy term to add to the loss: ``-coef * mean token entropy`` (it rewards exploration)."""
    return -coef * masked_mean(entropy, mask, num_tokens)


class ValueHead(torch.nn.Module):
    """The critic: a linear map from the policy's last hidden state to a scalar value.

    It shares the policy's backbone (one forward gives logits and values). The weights start at
    zero, so every value starts at 0 and the first updates do not disturb the backbone. The
    head keeps float32 weights and computes in float32 whatever the backbone's dtype.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.linear = torch.nn.Linear(hidden_size, 1, dtype=torch.float32)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., hidden_size]`` hidden states -> ``[...]`` values."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)

    def save(self, directory: str | Path) -> Path:
        """Write ``value_head.safetensors`` (hidden size in its metadata) into ``directory``."""
        path = Path(directory) / VALUE_HEAD_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"hidden_size": str(self.hidden_size)})
        return path

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> ValueHead:
        """Read a head written by :meth:`save`.

        Raises:
            TunelabError: the directory has no value head file.
        """
        path = Path(directory) / VALUE_HEAD_FILE
        if not path.is_file():
            raise TunelabError(f"{directory}: no {VALUE_HEAD_FILE} (a PPO checkpoint saves its value head there)")
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - safe_open has no iterator
        head = cls(state["linear.weight"].shape[1]).to(device)
        head.load_state_dict(state)
        return head


def token_values(value_head: ValueHead, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token values aligned with the completion tokens.

    The value of token ``t`` is that of the state before it was chosen, so it is read from the
    hidden state at ``t - 1``, the same position whose logits give the token's log-prob.

    Args:
        value_head: the critic.
        hidden: ``[batch, positions, hidden]`` last hidden states (after the final norm) of the
            same batch, e.g. ``forward_tokens(..., hidden=True).hidden`` from :mod:`tunelab.models.logprobs`.
        mask: the completion tokens.

    Returns:
        ``[batch, positions]`` float32 values, 0 outside the mask.
    """
    values = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    values[:, 1:] = value_head(hidden[:, :-1])
    return values * mask.to(torch.float32)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over the mask: how well the critic predicts (1 is perfect)."""
    mask_f = mask.to(torch.float32)
    count = mask_f.sum().clamp(min=1.0)

    def variance(x: torch.Tensor) -> torch.Tensor:
        mean = (x * mask_f).sum() / count
        return (((x - mean) * mask_f).square()).sum() / count

    target_variance = variance(returns.to(torch.float32)).item()
    if target_variance == 0:
        return math.nan
    return 1.0 - variance((returns - values).to(torch.float32)).item() / target_variance
