"""The quickstart config: builds its tiny model, trains, and held-out metrics improve."""

from __future__ import annotations

import pytest

from conftest import REPO
from tunelab.config import load_config
from tunelab.eval.exact_match import ExactMatchEvaluator
from tunelab.train.engine import train


def run_quickstart(tmp_path, *overrides: str):
    config = load_config(
        REPO / "examples" / "quickstart.yaml",
        [f"model.path={tmp_path / 'tiny-model'}", f"output_dir={tmp_path / 'out'}",
         f"model.tiny.tokenizer_corpus={REPO / 'examples/data/arithmetic_train.jsonl'}",
         f"data.train={REPO / 'examples/data/arithmetic_train.jsonl'}",
         f"data.eval={REPO / 'examples/data/arithmetic_test.jsonl'}", *overrides],
    )
    return train(config, evaluators=[ExactMatchEvaluator(config.eval)])


def test_quickstart_one_epoch_improves_loss_and_exact_match(tmp_path):
    result = run_quickstart(tmp_path, "train.epochs=1", "train.eval_every=0", "eval.generate_samples=50")
    assert (tmp_path / "tiny-model" / "config.json").is_file()
    before, after = result.start_metrics, result.final_metrics
    assert before["eval_exact_match"] == 0.0
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    assert after["eval_exact_match"] >= 0.1


@pytest.mark.slow
def test_quickstart_as_shipped_reaches_high_exact_match(tmp_path):
    result = run_quickstart(tmp_path)
    assert result.final_metrics["eval_exact_match"] >= 0.8
