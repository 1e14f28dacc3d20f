"""PPO pieces against independent float64 implementations written from the papers' equations.

TRL 1.16 no longer has PPO, so each oracle here restates the equation: GAE as an explicit reversed
loop over each sequence's own tokens (Schulman et al. 2016, eq. 16), the clipped surrogate (Schulman
et al. 2017, eq. 7), the clipped value loss (OpenAI baselines ppo2), Schulman's k1/k2/k3 KL
estimators and the adaptive KL controller (Ziegler et al. 2019). Inputs are seeded random float32
tensors with ragged masks (different prompt offsets, lengths, one gap); results must agree within 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.train.rl.ppo import (
    AdaptiveKLController,
    FixedKLController,
    ValueHead,
    entropy_bonus,
    explained_variance,
    gae,
    kl_estimate,
    policy_loss,
    token_rewards,
    token_values,
    value_loss,
    whiten,
)

B, T = 5, 14
SPANS = [(3, 14), (5, 9), (1, 13), (8, 9), (2, 12)]  # [start, stop) of each row's completion tokens


def _mask() -> torch.Tensor:
    mask = torch.zeros(B, T, dtype=torch.long)
    for row, (start, stop) in enumerate(SPANS):
        mask[row, start:stop] = 1
    mask[2, 6:8] = 0  # a gap inside a completion (e.g. a tool reply that is not an action)
    return mask


def _random(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _episodes(mask: torch.Tensor) -> list[list[int]]:
    """Each row's action positions in order: the episode the paper's sums run over."""
    return [[t for t in range(T) if mask[row, t]] for row in range(B)]


def _oracle_gae(rewards, values, mask, gamma, lam):
    rewards, values = rewards.double(), values.double()
    advantages = torch.zeros(B, T, dtype=torch.float64)
    for row, positions in enumerate(_episodes(mask)):
        running = 0.0
        for k in reversed(range(len(positions))):
            t = positions[k]
            next_value = values[row, positions[k + 1]] if k + 1 < len(positions) else 0.0
            delta = rewards[row, t] + gamma * next_value - values[row, t]
            running = delta + gamma * lam * running
            advantages[row, t] = running
    returns = (advantages + values) * mask
    return advantages, returns


def _masked_mean64(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.double()
    return (x * mask).sum() / mask.sum()


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.9), (0.9, 0.0), (1.0, 1.0)])
def test_gae_equals_reversed_loop(gamma: float, lam: float) -> None:
    mask = _mask()
    rewards = _random(0, B, T) * mask
    values = _random(1, B, T) * mask
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected_adv, expected_ret = _oracle_gae(rewards, values, mask, gamma, lam)
    assert advantages.dtype == torch.float32
    torch.testing.assert_close(advantages.double(), expected_adv, atol=1e-5, rtol=0)
    torch.testing.assert_close(returns.double(), expected_ret, atol=1e-5, rtol=0)
    assert advantages[mask == 0].abs().max().item() == 0.0


def test_gae_hand_computed() -> None:
    """Reward 1 on the last of three tokens, values 0: gamma=0.5, lam=1 gives 0.25, 0.5, 1."""
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, torch.zeros(1, 5), mask, gamma=0.5, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.0, 0.25, 0.5, 1.0, 0.0]]))
    torch.testing.assert_close(returns, advantages)
    # A critic that already predicts the return leaves nothing to explain with lam = 0.
    values = torch.tensor([[0.0, 0.25, 0.5, 1.0, 0.0]])
    advantages, _ = gae(rewards, values, mask, gamma=0.5, lam=0.0)
    torch.testing.assert_close(advantages, torch.zeros(1, 5))


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators_equal_schulman_formulas(kind: str) -> None:
    mask = _mask()
    logp = -_random(2, B, T).abs() - 0.1
    ref = logp + _random(3, B, T, scale=0.5)
    log_r = ref.double() - logp.double()  # r = ref(x) / policy(x), x sampled from the policy
    r = torch.exp(log_r)
    expected = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": (r - 1) - log_r}[kind] * mask
    torch.testing.assert_close(kl_estimate(logp, ref, kind, mask).double(), expected, atol=1e-5, rtol=0)


def test_kl_estimators_are_unbiased_on_samples() -> None:
    """Sampling from q, the means of k1 and k3 approach the exact KL(q || p); k3 is never negative."""
    generator = torch.Generator().manual_seed(4)
    q = torch.softmax(torch.randn(50, generator=generator), 0)
    p = torch.softmax(torch.randn(50, generator=generator), 0)
    exact = (q * (q.log() - p.log())).sum().item()
    tokens = torch.multinomial(q, 200_000, replacement=True, generator=generator)
    logp, ref = q.log()[tokens], p.log()[tokens]
    for kind in ("k1", "k3"):
        assert kl_estimate(logp, ref, kind).mean().item() == pytest.approx(exact, rel=0.03)
    assert kl_estimate(logp, ref, "k3").min().item() >= 0.0
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        kl_estimate(logp, ref, "k4")


@pytest.mark.parametrize("clip_range", [0.1, 0.2])
def test_policy_loss_equals_clipped_surrogate(clip_range: float) -> None:
    mask = _mask()
    old = -_random(5, B, T).abs()
    logp = (old + _random(6, B, T, scale=0.3)).requires_grad_(True)
    advantages = _random(7, B, T)
    loss, clip_fraction, approx_kl = policy_loss(logp, old, advantages, mask, clip_range)
    loss.backward()

    logp64 = logp.detach().double().requires_grad_(True)
    ratio = torch.exp(logp64 - old.double())
    a = advantages.double()
    surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_range, 1 + clip_range) * a)
    expected = -_masked_mean64(surrogate, mask)
    expected.backward()
    clipped = ((ratio > 1 + clip_range) & (a > 0)) | ((ratio < 1 - clip_range) & (a < 0))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    torch.testing.assert_close(logp.grad.double(), logp64.grad, atol=1e-6, rtol=1e-5)
    assert clip_fraction.item() == pytest.approx(_masked_mean64(clipped.double(), mask).item(), abs=1e-6)
    assert 0.05 < clip_fraction.item() < 0.95  # the clip actually bites in this test
    # k3 estimate of KL(old || new) from tokens sampled by the old policy: r = new / old.
    r = ratio.detach()
    assert approx_kl.item() == pytest.approx(_masked_mean64(r - 1 - torch.log(r), mask).item(), abs=1e-5)


def test_policy_loss_accumulation_equals_one_batch() -> None:
    mask = _mask()
    old = -_random(8, B, T).abs()
    logp = old + _random(9, B, T, scale=0.3)
    advantages = _random(10, B, T)
    whole, _, _ = policy_loss(logp, old, advantages, mask, 0.2)
    total = float(mask.sum())
    parts = [policy_loss(logp[s], old[s], advantages[s], mask[s], 0.2, num_tokens=total)[0] for s in
             (slice(0, 3), slice(3, B))]
    assert sum(p.item() for p in parts) == pytest.approx(whole.item(), abs=1e-6)


def test_value_loss_equals_clipped_value_loss() -> None:
    mask = _mask()
    old = _random(11, B, T)
    values = (old + _random(12, B, T, scale=0.5)).requires_grad_(True)
    returns = _random(13, B, T)
    c = 0.2
    loss, clip_fraction = value_loss(values, old, returns, mask, c)
    loss.backward()
    v = values.detach().double().requires_grad_(True)
    clipped_v = torch.clamp(v, old.double() - c, old.double() + c)
    errors = torch.maximum((v - returns.double()) ** 2, (clipped_v - returns.double()) ** 2)
    expected = 0.5 * _masked_mean64(errors, mask)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    torch.testing.assert_close(values.grad.double(), v.grad, atol=1e-6, rtol=1e-5)
    frac = _masked_mean64(((clipped_v - returns.double()) ** 2 > (v - returns.double()) ** 2).double(), mask)
    assert clip_fraction.item() == pytest.approx(frac.item(), abs=1e-6)
    assert 0.05 < clip_fraction.item() < 0.95


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_equals_masked_standardisation(shift_mean: bool) -> None:
    mask = _mask()
    x = _random(14, B, T, scale=3.0) + 2.0
    values = x.double()[mask.bool()]
    mean, std = values.mean(), values.std(unbiased=True)
    expected = (x.double() - mean) / std + (0 if shift_mean else mean)
    result = whiten(x, mask, shift_mean=shift_mean)
    torch.testing.assert_close(result.double(), expected * mask, atol=1e-5, rtol=0)
    if shift_mean:
        assert result[mask.bool()].mean().item() == pytest.approx(0.0, abs=1e-6)
        assert result[mask.bool()].std().item() == pytest.approx(1.0, abs=1e-5)


def test_token_rewards_put_score_on_last_token_and_kl_everywhere() -> None:
    mask = _mask()
    kl = _random(15, B, T).abs()
    score = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0])
    rewards = token_rewards(score, kl, 0.1, mask)
    expected = -0.1 * kl.double() * mask
    for row, (_, stop) in enumerate(SPANS):
        expected[row, stop - 1] += score[row].double()
    torch.testing.assert_close(rewards.double(), expected, atol=1e-6, rtol=0)


def test_adaptive_kl_controller_follows_ziegler() -> None:
    controller = AdaptiveKLController(init=0.2, target=6.0, horizon=10_000)
    expected = 0.2
    for kl, n in [(12.0, 256), (3.0, 256), (6.6, 512), (0.0, 128), (6.0, 256)]:
        controller.update(kl, n)
        error = min(max(kl / 6.0 - 1, -0.2), 0.2)
        expected *= 1 + error * n / 10_000
        assert controller.value == pytest.approx(expected, rel=1e-12)
    assert controller.value != 0.2
    restored = AdaptiveKLController(init=0.2, target=6.0, horizon=10_000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.1, 0.0, 100)


def test_entropy_bonus_and_explained_variance() -> None:
    mask = _mask()
    entropy = _random(16, B, T).abs()
    assert entropy_bonus(entropy, mask, 0.01).item() == pytest.approx(
        -0.01 * _masked_mean64(entropy.double(), mask).item(), abs=1e-7)
    returns = _random(17, B, T)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros(B, T), returns, mask) == pytest.approx(0.0, abs=1e-6)


def test_value_head_values_align_and_round_trip(tmp_path) -> None:
    head = ValueHead(8)
    assert head(torch.randn(2, 3, 8)).abs().max().item() == 0.0  # zero init: values start at 0
    torch.nn.init.normal_(head.linear.weight, generator=torch.Generator().manual_seed(0))
    torch.nn.init.constant_(head.linear.bias, 0.3)
    hidden = torch.randn(2, 6, 8, dtype=torch.bfloat16)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
    values = token_values(head, hidden, mask)
    assert values.dtype == torch.float32
    direct = hidden.float() @ head.linear.weight[0] + 0.3
    expected = torch.zeros(2, 6)
    expected[:, 1:] = direct[:, :-1]  # token t is valued from the state before it (position t - 1)
    torch.testing.assert_close(values, expected * mask)

    path = head.save(tmp_path / "ckpt")
    assert path.name == "value_head.safetensors"
    loaded = ValueHead.load(tmp_path / "ckpt")
    assert loaded.hidden_size == 8
    torch.testing.assert_close(loaded(hidden), head(hidden))
    with pytest.raises(TunelabError, match="no value_head.safetensors"):
        ValueHead.load(tmp_path)


def test_empty_mask_gives_zero_not_nan() -> None:
    mask = torch.zeros(2, 4, dtype=torch.long)
    loss, clip_fraction, approx_kl = policy_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(2, 4), mask, 0.2)
    assert loss.item() == 0.0 and not math.isnan(clip_fraction.item())
    assert not math.isnan(approx_kl.item())
