"""Answer metrics: final-answer extraction and exact match."""

from __future__ import annotations

import re
from collections.abc import Sequence


def extract_answer(text: str, pattern: str) -> str:
    """The final answer in ``text``: the first group of the last ``pattern`` match, else the stripped text."""
    matches = list(re.finditer(pattern, text))
    answer = matches[-1].group(1) if matches else text
    return normalize_answer(answer)


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace, drop surrounding punctuation and thousands separators in numbers."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.strip().lower())
    text = re.sub(r"\s+", " ", text)
    return text.strip(" .,:;!?\"'")


def exact_match(predictions: Sequence[str], references: Sequence[str], pattern: str) -> float:
    """Fraction of predictions whose extracted final answer equals the reference's."""
    if not references:
        return 0.0
    hits = sum(extract_answer(p, pattern) == extract_answer(r, pattern) for p, r in zip(predictions, references))
    return hits / len(references)
