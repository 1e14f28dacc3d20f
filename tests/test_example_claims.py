"""examples/check.py: every number the docs claim about an example is one it measures, stated where it says."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("examples_check", REPO / "examples" / "check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["examples_check"] = module
    spec.loader.exec_module(module)
    return module


def test_every_claim_is_stated_where_check_py_says(check):
    for example in check.EXAMPLES.values():
        assert (REPO / example.config).is_file(), example.config
        for claim in example.claims:
            assert claim.low <= claim.high
            for where in claim.where:
                assert claim.stated in (REPO / where).read_text(), f"{where} does not state {claim.stated!r}"


def test_every_example_config_is_checked(check):
    configs = {example.config for example in check.EXAMPLES.values()}
    assert configs == {f"examples/{p.name}" for p in (REPO / "examples").glob("*.yaml")}


def test_examples_that_start_from_a_run_name_a_shipped_one(check):
    for example in check.EXAMPLES.values():
        if example.needs:
            assert check.EXAMPLES[example.needs].shipped_output, example.name


def test_the_table_shows_claims_beside_each_seed_and_fails_a_claim_not_met(check, capsys, tmp_path):
    measured = {42: 0.92, 0: 0.88, 1: 0.90}

    def fake(name: str, seed: int) -> dict[str, float]:
        return {"final/eval_exact_match": measured[seed], "start/eval_loss": 6.251, "final/eval_loss": 0.02,
                "steps": 540, "train_seconds": 50.0}

    assert check.main(["quickstart", "--json", str(tmp_path / "r.json")], run=fake) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if "final/eval_exact_match" in line)
    assert "| 0.92 | 0.88 | 0.9 | 0.9 (0.88–0.92) | yes |" in row

    measured.update({42: 0.5, 0: 0.5, 1: 0.5})
    assert check.main(["quickstart", "--json", str(tmp_path / "r.json")], run=fake) == 1
    assert "**NO**" in capsys.readouterr().out


def test_sft_short_delivers_its_claim(check, tmp_path):
    """The cheapest claimed run (200 steps): its held-out exact match is in the range check.py states."""
    from conftest import ARITHMETIC_TEST, ARITHMETIC_TRAIN
    from tunelab.config import load_config
    from tunelab.eval.generation_eval import GenerationEvaluator
    from tunelab.train.engine import train

    config = load_config(REPO / "examples" / "sft-short.yaml", [
        f"model.path={tmp_path / 'tiny-model'}", f"output_dir={tmp_path / 'out'}",
        f"model.tiny.tokenizer_corpus={ARITHMETIC_TRAIN}", f"data.train={ARITHMETIC_TRAIN}",
        f"data.eval={ARITHMETIC_TEST}", "train.eval_every=0", "train.eval_at_start=false"])
    result = train(config, evaluators=[GenerationEvaluator(config.eval)])
    (claim,) = check.EXAMPLES["sft-short"].claims
    assert claim.metric == "final/eval_exact_match"
    assert claim.low <= result.final_metrics["eval_exact_match"] <= claim.high
