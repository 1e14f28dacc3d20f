"""A/B statistics for ``tunelab compare``: win/tie/loss, win rate with a bootstrap CI, sign test, Bradley–Terry.

An *outcome* is the verdict of one comparison on one example, seen from model A: ``+1`` (A wins),
``0`` (tie), ``-1`` (B wins), or ``None`` (no verdict: unparsable judge output, missing prediction).
``None`` is counted (``no_verdict``) but left out of every statistic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.special import expit
from scipy.stats import binomtest

Outcome = int | None

ELO_SCALE = 400 / np.log(10)  # Elo points per natural-log unit of Bradley–Terry strength
ELO_MEAN = 1000.0
PRIOR_GAMES = 1.0  # virtual tied games each model plays against an average opponent (see bradley_terry)


@dataclass
class PairResult:
    """Model A against model B over a set of examples.

    ``win_rate`` counts a tie as half a win: ``(wins + 0.5 * ties) / n``; ``[ci_low, ci_high]`` is its
    bootstrap confidence interval and ``p_value`` the two-sided sign test of wins against losses.
    """

    model_a: str
    model_b: str
    wins: int
    ties: int
    losses: int
    no_verdict: int
    n: int
    win_rate: float
    ci_low: float
    ci_high: float
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


@dataclass
class Rating:
    """A model's Bradley–Terry rating on the Elo scale, with its bootstrap confidence interval."""

    model: str
    rating: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def compare_pair(
    outcomes: Sequence[Outcome],
    model_a: str,
    model_b: str,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairResult:
    """Win/tie/loss counts, win rate with a percentile-bootstrap CI and a sign-test p-value.

    Args:
        outcomes: one outcome per example (+1 A wins, 0 tie, -1 B wins, None no verdict).
        model_a: name of model A.
        model_b: name of model B.
        resamples: bootstrap resamples of the examples.
        confidence: coverage of the interval (0.95 gives a 95% CI).
        seed: seed of the bootstrap.

    Returns:
        The :class:`PairResult`. ``win_rate = (wins + 0.5 * ties) / n`` over the ``n`` examples with a
        verdict. The CI is the percentile bootstrap over those examples: resampling the n outcomes
        with replacement is drawing (wins, ties, losses) from a multinomial, which is how it is done
        (exact, and O(resamples) whatever n). When every outcome is the same the interval is that
        single point; read ``p_value`` for small n. ``p_value`` is the two-sided exact sign test
        (``scipy.stats.binomtest(wins, wins + losses, 0.5)``), ties dropped; 1.0 with no wins or
        losses. With no verdict at all (n == 0): win rate 0.5, CI (0.0, 1.0), p-value 1.0.

    Raises:
        ValueError: an outcome other than +1, 0, -1, None; ``resamples < 1``; ``confidence`` not in (0, 1).
    """
    _check_bootstrap_args(resamples, confidence)
    counts = {1: 0, 0: 0, -1: 0, None: 0}
    for index, outcome in enumerate(outcomes):
        counts[_check_outcome(outcome, index)] += 1
    wins, ties, losses = counts[1], counts[0], counts[-1]
    n = wins + ties + losses
    p_value = float(binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0
    if n == 0:
        win_rate, ci_low, ci_high = 0.5, 0.0, 1.0
    else:
        win_rate = (wins + 0.5 * ties) / n
        rng = np.random.default_rng(seed)
        drawn = rng.multinomial(n, np.array([wins, ties, losses]) / n, size=resamples)
        rates = (drawn[:, 0] + 0.5 * drawn[:, 1]) / n
        ci_low, ci_high = _percentile_interval(rates, confidence)
    return PairResult(
        model_a, model_b, wins, ties, losses, counts[None], n, win_rate, float(ci_low), float(ci_high), p_value
    )


def bradley_terry(
    comparisons: Sequence[tuple[str, str, Outcome]],
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[Rating]:
    """Bradley–Terry ratings of several models from pairwise comparisons, best first.

    The model: A beats B with probability ``s_A / (s_A + s_B)``; strengths are fitted by maximum
    likelihood (Newton's method with a line search on the convex negative log-likelihood in
    ``log s``, vectorised over the bootstrap resamples). A tie counts as half a win each way.
    As a prior, each model also plays ``PRIOR_GAMES`` (one) virtual tied game against an average
    opponent (log-strength 0): this keeps a model that never loses (or never wins) finite, and ties
    disconnected groups of models to a common level, while moving ratings backed by many
    comparisons very little (it is a maximum a posteriori fit, not pure maximum likelihood).

    Ratings are on the Elo scale, ``400 * log10(strength)``, shifted so that their mean is 1000: a
    difference of 400 points means 10:1 odds of winning. CIs are percentile-bootstrap intervals
    over comparisons (resampled with replacement, refitted, re-centred).

    Args:
        comparisons: ``(model_a, model_b, outcome)`` triples; outcome as in :func:`compare_pair`.
            Triples with outcome None are left out, and so is a model that has no verdict at all.
        resamples: bootstrap resamples of the comparisons (one fit each).
        confidence: coverage of the intervals.
        seed: seed of the bootstrap.

    Returns:
        One :class:`Rating` per model, highest rating first (name order among equals).

    Raises:
        ValueError: a bad outcome, a model compared with itself, ``resamples < 1`` or a bad ``confidence``.
    """
    _check_bootstrap_args(resamples, confidence)
    triples = []
    for index, (model_a, model_b, outcome) in enumerate(comparisons):
        outcome = _check_outcome(outcome, index)
        if outcome is None:
            continue
        if model_a == model_b:
            raise ValueError(f"comparison {index}: model {model_a!r} is compared with itself")
        triples.append((model_a, model_b, outcome))
    models = sorted({name for a, b, _ in triples for name in (a, b)})
    if not models:
        return []
    # Distinct (a, b, outcome) kinds and how often each occurred: resampling the comparisons with
    # replacement is then a multinomial draw of these counts.
    index_of = {name: i for i, name in enumerate(models)}
    kinds, counts = np.unique(
        np.array([(index_of[a], index_of[b], outcome) for a, b, outcome in triples]), axis=0, return_counts=True
    )
    ratings = _elo(_fit_log_strengths(_win_matrices(kinds, counts, len(models))))
    rng = np.random.default_rng(seed)
    drawn = rng.multinomial(len(triples), counts / len(triples), size=resamples)
    boot = _elo(_fit_log_strengths(_win_matrices(kinds, drawn, len(models))))
    low, high = _percentile_interval(boot, confidence)
    result = [Rating(m, float(r), float(lo), float(hi)) for m, r, lo, hi in zip(models, ratings, low, high)]
    return sorted(result, key=lambda rating: (-rating.rating, rating.model))


def outcomes_from_scores(
    scores_a: Sequence[float | None], scores_b: Sequence[float | None], tolerance: float = 0.0
) -> list[Outcome]:
    """Per-example metric scores of two models (higher is better) turned into outcomes.

    Args:
        scores_a: model A's score on each example (None or NaN: no score).
        scores_b: model B's score on the same examples.
        tolerance: a tie when ``|a - b| <= tolerance``.

    Returns:
        +1 where A scored higher, -1 where B did, 0 for a tie, None where either score is missing.

    Raises:
        ValueError: the two lists differ in length, or ``tolerance`` is negative.
    """
    if len(scores_a) != len(scores_b):
        raise ValueError(f"scores of A and B differ in length ({len(scores_a)} vs {len(scores_b)})")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    outcomes: list[Outcome] = []
    for a, b in zip(scores_a, scores_b):
        if a is None or b is None or np.isnan(a) or np.isnan(b):
            outcomes.append(None)
        elif abs(a - b) <= tolerance:
            outcomes.append(0)
        else:
            outcomes.append(1 if a > b else -1)
    return outcomes


def _check_outcome(outcome: object, index: int) -> Outcome:
    """``outcome`` as +1, 0, -1 or None; anything else raises ValueError naming the example."""
    if outcome is None:
        return None
    if isinstance(outcome, (int, np.integer)) and not isinstance(outcome, bool) and outcome in (1, 0, -1):
        return int(outcome)
    raise ValueError(f"example {index}: outcome must be +1 (A wins), 0 (tie), -1 (B wins) or None, got {outcome!r}")


def _check_bootstrap_args(resamples: int, confidence: float) -> None:
    """Raise ValueError for a non-positive number of resamples or a confidence outside (0, 1)."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")


def _percentile_interval(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """The central ``confidence`` interval of bootstrap samples (along the first axis)."""
    alpha = 1 - confidence
    low, high = np.quantile(samples, [alpha / 2, 1 - alpha / 2], axis=0)
    return low, high


def _win_matrices(kinds: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    """``W[..., i, j]``: wins of model i over model j (a tie is half a win each way).

    ``kinds`` holds distinct ``(a, b, outcome)`` rows; ``counts`` how often each occurred, shape
    ``(kinds,)`` or ``(resamples, kinds)``.
    """
    a, b, outcome = kinds.T
    rows = np.arange(len(kinds))
    cells = np.zeros((len(kinds), k * k))
    cells[rows, a * k + b] = (1 + outcome) / 2
    cells[rows, b * k + a] = (1 - outcome) / 2
    return (counts @ cells).reshape(*counts.shape[:-1], k, k)


def _neg_log_posterior(theta: np.ndarray, wins: np.ndarray) -> np.ndarray:
    """Bradley–Terry negative log-likelihood of log-strengths ``theta`` plus the virtual-tie prior."""
    diff = theta[..., :, None] - theta[..., None, :]
    prior = PRIOR_GAMES / 2 * (np.logaddexp(0, theta) + np.logaddexp(0, -theta))
    return (wins * np.logaddexp(0, -diff)).sum(axis=(-2, -1)) + prior.sum(axis=-1)


def _gradient_and_hessian(theta: np.ndarray, wins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradient and Hessian of :func:`_neg_log_posterior` in ``theta``."""
    losses = np.swapaxes(wins, -1, -2)
    diff = theta[..., :, None] - theta[..., None, :]
    p_win, p_loss = expit(diff), expit(-diff)  # both computed, not 1 - p: no cancellation at long odds
    p_prior = expit(theta)
    gradient = (losses * p_win - wins * p_loss).sum(axis=-1) + PRIOR_GAMES / 2 * (p_prior - expit(-theta))
    curvature = (wins + losses) * p_win * p_loss
    diagonal = curvature.sum(axis=-1) + PRIOR_GAMES * p_prior * (1 - p_prior)
    hessian = np.eye(theta.shape[-1]) * diagonal[..., None] - curvature
    return gradient, hessian


def _fit_log_strengths(wins: np.ndarray, max_steps: int = 100, tolerance: float = 1e-12) -> np.ndarray:
    """Maximum-a-posteriori log-strengths for win matrices ``(..., k, k)``, all fitted at once.

    Newton's method with a backtracking (Armijo) line search on the convex objective, vectorised
    over the leading axes so that a thousand bootstrap fits cost about as much as one. Once a fit's
    Newton decrement (the loss decrease its next step promises) is below ``tolerance`` it takes
    that one full step, which squares the remaining error, and stops.
    """
    theta = np.zeros(wins.shape[:-1])
    done = np.zeros(wins.shape[:-2], dtype=bool)
    for _ in range(max_steps):
        gradient, hessian = _gradient_and_hessian(theta, wins)
        step = np.linalg.solve(hessian, gradient[..., None])[..., 0]
        step[done] = 0.0
        decrease = (gradient * step).sum(axis=-1)
        last = ~done & (decrease < tolerance)
        size = _step_sizes(theta, step, decrease, wins, accept=done | last)
        theta = theta - size[..., None] * step
        done |= last
        if done.all():
            return theta
    raise RuntimeError(f"Bradley–Terry fit did not converge in {max_steps} Newton steps")


def _step_sizes(
    theta: np.ndarray, step: np.ndarray, decrease: np.ndarray, wins: np.ndarray, accept: np.ndarray
) -> np.ndarray:
    """Per fit, the largest of 1, 1/2, 1/4, ... times ``step`` that lowers the loss enough (Armijo).

    Fits marked ``accept`` take the full step unchecked.
    """
    loss = _neg_log_posterior(theta, wins)
    size = np.ones(theta.shape[:-1])
    for _ in range(50):
        trial = theta - size[..., None] * step
        too_long = ~accept & (_neg_log_posterior(trial, wins) > loss - 1e-4 * size * decrease)
        if not too_long.any():
            break
        size = np.where(too_long, size / 2, size)
    return size


def _elo(theta: np.ndarray) -> np.ndarray:
    """Log-strengths (last axis: models) as Elo-scale ratings whose mean is 1000."""
    ratings = ELO_SCALE * theta
    return ratings - ratings.mean(axis=-1, keepdims=True) + ELO_MEAN
