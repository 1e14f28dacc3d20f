"""Drift detection: KS + PSI on synthetic traffic, references, exit codes of tunelab monitor drift."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from request_traffic import traffic, write_traffic

from conftest import ALPACA_DEMO, ARITHMETIC_TEST
from tunelab.cli import main
from tunelab.monitor.drift import Sample, compare_samples, embedding_drift, psi, sample_from_data


def test_unshifted_traffic_false_positive_rate_over_100_seeded_trials():
    flagged_default, flagged_ks_only = 0, 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        reference, recent = Sample("ref", traffic(rng, 2000)), Sample("recent", traffic(rng, 300))
        flagged_default += any(f.drift for f in compare_samples(reference, recent))
        flagged_ks_only += any(f.drift for f in compare_samples(reference, recent, psi_threshold=0.0))
    # Four features at alpha 0.01: at most ~4% by the union bound with the KS test alone.
    assert flagged_ks_only / 100 <= 0.05
    assert flagged_default <= flagged_ks_only
    print(f"false-positive rate over 100 trials: KS+PSI {flagged_default}%, KS alone {flagged_ks_only}%")


def test_an_input_length_shift_is_flagged_and_nothing_else():
    for seed in range(10):
        rng = np.random.default_rng(1000 + seed)
        results = {f.feature: f for f in compare_samples(Sample("ref", traffic(rng, 2000)),
                                                         Sample("recent", traffic(rng, 300, input_scale=1.3)))}
        shifted = results["input_length"]
        assert shifted.drift and shifted.ks_pvalue < 0.01 and shifted.psi >= 0.1, shifted
        assert shifted.recent_median > shifted.reference_median
        assert not any(results[f].drift for f in ("output_length", "perplexity", "latency"))


def test_psi_is_zero_for_equal_samples_and_large_for_a_big_shift():
    rng = np.random.default_rng(0)
    values = rng.normal(0, 1, 5000)
    assert psi(values, values) == pytest.approx(0.0, abs=1e-9)
    assert psi(values, rng.normal(0, 1, 5000)) < 0.02
    assert psi(values, rng.normal(1.5, 1, 5000)) > 0.25
    counts = np.repeat([5.0, 6.0], 500)  # repeated values: fewer bins, still finite
    assert np.isfinite(psi(counts, np.full(100, 9.0)))


def test_too_few_values_are_reported_not_tested():
    rng = np.random.default_rng(1)
    results = compare_samples(Sample("ref", traffic(rng, 500)), Sample("recent", traffic(rng, 10)))
    assert all(not f.drift and "too few" in f.note and f.ks_pvalue is None for f in results)


@pytest.fixture()
def shifted_store(tmp_path) -> Path:
    """Yesterday-to-an-hour-ago reference traffic and a last hour whose prompts are 1.5x longer."""
    rng = np.random.default_rng(7)
    now, db = time.time(), tmp_path / "monitor.db"
    write_traffic(db, now - 6 * 3600, traffic(rng, 1500))
    write_traffic(db, now - 3000, traffic(rng, 400, input_scale=1.5))
    return db


def test_cli_exit_codes_drift_no_drift_and_errors(shifted_store, tmp_path, capsys):
    report = tmp_path / "drift.json"
    code = main(["monitor", "drift", "--db", str(shifted_store), "--reference", "window:1d", "--since", "1h",
                 "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 1 and "drift in input_length" in out and "DRIFT" in out
    result = json.loads(report.read_text())
    by_feature = {f["feature"]: f for f in result["features"]}
    assert result["drift"] and by_feature["input_length"]["ks_pvalue"] < 0.01
    assert not by_feature["latency"]["drift"] and by_feature["latency"]["n_recent"] == 400
    with sqlite3.connect(shifted_store) as conn:  # saved for the report
        assert conn.execute("SELECT COUNT(*) FROM drift_checks WHERE feature = 'input_length' AND drift = 1"
                            ).fetchone()[0] == 1

    assert main(["monitor", "drift", "--db", str(shifted_store), "--reference", "window:1d", "--since", "1h",
                 "--features", "output_length,perplexity,latency", "--no-save"]) == 0
    assert "no drift" in capsys.readouterr().out

    assert main(["monitor", "drift", "--db", str(tmp_path / "none.db"), "--reference", "window:1d"]) == 2
    assert "no monitoring database" in capsys.readouterr().err
    assert main(["monitor", "drift", "--db", str(shifted_store), "--reference", str(tmp_path / "nothing")]) == 2
    assert "not a file, a window:DURATION, or a run id" in capsys.readouterr().err
    assert main(["monitor", "drift", "--db", str(shifted_store), "--reference", "window:1d", "--since", "1x"]) == 2
    assert main(["monitor", "drift", "--db", str(shifted_store), "--reference", "window:1m"]) == 2
    assert "no feature could be compared" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"\x00garbage" * 512)
    assert main(["monitor", "drift", "--db", str(corrupt), "--reference", "window:1d"]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_request_log_and_store_files_as_references(shifted_store, tmp_path, capsys):
    rng = np.random.default_rng(3)
    log = tmp_path / "requests.jsonl"
    rows = traffic(rng, 800, input_scale=1.5)  # like the recent traffic: no drift against it
    log.write_text("".join(json.dumps({"time": 0.0, "model": "tiny", "endpoint": "chat", "status": 200,
                                       "prompt_tokens": int(rows["input_length"][k]),
                                       "completion_tokens": int(rows["output_length"][k]),
                                       "latency_s": float(rows["latency"][k]),
                                       "mean_logprob": float(-np.log(rows["perplexity"][k]))}) + "\n"
                           for k in range(800)))
    assert main(["monitor", "drift", "--db", str(shifted_store), "--reference", str(log), "--no-save"]) == 0
    assert main(["monitor", "drift", "--db", str(shifted_store), "--reference", str(shifted_store),
                 "--no-save"]) == 1  # the whole store (mostly old traffic) as the reference
    capsys.readouterr()


def test_a_data_file_reference_counts_tokens_like_the_server(tiny_model, tokenizer):
    sample = sample_from_data([str(ARITHMETIC_TEST)], str(tiny_model), "eval set")
    first = json.loads(ARITHMETIC_TEST.read_text().splitlines()[0])["messages"]
    prompt = tokenizer.apply_chat_template(first[:2], tokenize=False, add_generation_prompt=True)
    assert sample.values["input_length"][0] == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    answer_tokens = len(tokenizer(first[2]["content"], add_special_tokens=False)["input_ids"])
    assert sample.values["output_length"][0] == answer_tokens + 1  # the stop token, as the server counts it
    assert len(sample.values["input_length"]) == 200 and len(sample.texts) == 200
    rng = np.random.default_rng(0)
    same = Sample("recent", {"input_length": rng.choice(sample.values["input_length"], 300),
                             "output_length": rng.choice(sample.values["output_length"], 300)})
    longer = Sample("recent", {"input_length": rng.choice(sample.values["input_length"], 300) + 25,
                               "output_length": rng.choice(sample.values["output_length"], 300)})
    assert not any(f.drift for f in compare_samples(sample, same))
    flagged = {f.feature for f in compare_samples(sample, longer) if f.drift}
    assert flagged == {"input_length"}


def test_prompt_embedding_centroid_drift(tiny_model):
    arithmetic = [json.loads(line)["messages"][1]["content"] for line in ARITHMETIC_TEST.read_text().splitlines()]
    alpaca = [row["instruction"] for row in json.loads(ALPACA_DEMO.read_text())][:100]
    same = embedding_drift(arithmetic[:100], arithmetic[100:], str(tiny_model), permutations=200)
    other = embedding_drift(arithmetic[:100], alpaca, str(tiny_model), permutations=200)
    assert not same.drift and same.pvalue > 0.01
    assert other.drift and other.distance > same.distance
