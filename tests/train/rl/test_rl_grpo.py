"""GRPO: the loss equals TRL 1.16's GRPOTrainer._compute_loss on the same inputs; group advantages.

TRL is the oracle (installed for tests only; tunelab never imports it). Its loss lives inside the
trainer method, so the test calls the unbound method with a stand-in ``self`` that holds exactly
the attributes it reads and a per-token log-prob function that returns tensors we control.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tunelab.train.rl.grpo import group_advantages, grpo_loss

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")

B, C = 6, 9  # sequences, completion positions


def _inputs(seed: int) -> dict[str, torch.Tensor]:
    """Seeded log-probs that put some ratios outside the clip range, mixed-sign advantages, ragged masks."""
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, C, generator=generator) * 3 - 0.05
    logp = old + torch.randn(B, C, generator=generator) * 0.3  # ratios from about 0.4 to 2.5
    ref = old + torch.randn(B, C, generator=generator) * 0.2
    lengths = torch.tensor([9, 4, 7, 1, 6, 9])
    mask = (torch.arange(C) < lengths[:, None]).long()
    advantages = torch.randn(B, generator=generator)
    return {"logp": logp, "old": old, "ref": ref, "mask": mask, "advantages": advantages}


class _Accelerator:
    num_processes = 1

    @staticmethod
    def gather(x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def gather_for_metrics(x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def reduce(x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return x


def _trl_loss(data: dict[str, torch.Tensor], loss_type: str, beta: float, eps_low: float, eps_high: float):
    """TRL's own _compute_loss on our tensors; returns (loss, grad wrt logp, TRL's logged metrics)."""
    logp = data["logp"].clone().requires_grad_(True)
    entropies = torch.zeros(B, C)

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == C
        return logp, entropies, None

    metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    stand_in = SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token_logps_and_entropies,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        max_completion_length=C,
        _metrics=metrics,
    )
    inputs = {
        "prompt_ids": torch.ones(B, 3, dtype=torch.long),
        "prompt_mask": torch.ones(B, 3, dtype=torch.long),
        "completion_ids": torch.ones(B, C, dtype=torch.long),
        "completion_mask": data["mask"],
        "advantages": data["advantages"],
        "old_per_token_logps": data["old"],
        "ref_per_token_logps": data["ref"],
        "num_items_in_batch": data["mask"].sum(),
    }
    loss = trl_grpo.GRPOTrainer._compute_loss(stand_in, None, inputs)
    loss.backward()
    return loss.detach(), logp.grad, metrics["train"]


def _ours(data: dict[str, torch.Tensor], loss_type: str, beta: float, eps_low: float, eps_high: float):
    logp = data["logp"].clone().requires_grad_(True)
    loss, metrics = grpo_loss(logp, data["old"], data["ref"], data["advantages"], data["mask"],
                              clip_low=eps_low, clip_high=eps_high, beta=beta, normalisation=loss_type,
                              max_completion_length=C)
    loss.backward()
    return loss.detach(), logp.grad, metrics


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize(("beta", "eps_low", "eps_high"), [(0.0, 0.2, 0.2), (0.04, 0.2, 0.28), (0.3, 0.1, 0.15)])
def test_loss_and_gradient_equal_trl(loss_type: str, beta: float, eps_low: float, eps_high: float) -> None:
    for seed in range(3):
        data = _inputs(seed)
        trl_loss, trl_grad, trl_metrics = _trl_loss(data, loss_type, beta, eps_low, eps_high)
        loss, grad, metrics = _ours(data, loss_type, beta, eps_low, eps_high)
        assert abs(loss.item() - trl_loss.item()) < 1e-5, (seed, loss.item(), trl_loss.item())
        torch.testing.assert_close(grad, trl_grad, atol=1e-6, rtol=1e-5)
        assert metrics["clip_fraction"].item() == pytest.approx(trl_metrics["clip_ratio/region_mean"][0], abs=1e-6)
        assert metrics["clip_fraction_low"].item() == pytest.approx(trl_metrics["clip_ratio/low_mean"][0], abs=1e-6)
        assert metrics["clip_fraction_high"].item() == pytest.approx(trl_metrics["clip_ratio/high_mean"][0], abs=1e-6)
        if beta:
            assert metrics["kl"].item() == pytest.approx(trl_metrics["kl"][0], abs=1e-6)
        else:
            assert "kl" not in metrics


def test_inputs_exercise_clipping() -> None:
    """The oracle comparison is only meaningful if both clip sides and the KL term are active."""
    _, _, metrics = _ours(_inputs(0), "dapo", 0.04, 0.2, 0.2)
    assert metrics["clip_fraction_low"].item() > 0.05
    assert metrics["clip_fraction_high"].item() > 0.05
    assert metrics["kl"].item() > 1e-3


def test_layout_aligned_with_prompt_gives_the_same_loss() -> None:
    """Tensors aligned with prompt+completion (ragged prompt offsets) give the completion-only loss."""
    data = _inputs(1)
    offsets = [3, 1, 5, 2, 4, 0]
    width = C + max(offsets)
    aligned = {k: torch.zeros(B, width, dtype=data[k].dtype) for k in ("logp", "old", "ref", "mask")}
    for row, offset in enumerate(offsets):
        for key in aligned:
            aligned[key][row, offset : offset + C] = data[key][row]
    for normalisation in ("grpo", "dapo"):
        expected, _ = grpo_loss(data["logp"], data["old"], data["ref"], data["advantages"], data["mask"],
                                beta=0.1, normalisation=normalisation)
        loss, _ = grpo_loss(aligned["logp"], aligned["old"], aligned["ref"], data["advantages"], aligned["mask"],
                            beta=0.1, normalisation=normalisation)
        assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_dapo_accumulation_equals_one_big_batch() -> None:
    """With num_tokens = the window's tokens, two micro-batches sum to the whole batch's loss and gradient."""
    data = _inputs(2)
    logp = data["logp"].clone().requires_grad_(True)
    whole, _ = grpo_loss(logp, data["old"], data["ref"], data["advantages"], data["mask"], beta=0.04)
    whole.backward()
    whole_grad = logp.grad.clone()
    logp.grad = None
    total = float(data["mask"].sum())
    parts = []
    for rows in (slice(0, 2), slice(2, B)):
        part, _ = grpo_loss(logp[rows], data["old"][rows], data["ref"][rows], data["advantages"][rows],
                            data["mask"][rows], beta=0.04, num_tokens=total)
        part.backward()
        parts.append(part.item())
    assert sum(parts) == pytest.approx(whole.item(), abs=1e-6)
    torch.testing.assert_close(logp.grad, whole_grad)


def test_on_policy_loss_is_minus_mean_advantage_and_gradient_follows_it() -> None:
    """With old = logp (one update per batch) the ratio is 1: loss = -token-mean of A, d loss/d logp = -A / n."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, -0.7, 0.0, 0.0]], requires_grad=True)
    advantages = torch.tensor([1.0, -0.5])
    loss, metrics = grpo_loss(logp, logp.detach(), None, advantages, mask, beta=0.0, normalisation="dapo")
    assert loss.item() == pytest.approx(-(3 * 1.0 + 2 * -0.5) / 5)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.2, -0.2, -0.2, 0.0], [0.1, 0.1, 0.0, 0.0]]))
    assert metrics["clip_fraction"].item() == 0.0


