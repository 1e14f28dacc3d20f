"""The real-model example configs (``examples/real/*.yaml``) and the held-out preference scorer's interval.

No model is loaded: the configs are validated as ``tunelab train`` would, and the DPO and ORPO
examples are checked to train and score on the same held-out pairs (their comparison in
benchmarks/RESULTS.md relies on it).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tunelab.config import load_config

REPO = Path(__file__).resolve().parents[2]
REAL = REPO / "examples" / "real"


@pytest.mark.parametrize("name", sorted(p.name for p in REAL.glob("*.yaml")))
def test_every_real_example_config_validates(name):
    config = load_config(REAL / name)
    assert config.model.path == "runs/real/smollm2" or "gemma" in name


def test_dpo_and_orpo_examples_hold_out_the_same_pairs_and_train_alike():
    dpo, orpo = load_config(REAL / "dpo.yaml"), load_config(REAL / "orpo.yaml")
    assert (dpo.train.objective, orpo.train.objective) == ("dpo", "orpo")
    assert dpo.data == orpo.data and dpo.train.seed == orpo.train.seed  # the same seeded split
    assert dpo.data.val_ratio > 0 and dpo.data.max_samples is None  # all pairs, a quarter held out
    assert dpo.method == orpo.method
    same = ("epochs", "lr", "batch_tokens", "grad_accum", "warmup_ratio", "schedule")
    assert [getattr(dpo.train, k) for k in same] == [getattr(orpo.train, k) for k in same]
    assert dpo.objective_settings.precompute_reference


def test_wilson_interval_of_the_preference_scorer():
    spec = importlib.util.spec_from_file_location("preference_heldout", REPO / "benchmarks" / "preference_heldout.py")
    scorer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scorer)
    low, high = scorer.wilson_interval(40, 69)
    assert (round(low, 3), round(high, 3)) == (0.462, 0.689)  # the DPO example's held-out accuracy
    assert scorer.wilson_interval(0, 10)[0] == 0.0 and scorer.wilson_interval(10, 10)[1] == pytest.approx(1.0)
    low, high = scorer.wilson_interval(500, 1000)
    assert low < 0.5 < high and high - low == pytest.approx(2 * 1.959964 * (0.25 / 1000) ** 0.5, rel=1e-2)  # ~ the normal interval
