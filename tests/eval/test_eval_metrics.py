"""Generation metrics: equal to sacrebleu/rouge-score on real references, answers, diversity, missing data."""

from __future__ import annotations

import gzip
import json

import pytest
import sacrebleu
from conftest import SHARED_DATA
from rouge_score import rouge_scorer

from tunelab.config import EvalConfig
from tunelab.eval.metrics import (
    ANSWER_PATTERN,
    METRICS,
    PER_EXAMPLE_METRICS,
    corpus_metrics,
    example_scores,
    extract_number,
)

MULTI30K = SHARED_DATA / "translation" / "multi30k"
DIALOGSUM = SHARED_DATA / "summarization" / "dialogsum" / "dialogsum.dev.jsonl"
GSM8K = SHARED_DATA / "gsm8k" / "test.jsonl"


def _need(path):
    if not path.exists():
        pytest.skip(f"{path} is not there")


def _corrupt(sentence: str) -> str:
    """Drop every 5th word and swap the first two: a deterministic, partly right 'translation'."""
    words = [w for i, w in enumerate(sentence.split(), 1) if i % 5]
    if len(words) > 2:
        words[0], words[1] = words[1], words[0]
    return " ".join(words)


def _rouge_direct(predictions, references):
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    return {k: 100 * sum(s[k].fmeasure for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL")}


def _check_against_libraries(predictions, references):
    got = corpus_metrics(predictions, references, names=["bleu", "chrf", "rouge1", "rouge2", "rougeL"])
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score)
    for name, value in _rouge_direct(predictions, references).items():
        assert got[name] == pytest.approx(value)
    for name in ("bleu", "chrf", "rouge1", "rouge2", "rougeL"):
        assert 0 < got[name] < 100, (name, got[name])
    for p, r in list(zip(predictions, references))[:10]:
        assert example_scores("bleu", p, r) == pytest.approx(sacrebleu.sentence_bleu(p, [r]).score)
        assert example_scores("chrf", p, r) == pytest.approx(sacrebleu.sentence_chrf(p, [r]).score)
        assert example_scores("rougeL", p, r) == pytest.approx(_rouge_direct([p], [r])["rougeL"])
    return got


def test_translation_scores_equal_sacrebleu_and_rouge_score_on_multi30k():
    _need(MULTI30K)
    with gzip.open(MULTI30K / "val.de.gz", "rt", encoding="utf-8") as f:
        references = [line.strip() for _, line in zip(range(200), f)]
    predictions = [_corrupt(r) for r in references]
    got = _check_against_libraries(predictions, references)
    assert got["n_examples"] == got["n_with_reference"] == 200
    # English sentences against German references: far worse than the corrupted German.
    with gzip.open(MULTI30K / "val.en.gz", "rt", encoding="utf-8") as f:
        english = [line.strip() for _, line in zip(range(200), f)]
    assert corpus_metrics(english, references, names=["bleu"])["bleu"] < got["bleu"] / 4


def test_summary_scores_equal_sacrebleu_and_rouge_score_on_dialogsum():
    _need(DIALOGSUM)
    with DIALOGSUM.open(encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(200), f)]
    references = [row["summary"] for row in rows]
    # The first turn of the dialogue, without its speaker tag, as a (poor) summary.
    predictions = [row["dialogue"].split("\n")[0].split(":", 1)[1].strip() for row in rows]
    _check_against_libraries(predictions, references)


def _gsm8k_answers(n: int = 20) -> list[str]:
    _need(GSM8K)
    with GSM8K.open(encoding="utf-8") as f:
        return [json.loads(line)["answer"] for _, line in zip(range(n), f)]


def test_numeric_accuracy_and_exact_match_on_gsm8k_answers():
    references = _gsm8k_answers()
    predictions = []
    for i, answer in enumerate(references):
        body, final = answer.rsplit("####", 1)
        if i % 2:  # a wrong final number for every other example
            final = str(int(final.replace(",", "")) + 1)
        predictions.append(f"{body}#### {final.strip()}")
    got = corpus_metrics(predictions, references, names=["exact_match", "numeric_accuracy"])
    assert got["numeric_accuracy"] == pytest.approx(0.5)
    assert got["exact_match"] == pytest.approx(0.5)
    wins = [example_scores("numeric_accuracy", p, r) for p, r in zip(predictions, references)]
    assert wins == [1.0, 0.0] * 10
    # An 'answer:' line, thousands separators and the number written with decimals.
    finals = [extract_number(r) for r in references]
    restated = [f"Let me think.\nAnswer: {float(n):,.1f}" for n in finals]
    assert corpus_metrics(restated, references, names=["numeric_accuracy"])["numeric_accuracy"] == 1.0


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("so 16-3-4=<<16-3-4=9>>9 eggs\n#### 72", "72"),
        ("Answer: 72", "72"),
        ("answer: 1,000 dollars", "1000"),
        ("#### 1,000.00", "1000"),
        ("it is 5.0", "5"),
        ("costs $0.50.", "0.5"),
        ("it dropped to -3 degrees", "-3"),
        ("from 2020-2021", "2021"),
        ("first 3 then 4\nanswer: 3\nafter that 9", "3"),
        ("no number here", None),
    ],
)
def test_extract_number(text, number):
    assert extract_number(text) == number


