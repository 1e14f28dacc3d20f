"""Data: a dataset seen through a config exactly as training sees it.

The same calls as ``tunelab train`` (and ``tunelab data preview``): the config's tokenizer and stop
tokens, :func:`tunelab.data.tokenize.prepare_data` (template render, label mask, truncation,
cache), then each example decoded in runs of trained and masked tokens, the token counts, a
histogram of sequence lengths and the data report's counts.
"""

from __future__ import annotations

import math
from itertools import groupby
from typing import Any

import numpy as np
from fastapi import APIRouter
from pydantic import Field

from tunelab.errors import ConfigError
from tunelab.ui.launch import LaunchBody, validated_config

router = APIRouter(prefix="/api/data")


def trained_segments(tokenizer: Any, input_ids: list[int], labels: list[int]) -> list[dict[str, Any]]:
    """The sequence decoded in runs: ``{text, trained, tokens}`` (runs decode whole, so characters stay intact)."""
    from tunelab.data.templates import IGNORE_INDEX

    segments = []
    for trained, pairs in groupby(zip(input_ids, labels), key=lambda pair: pair[1] != IGNORE_INDEX):
        ids = [token for token, _ in pairs]
        segments.append({"text": tokenizer.decode(ids, skip_special_tokens=False), "trained": trained,
                         "tokens": len(ids)})
    return segments


def length_histogram(lengths: np.ndarray, bins: int = 20) -> dict[str, Any]:
    """Counts of sequence lengths in at most ``bins`` bins of a whole number of tokens each (edges in tokens)."""
    if not len(lengths):
        return {"edges": [], "counts": []}
    low, high = int(lengths.min()), int(lengths.max())
    width = max(1, math.ceil((high - low + 1) / bins))
    edges = low + width * np.arange(math.ceil((high - low + 1) / width) + 1)
    counts, _ = np.histogram(lengths, bins=edges)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


class PreviewBody(LaunchBody):
    """A config (file or form, plus overrides) and which examples to show."""

    n: int = Field(3, ge=1, le=50)
    start: int = Field(0, ge=0)
    split: str = "train"


def _example(tokenizer: Any, row: dict[str, Any], index: int) -> dict[str, Any]:
    from tunelab.data.templates import IGNORE_INDEX

    views = [("sequence", row["input_ids"], row["labels"])]
    if "pair_ids" in row:  # preference pairs: chosen first, rejected second
        views = [("chosen", row["input_ids"], row["labels"]), ("rejected", row["pair_ids"], row["pair_labels"])]
    return {"index": index, "views": [
        {"name": name, "tokens": len(ids), "trained_tokens": sum(1 for label in labels if label != IGNORE_INDEX),
         "segments": trained_segments(tokenizer, ids, labels)} for name, ids, labels in views]}


@router.post("/preview")
def preview(body: PreviewBody) -> dict[str, Any]:
    """Examples with trained tokens marked, token counts, the length histogram and the data report."""
    import pyarrow.compute as pc

    from tunelab.train.objectives.registry import objective_spec
    from tunelab.train.run_data import prepare_run_data

    config, _, errors = validated_config(body)
    if errors or config is None:
        raise ConfigError("\n".join(e["message"] for e in errors))
    tokenizer, data = prepare_run_data(config)
    split = data.eval if body.split == "eval" else data.train
    if split is None:
        raise ConfigError("this config has no eval split (set data.eval or data.val_ratio)")
    report = data.eval_report if body.split == "eval" else data.train_report
    lengths = np.asarray(pc.list_value_length(split.data.column("input_ids")).to_numpy(zero_copy_only=False))
    end = min(len(split), body.start + body.n)
    examples = [_example(tokenizer, split[i], i) for i in range(body.start, end)]
    return {"split": body.split, "rows": len(split), "examples": examples, "histogram": length_histogram(lengths),
            "report": {"lines": report.lines(), "counts": {k: v for k, v in vars(report).items()}},
            "fingerprint": data.fingerprint, "template": data.template,
            "objective": config.train.objective,
            "train_on": config.data.trained_tokens(objective_spec(config.train.objective).data)}