def _trl_group_advantages(rewards: torch.Tensor, group: int, scale: str) -> torch.Tensor:
    """TRL's GRPOTrainer advantage lines (sum_then_normalize), in float64 with TRL's own nanstd.

    TRL computes advantages inline in ``_generate_and_score_completions`` (which also generates and
    calls the reward functions), so that method cannot run on its own; its formula is restated here.
    """
    rewards = rewards.double()
    mean = torch.nanmean(rewards.view(-1, group), dim=1).repeat_interleave(group)
    if scale == "batch":
        std = trl_utils.nanstd(rewards).expand_as(rewards)
    else:
        std = trl_utils.nanstd(rewards.view(-1, group), dim=1).repeat_interleave(group)
    advantages = rewards - mean
    return advantages if scale == "none" else advantages / (std + 1e-4)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_trl_formula(scale: str) -> None:
    generator = torch.Generator().manual_seed(7)
    rewards = torch.randint(0, 3, (5 * 4,), generator=generator).float() + torch.rand(20, generator=generator)
    ours = group_advantages(rewards, 4, scale)
    torch.testing.assert_close(ours.double(), _trl_group_advantages(rewards, 4, scale), atol=1e-5, rtol=1e-5)


def test_group_advantages_values() -> None:
    """Within a group of 4 with rewards 1,0,0,0: mean 0.25, unbiased std 0.5; an all-equal group gets 0."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    advantages = group_advantages(rewards, 4)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4)
    torch.testing.assert_close(advantages[:4], expected)
    assert advantages[4:].abs().max().item() == 0.0
    torch.testing.assert_close(group_advantages(rewards, 4, "none")[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_errors() -> None:
    with pytest.raises(ValueError, match="at least 2 samples"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="do not split"):
        group_advantages(torch.zeros(5), 2)
    data = _inputs(0)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(data["logp"], data["old"], None, data["advantages"], data["mask"], beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(data["logp"], data["old"], None, data["advantages"], data["mask"], normalisation="dr_grpo")
    with pytest.raises(ValueError, match="normalisation"):
        grpo_loss(data["logp"], data["old"], None, data["advantages"], data["mask"], normalisation="sum")
