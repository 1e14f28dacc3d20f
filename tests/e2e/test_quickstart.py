"""The quickstart config: builds its tiny model, trains, held-out metrics improve, compare shows it."""

from __future__ import annotations

import json

import pytest

from conftest import ARITHMETIC_TEST, ARITHMETIC_TRAIN, REPO, run_cli
from tunelab.config import load_config
from tunelab.eval.generation_eval import GenerationEvaluator
from tunelab.train.engine import train


def run_quickstart(directory, *overrides: str):
    config = load_config(
        REPO / "examples" / "quickstart.yaml",
        [f"model.path={directory / 'tiny-model'}", f"output_dir={directory / 'out'}",
         f"model.tiny.tokenizer_corpus={ARITHMETIC_TRAIN}", f"data.train={ARITHMETIC_TRAIN}",
         f"data.eval={ARITHMETIC_TEST}", *overrides],
    )
    return train(config, evaluators=[GenerationEvaluator(config.eval)])


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """The quickstart trained for one epoch (about 20 s on 2 cores)."""
    directory = tmp_path_factory.mktemp("quickstart")
    return directory, run_quickstart(directory, "train.epochs=1", "train.eval_every=0", "eval.generate_samples=50")


def test_quickstart_one_epoch_improves_loss_and_exact_match(one_epoch):
    directory, result = one_epoch
    assert (directory / "tiny-model" / "config.json").is_file()
    before, after = result.start_metrics, result.final_metrics
    assert before["eval_exact_match"] == 0.0
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    assert after["eval_exact_match"] >= 0.1


def test_compare_shows_the_fine_tuned_model_beats_its_base(one_epoch, tmp_path):
    directory, result = one_epoch
    for name, model in (("tuned", result.final_dir), ("base", directory / "tiny-model")):
        evaluated = run_cli("eval", "--model", str(model), "--data", str(ARITHMETIC_TEST), "--out", str(tmp_path / name),
                            "--metrics", "numeric_accuracy,perplexity", "--max-new-tokens", "16", "--max-samples", "80")
        assert evaluated.returncode == 0, evaluated.stderr
    compared = run_cli("compare", "--predictions", f"tuned={tmp_path / 'tuned' / 'predictions.jsonl'}",
                       "--predictions", f"base={tmp_path / 'base' / 'predictions.jsonl'}",
                       "--judge", "metric:numeric_accuracy", "--out", str(tmp_path / "cmp"), "--fail-below", "ci_low=0.5")
    assert compared.returncode == 0, compared.stderr + compared.stdout
    pair = json.loads((tmp_path / "cmp" / "results.json").read_text())["pairs"][0]
    assert pair["model_a"] == "tuned" and pair["wins"] > pair["losses"] and pair["ci_low"] > 0.5
    assert pair["p_value"] < 0.01
    report = (tmp_path / "cmp" / "report.html").read_text()
    assert "tuned vs base" in report and "<svg" in report


@pytest.mark.slow
def test_quickstart_as_shipped_reaches_high_exact_match(tmp_path):
    result = run_quickstart(tmp_path)
    assert result.final_metrics["eval_exact_match"] >= 0.8
