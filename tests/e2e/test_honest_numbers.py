"""Numbers that must not mislead: coherence on loops, report axes, the language filter on short English, drift
from a constant reference, prompt-only drift references."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from conftest import read_jsonl
from tunelab.eval.metrics import corpus_metrics
from tunelab.eval.report import _bar_groups, svg_bars
from tunelab.monitor.drift import Sample, compare_samples, psi, sample_from_data


def test_coherence_is_not_fooled_by_a_loop_inside_a_word():
    degenerate = ["1 " + "2" + "0" * 60, "answer: " + "7" * 40]
    fine = ["4 - 2 = 2\nanswer: 2", "The distance is 1000000000 km, about 6.7 AU.", "Paris is the capital of France."]
    assert corpus_metrics(degenerate, [None, None], ["coherence"])["coherence"] < 0.3
    assert corpus_metrics(fine, [None] * 3, ["coherence"])["coherence"] == 1.0
    stutter = corpus_metrics(["go home go home go home go home"], [None], ["coherence"])["coherence"]
    assert stutter < 0.5  # word loops are still caught


def test_report_bars_put_fractions_on_0_to_1_and_scores_on_0_to_100():
    scored = [("exact_match", 0.96, 0.93, 0.98), ("bleu", 31.0, 28.0, 34.0), ("rougeL", 45.0, 42.0, 48.0)]
    groups = {label: (names, scale) for label, items, scale in _bar_groups(scored)
              for names in [[item[0] for item in items]]}
    assert groups["Fractions (0–1)"] == (["exact_match"], 1.0)
    assert groups["Scores (0–100)"] == (["bleu", "rougeL"], 100.0)
    svg = svg_bars([("exact_match", 0.96, 0.93, 0.98)], scale=1.0)
    width = float(re.search(r'<rect x="170" y="8" width="([\d.]+)"', svg).group(1))
    assert abs(width - 0.96 * 420) < 1  # a 0.96 bar fills 96% of the axis
    assert '>0</text>' in svg and '>1</text>' in svg  # the axis is labelled at both ends


def test_the_language_filter_keeps_short_english_prompts(tmp_path: Path):
    from tunelab.datatools.quality import CleanOptions, clean_files

    english = ["Sum 3 + 4", "Explain recursion", "Convert 25 degrees Celsius to Fahrenheit", "Translate: cat",
               "Solve: x + 5 = 12", "Give three tips for staying healthy."]
    german = ["Ein Mann mit einem Hut steht auf der Straße.", "Zwei Hunde spielen im Schnee.",
              "Eine Frau liest ein Buch im Park."]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"instruction": text, "output": "ok"}) + "\n" for text in english + german))
    out = tmp_path / "english.jsonl"
    report = clean_files([str(data)], out, CleanOptions(languages=("en",), near_dedup=False, exact_dedup=False),
                         use_cache=False)
    kept = {row["messages"][0]["content"] for row in read_jsonl(out)}
    assert kept == set(english)  # "Sum 3 + 4" was dropped as Latin, "Explain recursion" as French
    assert report.kept == len(english)


def test_psi_sees_a_shift_away_from_a_constant_reference():
    constant = np.full(200, 12.0)
    assert psi(constant, np.full(200, 12.0)) == 0.0
    assert psi(constant, np.full(200, 15.0)) > 1.0  # was 0: every value fell into one decile bin
    assert psi(constant, np.full(200, 9.0)) > 1.0
    few = np.repeat([10.0, 20.0, 30.0], 100)
    assert psi(few, np.repeat([10.0, 20.0, 30.0], 60)) < 0.01
    assert psi(few, np.repeat([20.0, 30.0, 40.0], 60)) > 0.5


def test_drift_from_a_constant_reference_is_flagged_and_an_unchanged_one_is_not():
    rng = np.random.default_rng(0)
    reference = Sample("reference", {"input_length": np.full(300, 40.0)})
    shifted = Sample("recent", {"input_length": 40.0 + rng.integers(1, 5, 300)})
    same = Sample("recent", {"input_length": np.full(300, 40.0)})
    (result,) = compare_samples(reference, shifted, features=("input_length",))
    assert result.drift and result.psi > 0.1
    (unchanged,) = compare_samples(reference, same, features=("input_length",))
    assert not unchanged.drift


def test_a_prompt_only_file_is_a_reference_for_the_prompt_features(tiny_model, tmp_path: Path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {k} + {k}?"}]}) + "\n"
                               for k in range(40)))
    sample = sample_from_data([str(prompts)], str(tiny_model), "prompts")
    assert len(sample.values["input_length"]) == 40 and "output_length" not in sample.values
    assert len(sample.texts) == 40
    recent = Sample("recent", {"input_length": sample.values["input_length"].copy(),
                               "output_length": np.full(40, 9.0)})
    results = {f.feature: f for f in compare_samples(sample, recent, features=("input_length", "output_length"))}
    assert results["input_length"].ks_pvalue is not None and not results["input_length"].drift
    assert results["output_length"].note == "not available in prompts"
