"""Generation metrics for ``tunelab eval``: reference overlap, final answers, diversity, length, coherence.

Scores that compare with a reference (BLEU, chrF, ROUGE) come from sacrebleu and rouge-score and
are on a 0-100 scale; answer accuracies (``exact_match``, ``numeric_accuracy``) and ``coherence``
are fractions from 0 to 1.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from functools import cache

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

# The metric names live with the config (eval.metrics is checked against them).
from tunelab.config.eval import METRICS, PER_EXAMPLE_METRICS  # noqa: F401

# Answer extraction lives with the data (RL rewards use it too); importable from here as before.
from tunelab.data.answers import ANSWER_PATTERN, extract_answer, extract_number, normalize_answer  # noqa: F401

SELF_BLEU_SAMPLE = 200
"""Self-BLEU compares at most this many predictions (a seeded sample) with each other."""

FRACTION_METRICS: tuple[str, ...] = ("exact_match", "numeric_accuracy", "distinct_1", "distinct_2", "coherence")
"""Metrics on a 0-1 scale."""

PERCENT_METRICS: tuple[str, ...] = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "self_bleu")
"""Metrics on a 0-100 scale."""

LOOP_MIN_CHARS = 12
"""A run of one short unit (1-8 characters, with a letter or digit) repeated this long is a loop."""

_ROUGE = ("rouge1", "rouge2", "rougeL")
_LOOP = re.compile(r"(.{1,8}?)\1{3,}", re.DOTALL)
_LENGTH = ("length_mean", "length_p50", "length_p95", "length_max")



def exact_match(predictions: Sequence[str], references: Sequence[str], pattern: str) -> float:
    """Fraction of predictions whose extracted final answer equals the reference's."""
    if not references:
        return 0.0
    hits = sum(extract_answer(p, pattern) == extract_answer(r, pattern) for p, r in zip(predictions, references))
    return hits / len(references)


def example_scores(
    name: str, prediction: str, reference: str | None, answer_pattern: str = ANSWER_PATTERN
) -> float | None:
    """The score of one prediction against its reference under metric ``name``.

    Used to decide which of two predictions wins on an example. ``bleu`` is sacrebleu's sentence
    BLEU, ``chrf`` its sentence chrF, ``rouge1/2/L`` the ROUGE F-measure x 100, ``exact_match`` and
    ``numeric_accuracy`` are 1.0 or 0.0 (a reference without a number scores 0.0).

    Returns:
        The score, or None when the reference is missing (None or blank).

    Raises:
        ValueError: for a corpus-only metric (diversity, length, coherence) or an unknown name.
    """
    if name not in PER_EXAMPLE_METRICS:
        kind = "is a corpus-level metric" if name in METRICS else "is not a metric"
        raise ValueError(f"{name!r} {kind}; per-example metrics: {', '.join(PER_EXAMPLE_METRICS)}")
    if _missing(reference):
        return None
    if name == "bleu":
        return sacrebleu.sentence_bleu(prediction, [reference]).score
    if name == "chrf":
        return sacrebleu.sentence_chrf(prediction, [reference]).score
    if name in _ROUGE:
        return _rouge_scorer().score(reference, prediction)[name].fmeasure * 100
    if name == "exact_match":
        return float(extract_answer(prediction, answer_pattern) == extract_answer(reference, answer_pattern))
    expected = extract_number(reference, answer_pattern)
    return float(expected is not None and extract_number(prediction, answer_pattern) == expected)


