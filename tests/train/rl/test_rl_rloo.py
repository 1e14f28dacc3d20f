"""RLOO, the objective added as one file: its advantages, and learning on the engine."""

from __future__ import annotations

import pytest
import torch

from conftest import ARITHMETIC_TRAIN, make_config
from tunelab.config import TunelabConfig
from tunelab.train.engine import train
from tunelab.train.objectives.rloo import leave_one_out_advantages
from tunelab.train.reporting import read_metrics

VOWEL_REWARD = '''
def vowels(prompts, completions, references):
    """The share of answer characters that are vowels (about 0.2 for a random model: a dense signal)."""
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]
'''


def test_advantages_are_each_reward_minus_the_mean_of_the_others():
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 3.0, 3.0, 3.0, -1.0])
    expected = []
    for group in rewards.view(2, 4).tolist():
        for i, reward in enumerate(group):
            others = [r for j, r in enumerate(group) if j != i]
            expected.append(reward - sum(others) / len(others))
    advantages = leave_one_out_advantages(rewards, 4)
    torch.testing.assert_close(advantages, torch.tensor(expected), rtol=0, atol=1e-6)
    # k / (k - 1) times the reward minus the group mean, and each group sums to zero
    groups = rewards.view(2, 4)
    torch.testing.assert_close(advantages, (4 / 3 * (groups - groups.mean(dim=1, keepdim=True))).reshape(-1))
    assert advantages.view(2, 4).sum(dim=1).abs().max() < 1e-6


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match="at least 2 samples"):
        leave_one_out_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="do not split"):
        leave_one_out_advantages(torch.zeros(5), 2)


def test_rloo_is_registered_with_its_needs():
    from tunelab.config import config_from_dict
    from tunelab.errors import ConfigError
    from tunelab.train.objectives import objective_spec

    spec = objective_spec("rloo")
    assert (spec.data, spec.online, spec.packing, spec.reference) == ("prompts", True, False, "kl")
    base = {"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "output_dir": "o"}
    with pytest.raises(ConfigError, match="at least 2 for rloo"):
        config_from_dict({**base, "train": {"objective": "rloo"}, "rloo": {"reward_fn": ["format"], "num_generations": 1}})
    with pytest.raises(ConfigError, match="rloo needs a reward"):
        config_from_dict({**base, "train": {"objective": "rloo"}})


def test_rloo_raises_a_user_reward_on_the_engine(tmp_path, tiny_model):
    reward = tmp_path / "my_reward.py"
    reward.write_text(VOWEL_REWARD)
    settings = {"objective": "rloo", "max_steps": 12, "lr": 1e-2, "schedule": "constant", "warmup_ratio": 0.0,
                "max_grad_norm": None, "eval_at_start": True, "log_every": 1}
    rloo = {"reward_fn": [f"{reward}:vowels"], "prompts_per_step": 8, "update_epochs": 2, "num_generations": 4,
            "max_new_tokens": 8, "temperature": 1.0, "kl_coef": 0.01}
    config = make_config(tmp_path, tiny_model, ARITHMETIC_TRAIN, method={"type": "full"},
                         data={"max_length": 128, "val_ratio": 0.01}, train=settings, rloo=rloo,
                         eval={"generate_samples": 32})
    result = train(TunelabConfig.model_validate(config))
    # Unnormalised advantages (a reward spread of ~0.1) move it less per step than GRPO: measured 0.31 -> 0.45.
    before, after = result.start_metrics["eval_reward"], result.final_metrics["eval_reward"]
    assert after > before + 0.1, (before, after)
    rows = [row for row in read_metrics(result.output_dir / "metrics.jsonl") if "reward" in row]
    assert [row["step"] for row in rows] == list(range(1, 13))
    assert sum(row["reward"] for row in rows[-3:]) > sum(row["reward"] for row in rows[:3])
    assert {"loss", "kl", "clip_fraction", "entropy", "advantage_abs", "kl_coef"} <= set(rows[-1])
