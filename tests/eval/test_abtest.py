"""A/B statistics: counts, bootstrap CI coverage, sign test, Bradley–Terry recovery and coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from tunelab.eval.abtest import PairResult, bradley_terry, compare_pair, outcomes_from_scores

STRENGTHS = {"a": 1.0, "b": 2.0, "c": 4.0, "d": 0.5}


def true_ratings(strengths: dict[str, float]) -> dict[str, float]:
    """The Elo-scale ratings (mean 1000) that the strengths imply."""
    elo = {name: 400 * math.log10(s) for name, s in strengths.items()}
    mean = sum(elo.values()) / len(elo)
    return {name: r - mean + 1000 for name, r in elo.items()}


def simulate_comparisons(
    strengths: dict[str, float], n: int, rng: np.random.Generator
) -> list[tuple[str, str, int]]:
    """``n`` Bradley–Terry games between random distinct pairs of models (no ties)."""
    names = list(strengths)
    s = np.array([strengths[m] for m in names])
    a = rng.integers(0, len(names), n)
    b = (a + rng.integers(1, len(names), n)) % len(names)
    a_wins = rng.random(n) < s[a] / (s[a] + s[b])
    return [(names[i], names[j], 1 if w else -1) for i, j, w in zip(a, b, a_wins)]


def test_counts_and_win_rate_with_ties_and_no_verdict() -> None:
    outcomes = [1, 1, 0, -1, None, 1, 0, None, -1, 1]
    result = compare_pair(outcomes, "base", "tuned", resamples=500)
    assert (result.wins, result.ties, result.losses, result.no_verdict, result.n) == (4, 2, 2, 2, 8)
    assert result.win_rate == pytest.approx((4 + 0.5 * 2) / 8)
    assert 0.0 <= result.ci_low <= result.win_rate <= result.ci_high <= 1.0
    assert result.p_value == pytest.approx(binomtest(4, 6, 0.5).pvalue)
    assert result.to_dict()["model_a"] == "base" and result.to_dict()["no_verdict"] == 2


@pytest.mark.parametrize("wins,losses,ties", [(10, 2, 0), (3, 3, 5), (0, 7, 1), (45, 30, 25), (1, 0, 0), (120, 80, 40)])
def test_sign_test_matches_scipy_and_ignores_ties(wins: int, losses: int, ties: int) -> None:
    outcomes = [1] * wins + [-1] * losses + [0] * ties + [None]
    result = compare_pair(outcomes, "a", "b", resamples=100)
    assert result.p_value == pytest.approx(binomtest(wins, wins + losses, 0.5, alternative="two-sided").pvalue)
    assert compare_pair(outcomes + [0] * 50, "a", "b", resamples=100).p_value == result.p_value


def test_no_verdicts_gives_neutral_result() -> None:
    result = compare_pair([None, None], "a", "b")
    assert (result.n, result.no_verdict) == (0, 2)
    assert (result.win_rate, result.ci_low, result.ci_high, result.p_value) == (0.5, 0.0, 1.0, 1.0)
    only_ties = compare_pair([0, 0, 0], "a", "b")
    assert (only_ties.win_rate, only_ties.p_value) == (0.5, 1.0)


def test_bad_outcome_and_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="example 1"):
        compare_pair([1, 2], "a", "b")
    with pytest.raises(ValueError, match="example 0"):
        compare_pair([True], "a", "b")
    with pytest.raises(ValueError, match="confidence"):
        compare_pair([1], "a", "b", confidence=95)
    with pytest.raises(ValueError, match="compared with itself"):
        bradley_terry([("a", "a", 1)])


def test_bootstrap_is_seeded_and_matches_resampling_the_examples() -> None:
    outcomes = [1] * 70 + [0] * 10 + [-1] * 40
    result = compare_pair(outcomes, "a", "b", resamples=20_000, seed=3)
    assert result == compare_pair(outcomes, "a", "b", resamples=20_000, seed=3)
    # The multinomial shortcut equals resampling the per-example scores with replacement.
    scores = (np.array(outcomes) + 1) / 2
    rates = np.random.default_rng(99).choice(scores, size=(20_000, len(scores))).mean(axis=1)
    low, high = np.quantile(rates, [0.025, 0.975])
    assert result.ci_low == pytest.approx(low, abs=0.01)
    assert result.ci_high == pytest.approx(high, abs=0.01)


def test_win_rate_ci_covers_the_truth_95_percent_of_the_time() -> None:
    p_win, p_tie, n, simulations = 0.6, 0.1, 200, 1000
    truth = p_win + 0.5 * p_tie
    rng = np.random.default_rng(2024)
    samples = rng.choice([1, 0, -1], size=(simulations, n), p=[p_win, p_tie, 1 - p_win - p_tie])
    covered = 0
    for seed, outcomes in enumerate(samples.tolist()):
        result: PairResult = compare_pair(outcomes, "a", "b", resamples=2000, seed=seed)
        covered += result.ci_low <= truth <= result.ci_high
    coverage = covered / simulations
    print(f"win-rate CI coverage: {coverage:.3f}")
    assert 0.93 <= coverage <= 0.97


def test_bradley_terry_recovers_known_strengths() -> None:
    truth = true_ratings(STRENGTHS)
    ratings = bradley_terry(simulate_comparisons(STRENGTHS, 3000, np.random.default_rng(0)))
    assert [r.model for r in ratings] == sorted(truth, key=truth.get, reverse=True)  # c, b, a, d
    assert np.mean([r.rating for r in ratings]) == pytest.approx(1000.0)
    by_name = {r.model: r for r in ratings}
    for first in truth:
        assert by_name[first].ci_low < by_name[first].rating < by_name[first].ci_high
        for second in truth:
            estimated = by_name[first].rating - by_name[second].rating
            assert estimated == pytest.approx(truth[first] - truth[second], abs=35.0)


def test_bradley_terry_ci_covers_the_truth() -> None:
    truth = true_ratings(STRENGTHS)
    rng = np.random.default_rng(11)
    hits = []
    for seed in range(200):
        for r in bradley_terry(simulate_comparisons(STRENGTHS, 3000, rng), seed=seed):
            hits.append(r.ci_low <= truth[r.model] <= r.ci_high)
    coverage = float(np.mean(hits))
    print(f"Bradley-Terry CI coverage: {coverage:.3f}")
    assert 0.92 <= coverage <= 0.98


def test_bradley_terry_model_that_never_loses_is_finite_and_best() -> None:
    comparisons = [("champ", "x", 1)] * 30 + [("y", "champ", -1)] * 30 + [("x", "y", 1), ("x", "y", -1)] * 20
    ratings = bradley_terry(comparisons, resamples=200)
    assert ratings[0].model == "champ"
    assert all(math.isfinite(v) for r in ratings for v in (r.rating, r.ci_low, r.ci_high))
    assert ratings[0].rating - ratings[-1].rating > 400  # far apart, yet finite
    assert np.mean([r.rating for r in ratings]) == pytest.approx(1000.0)


def test_bradley_terry_ties_count_half_and_none_is_dropped() -> None:
    ratings = bradley_terry([("a", "b", 0)] * 40 + [("a", "b", None), ("c", "a", None)], resamples=100)
    assert [r.model for r in ratings] == ["a", "b"]  # "c" has no verdict at all
    assert [r.rating for r in ratings] == pytest.approx([1000.0, 1000.0])
    # One win and one loss per pair is the same evidence as two ties.
    mixed = bradley_terry([("a", "b", 1), ("a", "b", -1)] * 20 + [("b", "c", 1)] * 30, resamples=100)
    tied = bradley_terry([("a", "b", 0), ("a", "b", 0)] * 20 + [("b", "c", 1)] * 30, resamples=100)
    assert {r.model: r.rating for r in mixed} == pytest.approx({r.model: r.rating for r in tied})
    assert bradley_terry([]) == []


def test_outcomes_from_scores() -> None:
    scores_a = [1.0, 0.5, 0.30, None, 0.2, float("nan"), 0.0]
    scores_b = [0.0, 0.5, 0.32, 0.1, None, 0.4, 1.0]
    assert outcomes_from_scores(scores_a, scores_b) == [1, 0, -1, None, None, None, -1]
    assert outcomes_from_scores(scores_a, scores_b, tolerance=0.05) == [1, 0, 0, None, None, None, -1]
    with pytest.raises(ValueError, match="differ in length"):
        outcomes_from_scores([1.0], [])