def test_numeric_answers_compare_as_numbers():
    assert example_scores("numeric_accuracy", "answer: 1,000", "#### 1000") == 1.0
    assert example_scores("numeric_accuracy", "#### 5.0", "so she has 5") == 1.0
    assert example_scores("numeric_accuracy", "Answer: 72", "#### 72") == 1.0
    assert example_scores("numeric_accuracy", "Answer: 72.5", "#### 72") == 0.0
    assert example_scores("numeric_accuracy", "no idea", "no number") == 0.0
    assert example_scores("exact_match", "work...\nAnswer: Paris.", "answer: paris") == 1.0
    assert example_scores("exact_match", "Answer: Lyon", "answer: paris") == 0.0


def test_distinct_n_by_hand():
    got = corpus_metrics(["The cat sat", "the cat ran", "x"], [None] * 3, names=["distinct_1", "distinct_2"])
    # words: the cat sat the cat ran x -> 5 unique of 7; bigrams: the-cat cat-sat the-cat cat-ran -> 3 of 4
    assert got["distinct_1"] == pytest.approx(5 / 7)
    assert got["distinct_2"] == pytest.approx(3 / 4)
    assert corpus_metrics(["a", ""], [None, None], names=["distinct_2"])["distinct_2"] is None


def test_self_bleu_by_hand():
    # Two copies score 100 against each other; a text sharing no word with them scores 0.
    same = "the cat sat on the mat"
    got = corpus_metrics([same, same, "dogs run fast"], [None] * 3, names=["self_bleu"])["self_bleu"]
    assert got == pytest.approx(200 / 3)
    # 'a b c d' vs 'a b c e': precisions 3/4, 2/3, 1/2 and 0/1 smoothed to 1/2, no brevity penalty.
    got = corpus_metrics(["a b c d", "a b c e"], [None] * 2, names=["self_bleu"])["self_bleu"]
    assert got == pytest.approx(100 * (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25)
    assert corpus_metrics(["only one", "", " "], [None] * 3, names=["self_bleu"])["self_bleu"] is None


def test_self_bleu_samples_large_sets_deterministically():
    predictions = [f"item {i} is number {i % 7}" for i in range(260)]
    first = corpus_metrics(predictions, [None] * 260, names=["self_bleu"])["self_bleu"]
    assert first == corpus_metrics(predictions, [None] * 260, names=["self_bleu"])["self_bleu"]
    assert 0 < first < 100


def test_length_statistics():
    names = ["length_mean", "length_p50", "length_p95", "length_max"]
    got = corpus_metrics(["one", "one two", "one two three four", ""], [None] * 4, names=names)
    # lengths 0 1 2 4: median 1.5, 95th percentile 2 + 0.85 * (4 - 2) by linear interpolation
    assert got["length_mean"] == pytest.approx(1.75)
    assert got["length_p50"] == pytest.approx(1.5)
    assert got["length_p95"] == pytest.approx(3.7)
    assert got["length_max"] == 4
    assert corpus_metrics([], [], names=["length_mean"])["length_mean"] is None


def test_coherence_penalises_a_text_that_repeats_itself():
    looping = "the cat sat the cat sat the cat sat"  # 7 word 3-grams, 3 of them distinct
    varied = "A small dog ran across the wet field and then slept under a tree."
    assert corpus_metrics([looping], [None], names=["coherence"])["coherence"] == pytest.approx(3 / 7)
    assert corpus_metrics([varied], [None], names=["coherence"])["coherence"] == 1.0
    both = corpus_metrics([looping, varied, "", "hi"], [None] * 4, names=["coherence"])["coherence"]
    assert both == pytest.approx((3 / 7 + 1 + 1) / 3)  # the empty prediction is left out, 'hi' scores 1
    assert corpus_metrics([""], [None], names=["coherence"])["coherence"] is None


def test_missing_references_and_empty_predictions():
    predictions = ["a cat sat on the mat", "the dog ran", "", "Answer: 4", "anything"]
    references = ["a cat sat on a mat", None, "two", "answer: 4", "  "]
    got = corpus_metrics(predictions, references)
    assert list(got) == [*METRICS, "n_examples", "n_with_reference", "n_empty_predictions"]
    assert (got["n_examples"], got["n_with_reference"], got["n_empty_predictions"]) == (5, 3, 1)
    kept_p, kept_r = ["a cat sat on the mat", "", "Answer: 4"], ["a cat sat on a mat", "two", "answer: 4"]
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(kept_p, [kept_r]).score)
    assert got["exact_match"] == pytest.approx(1 / 3)
    assert got["numeric_accuracy"] == pytest.approx(1 / 3)
    assert got["length_max"] == 6  # prediction-only metrics use every prediction
    assert example_scores("bleu", "the dog ran", None) is None
    assert example_scores("rouge1", "the dog ran", "") is None

    nothing = corpus_metrics(["x y", ""], [None, ""])
    assert all(nothing[name] is None for name in PER_EXAMPLE_METRICS)
    assert nothing["length_mean"] == 1.0
    assert (nothing["n_with_reference"], nothing["n_empty_predictions"]) == (0, 1)


def test_unknown_names_and_bad_input_raise():
    with pytest.raises(ValueError, match="'bleurt'.*valid metrics: bleu, chrf"):
        corpus_metrics(["a"], ["a"], names=["bleu", "bleurt"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        corpus_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="'self_bleu' is a corpus-level metric; per-example metrics: bleu"):
        example_scores("self_bleu", "a", "a")
    with pytest.raises(ValueError, match="'bleurt' is not a metric"):
        example_scores("bleurt", "a", "a")


def test_metric_names_and_default_pattern_are_stable():
    assert len(set(METRICS)) == len(METRICS) == 15
    assert set(PER_EXAMPLE_METRICS) < set(METRICS)
    assert ANSWER_PATTERN == EvalConfig.model_fields["answer_pattern"].default
