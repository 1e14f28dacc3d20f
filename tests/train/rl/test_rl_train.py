"""GRPO and PPO on the engine: learning with a user reward function, a reward model as reward, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ARITHMETIC_TRAIN, make_config, write_config
from tunelab.cli import main
from tunelab.config import TrainConfig, TunelabConfig
from tunelab.train.engine import train
from tunelab.train.reporting import read_metrics

VOWEL_REWARD = '''
def vowels(prompts, completions, references):
    """The share of answer characters that are vowels (about 0.2 for a random model: a dense signal)."""
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]
'''


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reward") / "my_reward.py"
    path.write_text(VOWEL_REWARD)
    return path


def rl_config(tmp_path: Path, model: Path, objective: str, reward: list[str], **changes) -> dict:
    """``changes``: train.* keys go to train, the others to the objective's section."""
    settings = {"objective": objective, "max_steps": 16, "lr": 1e-2, "schedule": "constant", "warmup_ratio": 0.0,
                "max_grad_norm": None, "eval_at_start": True, "log_every": 4,
                **{k: v for k, v in changes.items() if k in TrainConfig.model_fields}}
    own = {"reward_fn": reward, "prompts_per_step": 8, "update_epochs": 2,
           "num_generations": 4 if objective == "grpo" else 1, "max_new_tokens": 8, "temperature": 1.0,
           "kl_coef": 0.01, **{k: v for k, v in changes.items() if k not in TrainConfig.model_fields}}
    return make_config(tmp_path, model, ARITHMETIC_TRAIN, method={"type": "full"},
                       data={"max_length": 128, "val_ratio": 0.01}, train=settings, eval={"generate_samples": 32},
                       **{objective: own})


@pytest.mark.parametrize("objective", ["grpo", "ppo"])
def test_online_rl_raises_a_user_reward(tmp_path, tiny_model, reward_file, objective):
    extra = {"minibatches": 2, "kl_target": 0.5} if objective == "ppo" else {}
    config = rl_config(tmp_path, tiny_model, objective, [f"{reward_file}:vowels"], **extra)
    result = train(TunelabConfig.model_validate(config))
    before, after = result.start_metrics["eval_reward"], result.final_metrics["eval_reward"]
    assert after > before + 0.2, (before, after)
    rows = [row for row in read_metrics(result.output_dir / "metrics.jsonl") if "reward" in row]
    assert {"reward", "reward_std", "kl_coef", "entropy", "completion_length", "clip_fraction", "loss"} <= set(rows[-1])
    if objective == "ppo":
        assert (result.final_dir / "value_head.safetensors").is_file() and "value_loss" in rows[-1]


def test_grpo_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_model, reward_file):
    from training_runs import kill_after_step

    configs = {name: rl_config(tmp_path / name, tiny_model, "grpo", [f"{reward_file}:vowels", "format"],
                               max_steps=6, save_every=2, log_every=1, eval_at_start=False)
               for name in ("a", "b")}
    train(TunelabConfig.model_validate(configs["a"]))
    (tmp_path / "b").mkdir()
    kill_after_step(write_config(tmp_path / "b", configs["b"]), 5)
    train(TunelabConfig.model_validate(configs["b"]), resume=True)
    fields = ("step", "loss", "reward", "reward/format", "kl")
    rows = lambda name: [tuple(r[k] for k in fields) for r in read_metrics(tmp_path / name / "out" / "metrics.jsonl")  # noqa: E731
                         if "reward" in r]
    assert [r[0] for r in rows("a")] == list(range(1, 7))
    assert rows("b") == rows("a")


def test_ppo_with_a_reward_model_and_scoring_from_the_cli(tmp_path, tiny_model, capsys):
    pairs = []
    for line in ARITHMETIC_TRAIN.read_text().splitlines()[:64]:
        messages = json.loads(line)["messages"]
        pairs.append({"prompt": messages[:-1], "chosen": [messages[-1]],
                      "rejected": [{"role": "assistant", "content": "no"}]})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    reward_cfg = make_config(tmp_path / "rm", tiny_model, data, data={"max_length": 128, "val_ratio": 0.1},
                             train={"objective": "reward", "max_steps": 8, "lr": 5e-3, "batch_tokens": 2048})
    reward_model = train(TunelabConfig.model_validate(reward_cfg)).final_dir

    assert main(["reward", "score", "--model", str(reward_model), "--data", str(data),
                 "--out", str(tmp_path / "scores.jsonl")]) == 0
    summary = capsys.readouterr().out
    assert "pairs 64" in summary and "accuracy" in summary
    scores = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 64 and sum(s["chosen"] > s["rejected"] for s in scores) >= 56

    config = rl_config(tmp_path / "ppo", tiny_model, "ppo", [], max_steps=2, eval_at_start=False)
    config["ppo"]["reward_model"] = str(reward_model)
    result = train(TunelabConfig.model_validate(config))
    last = [row for row in read_metrics(result.output_dir / "metrics.jsonl") if "reward" in row][-1]
    assert "reward/reward_model" in last and result.final_metrics["eval_reward/reward_model"] == pytest.approx(
        result.final_metrics["eval_reward"])
