"""The ``eval`` section: generation-based evaluation during and after training."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from tunelab.config.base import Section

PER_EXAMPLE_METRICS: tuple[str, ...] = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match", "numeric_accuracy")
"""Metrics that compare one prediction with its reference, so that two predictions can be ranked."""

METRICS: tuple[str, ...] = PER_EXAMPLE_METRICS + (
    "distinct_1", "distinct_2", "self_bleu", "length_mean", "length_p50", "length_p95", "length_max", "coherence",
)
"""Every generation metric ``tunelab.eval.metrics.corpus_metrics`` computes, in report order (the names live
here so that the config checks ``eval.metrics`` without importing the evaluation code)."""

ANSWER_PATTERN = r"(?im)^\s*answer\s*:\s*(.+?)\s*$"
"""The default final-answer regex (``eval.answer_pattern``)."""


def check_answer_pattern(pattern: str) -> str:
    """Return ``pattern`` when it is a regex with a group for the answer; else raise ValueError saying why."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    if compiled.groups < 1:
        raise ValueError("the regex needs a group around the answer, e.g. (?im)^answer:\\s*(.+)$")
    return pattern


class EvalConfig(Section):
    """Generation-based evaluation on held-out records during and after training."""

    generate_samples: int = Field(
        0, ge=0, description="Held-out conversations to answer greedily at each evaluation (0: off)."
    )
    max_new_tokens: int = Field(64, ge=1, description="Longest generated answer.")
    answer_pattern: str = Field(
        ANSWER_PATTERN,
        description="Regex whose first group is the final answer, for exact_match; the whole text when it does not match. Checked (it must compile and have a group) before anything loads.",
    )
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch.")
    metrics: list[str] = Field(
        default_factory=lambda: ["exact_match"],
        description="Generation metrics logged at each evaluation as eval_<name> (see tunelab eval --metrics).",
    )

    @field_validator("answer_pattern")
    @classmethod
    def _answer_regex(cls, pattern: str) -> str:
        return check_answer_pattern(pattern)

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, names: list[str]) -> list[str]:
        unknown = [name for name in names if name not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
        return names
