"""Final answers in model output: the ``answer: ...`` line and GSM8K-style numbers.

Evaluation (exact match, numeric accuracy) and RL rewards use these same functions, so a reward
and the metric it is meant to raise agree on what counts as right.
"""

from __future__ import annotations

import re
from decimal import Decimal

# The pattern and its check belong to the config (eval.answer_pattern); importable from here as before.
from tunelab.config.eval import ANSWER_PATTERN, check_answer_pattern  # noqa: F401

# A number: optional minus, digits with optional thousands separators, optional decimals; not the tail of a word.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


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


def extract_number(text: str, pattern: str = ANSWER_PATTERN) -> str | None:
    """The numeric final answer of a GSM8K-style text, in a canonical form, or None when there is none.

    The first number after the last ``####`` if there is one, else the first number in the last
    ``pattern`` match (an ``answer: ...`` line by default), else the last number in the text.
    Thousands separators are dropped and the number is written without trailing zeros, so equal
    numbers give equal strings.

    Example:
        >>> extract_number("5 + 995 = 1,000 apples\\n#### 1,000.0")
        '1000'
    """
    places = []
    if "####" in text:
        places.append(text.rsplit("####", 1)[1])
    answers = list(re.finditer(pattern, text))
    if answers:
        places.append(answers[-1].group(1))
    for place in places:
        numbers = _NUMBER.findall(place)
        if numbers:
            return _canonical_number(numbers[0])
    numbers = _NUMBER.findall(text)
    return _canonical_number(numbers[-1]) if numbers else None


def _canonical_number(number: str) -> str:
    """``'1,000.50'`` -> ``'1000.5'``: no separators, no trailing zeros, no exponent."""
    value = Decimal(number.replace(",", "")).normalize()
    return format(value + 0, "f")  # + 0 turns -0 into 0 and 1E+3 into 1000
