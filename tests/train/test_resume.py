"""kill -9 in the middle of a run, then --resume: the same per-step losses as an uninterrupted run."""

from __future__ import annotations

import pytest
from training_runs import kill_after_step, losses

from conftest import ALPACA_DEMO, make_config, run_cli, write_config
from tunelab.train.checkpoint import list_checkpoints
from tunelab.train.reporting import read_metrics


@pytest.mark.parametrize("method", [{"type": "lora", "rank": 4, "dropout": 0.1}, {"type": "full"}],
                         ids=["lora", "full"])
def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_model, method):
    settings = dict(method=method, data={"val_ratio": 0.05, "max_samples": 200},
                    train={"max_steps": 10, "save_every": 3, "eval_every": 5, "batch_tokens": 1024, "lr": 2e-3})
    uninterrupted = make_config(tmp_path / "a", tiny_model, ALPACA_DEMO, **settings)
    interrupted = make_config(tmp_path / "b", tiny_model, ALPACA_DEMO, **settings)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    result = run_cli("train", str(write_config(tmp_path / "a", uninterrupted)))
    assert result.returncode == 0, result.stderr

    config_b = write_config(tmp_path / "b", interrupted)
    kill_after_step(config_b, 8)
    out_b = tmp_path / "b" / "out"
    assert [step for step, _ in list_checkpoints(out_b)] == [3, 6]
    assert not (out_b / "final").exists()

    resumed = run_cli("train", str(config_b), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "step 6" in resumed.stderr

    expected = losses(tmp_path / "a" / "out")
    assert [step for step, _ in expected] == list(range(1, 11))
    assert losses(out_b) == expected  # exact on CPU fp32
    evals = lambda out: [(r["step"], r["eval_loss"]) for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]  # noqa: E731
    assert evals(out_b) == evals(tmp_path / "a" / "out")