def corpus_metrics(
    predictions: Sequence[str],
    references: Sequence[str | None],
    names: Sequence[str] | None = None,
    answer_pattern: str = ANSWER_PATTERN,
) -> dict[str, float | None]:
    """Corpus-level metrics of ``predictions`` by name, plus the counts they were computed from.

    Reference-based metrics (``PER_EXAMPLE_METRICS``) use only the examples that have a reference
    (None or a blank string means none) and are None when no example has one. ``bleu`` and ``chrf``
    are sacrebleu's corpus scores (0-100), ``rouge1/2/L`` the mean rouge-score F-measure with
    stemming (x 100), ``exact_match`` and ``numeric_accuracy`` fractions of examples answered right
    (see ``extract_answer`` and ``extract_number``).

    The other metrics look at the predictions alone: ``distinct_1/2`` (unique / total lower-cased
    word n-grams over all predictions), ``self_bleu`` (mean sentence BLEU of each non-empty
    prediction against the others, over a seeded sample of ``SELF_BLEU_SAMPLE`` at most; lower is
    more diverse), ``length_*`` (whitespace words per prediction) and ``coherence`` (see
    ``_coherence``). Each is None when there is nothing to measure.

    Args:
        predictions: generated texts.
        references: one reference per prediction, None where there is none.
        names: the metrics to compute (default: all of ``METRICS``).
        answer_pattern: regex whose first group is the final answer.

    Returns:
        ``{name: value}`` for each name, then ``n_examples``, ``n_with_reference`` and
        ``n_empty_predictions``.

    Raises:
        ValueError: for an unknown metric name or when the two sequences differ in length.
    """
    names = list(METRICS if names is None else names)
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(map(repr, unknown))}; valid metrics: {', '.join(METRICS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")

    pairs = [(p, r) for p, r in zip(predictions, references) if not _missing(r)]
    hyps, refs = [p for p, _ in pairs], [r for _, r in pairs]
    values: dict[str, float | None] = {}
    for name in names:
        if name in values:
            continue
        if name in PER_EXAMPLE_METRICS and not pairs:
            values[name] = None
        elif name == "bleu":
            values[name] = sacrebleu.corpus_bleu(hyps, [refs]).score
        elif name == "chrf":
            values[name] = sacrebleu.corpus_chrf(hyps, [refs]).score
        elif name in _ROUGE:
            values.update(_mean_rouge(hyps, refs))
        elif name == "exact_match":
            values[name] = exact_match(hyps, refs, answer_pattern)
        elif name == "numeric_accuracy":
            values[name] = float(np.mean([example_scores(name, p, r, answer_pattern) for p, r in pairs]))
        elif name in ("distinct_1", "distinct_2"):
            values[name] = _distinct(predictions, int(name[-1]))
        elif name == "self_bleu":
            values[name] = _self_bleu(predictions)
        elif name in _LENGTH:
            values.update(_length_stats(predictions))
        else:
            values[name] = _coherence(predictions)
    return {name: values[name] for name in names} | {
        "n_examples": len(predictions),
        "n_with_reference": len(pairs),
        "n_empty_predictions": sum(not p.strip() for p in predictions),
    }


def _missing(reference: str | None) -> bool:
    """A reference is missing when it is None or blank."""
    return reference is None or not reference.strip()


@cache
def _rouge_scorer() -> rouge_scorer.RougeScorer:
    """One ROUGE-1/2/L scorer with the Porter stemmer, built on first use."""
    return rouge_scorer.RougeScorer(list(_ROUGE), use_stemmer=True)


def _mean_rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure x 100 over the pairs."""
    scores = [_rouge_scorer().score(r, p) for p, r in zip(predictions, references)]
    return {name: float(np.mean([s[name].fmeasure for s in scores])) * 100 for name in _ROUGE}


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """Lower-cased whitespace-word n-grams of one text."""
    words = text.lower().split()
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def _distinct(predictions: Sequence[str], n: int) -> float | None:
    """Unique / total word n-grams over all predictions (n-grams never cross two predictions)."""
    grams = [gram for text in predictions for gram in _ngrams(text, n)]
    return len(set(grams)) / len(grams) if grams else None


def _self_bleu(predictions: Sequence[str]) -> float | None:
    """Mean sentence BLEU of each non-empty prediction against all the other ones as references.

    Beyond ``SELF_BLEU_SAMPLE`` predictions, a sample of that size (seed 0) stands for them all:
    the cost grows with the square of the number of texts.
    """
    texts = [p for p in predictions if p.strip()]
    if len(texts) < 2:
        return None
    if len(texts) > SELF_BLEU_SAMPLE:
        texts = random.Random(0).sample(texts, SELF_BLEU_SAMPLE)
    scores = [sacrebleu.sentence_bleu(text, texts[:i] + texts[i + 1 :]).score for i, text in enumerate(texts)]
    return float(np.mean(scores))


def _length_stats(predictions: Sequence[str]) -> dict[str, float | None]:
    """Mean, median, 95th percentile (linear interpolation) and maximum of the words per prediction."""
    if not predictions:
        return dict.fromkeys(_LENGTH)
    lengths = np.array([len(p.split()) for p in predictions])
    p50, p95 = np.percentile(lengths, [50, 95])
    return {"length_mean": float(lengths.mean()), "length_p50": float(p50), "length_p95": float(p95),
            "length_max": float(lengths.max())}


def metric_scale(name: str) -> float | None:
    """The top of a metric's scale: 1 for fractions, 100 for BLEU-like scores, None when unbounded."""
    return 1.0 if name in FRACTION_METRICS else 100.0 if name in PERCENT_METRICS else None


def _looped_share(text: str) -> float:
    """Share of the characters of ``text`` inside loops: one unit of 1-8 characters repeated back to back.

    Only runs of at least ``LOOP_MIN_CHARS`` characters whose unit holds a letter or digit count,
    so ``1000000000`` or a Markdown rule is not a loop, but ``2000000000000000`` or
    ``hahahahahahaha`` is.
    """
    looped = sum(len(m.group()) for m in _LOOP.finditer(text)
                 if len(m.group()) >= LOOP_MIN_CHARS and any(c.isalnum() for c in m.group(1)))
    return looped / len(text) if text else 0.0


def coherence_score(text: str) -> float:
    """The coherence proxy of one non-empty text (0-1): the worse of its word and character repetition.

    Word part: unique word 3-grams / word 3-grams (1.0 below 3 words). Character part: 1 - the
    share of characters inside loops (:func:`_looped_share`), which catches repetition inside a
    word or number ("1 2000000000..."), where there are too few words for 3-grams.
    """
    grams = _ngrams(text, 3)
    words = len(set(grams)) / len(grams) if grams else 1.0
    return min(words, 1.0 - _looped_share(text))


def _coherence(predictions: Sequence[str]) -> float | None:
    """A model-free coherence proxy: how little each prediction repeats itself (0-1, higher is better).

    :func:`coherence_score` of each non-empty prediction, averaged. It catches the loops and
    stutter of degenerate generation, in words and inside words; it says nothing about meaning,
    facts or logic, and it is fooled by text that repeats itself in other words (a paraphrase
    loop), by loops of units longer than 8 characters without spaces, and by fluent nonsense.
    Repetition across predictions is what ``distinct_n`` and ``self_bleu`` measure. None when
    every prediction is empty.
    """
    scores = [coherence_score(text) for text in predictions if text.strip()]
    return float(np.mean(scores)) if scores else None
