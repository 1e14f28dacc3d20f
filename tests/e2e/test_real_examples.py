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


def test_kto_example_data_are_the_dpo_examples_pairs_and_split(tmp_path):
    """prepare_kto.py: every training pair of dpo.yaml's split as two labelled answers, its held-out pairs kept."""
    import json
    import subprocess
    import sys

    from tunelab.data.preferences import preference_to_json
    from tunelab.data.readers import load_preferences
    from tunelab.data.tokenize import split_records

    out = tmp_path / "kto-data"
    subprocess.run([sys.executable, str(REAL / "prepare_kto.py"), "--out", str(out)], check=True, cwd=REPO,
                   capture_output=True)
    dpo, kto = load_config(REAL / "dpo.yaml"), load_config(REAL / "kto.yaml")
    pairs, _ = load_preferences([str(REPO / dpo.data.train[0])])
    train, held_out = split_records(pairs, dpo.data.val_ratio, dpo.train.seed)  # the split training makes
    assert (len(pairs), len(train), len(held_out)) == (300, 225, 75)

    def rows(name):
        return [json.loads(line) for line in (out / name).read_text().splitlines()]

    feedback = rows("train.jsonl")
    assert len(feedback) == 2 * len(train) and [r["label"] for r in feedback[:4]] == [True, False, True, False]
    assert feedback[0]["messages"] == train[0].prompt + train[0].chosen
    assert feedback[1]["messages"] == train[0].prompt + train[0].rejected
    assert [r["prompt"] + r["chosen"] for r in rows("heldout_pairs.jsonl")] == [p.prompt + p.chosen for p in held_out]
    # Nothing held out is trained on, except one pair the demo file holds twice (an exact duplicate).
    trained = {json.dumps(p.prompt) for p in train}
    shared = [p for p in held_out if json.dumps(p.prompt) in trained]
    assert len(shared) == 1 and sum(preference_to_json(p) == preference_to_json(shared[0]) for p in pairs) == 2
    assert [r["messages"] for r in rows("heldout.jsonl")[1::2]] == [p.prompt + p.rejected for p in held_out]
    # kto.yaml reads what the script writes by default, with dpo.yaml's model, method and schedule
    assert kto.data.train == ["runs/real/kto-data/train.jsonl"] and kto.data.eval == ["runs/real/kto-data/heldout.jsonl"]
    assert kto.train.objective == "kto" and kto.method == dpo.method and kto.objective_settings.precompute_reference
    same = ("epochs", "batch_tokens", "grad_accum", "warmup_ratio", "schedule", "seed")
    assert [getattr(dpo.train, k) for k in same] == [getattr(kto.train, k) for k in same]
