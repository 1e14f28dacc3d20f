"""Rendered examples with trained tokens marked, for ``tunelab data preview``."""

from __future__ import annotations

from itertools import groupby
from typing import Literal

from rich.text import Text
from transformers import PreTrainedTokenizerBase

from tunelab.data.templates import IGNORE_INDEX

TRAINED_STYLE = "bold green"
MASKED_STYLE = "dim"


def mark_trained(
    tokenizer: PreTrainedTokenizerBase,
    input_ids: list[int],
    labels: list[int],
    style: Literal["color", "brackets"] = "color",
) -> Text:
    """The decoded sequence with trained runs in green (``color``) or inside ``[[...]]`` (``brackets``).

    Runs are decoded as a whole so multi-byte characters split across tokens print correctly.
    """
    out = Text()
    runs = groupby(zip(input_ids, labels), key=lambda pair: pair[1] != IGNORE_INDEX)
    for trained, pairs in runs:
        piece = tokenizer.decode([token for token, _ in pairs], skip_special_tokens=False)
        if style == "brackets":
            out.append(f"[[{piece}]]" if trained else piece)
        else:
            out.append(piece, style=TRAINED_STYLE if trained else MASKED_STYLE)
    return out
