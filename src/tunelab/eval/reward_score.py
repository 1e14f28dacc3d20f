"""``tunelab reward score``: score answers with a trained reward model.

Preference pairs give each side's score and the pairwise accuracy (how often the chosen answer
scores higher); conversations give the score of their last assistant answer. Scores are written
as JSONL, one object per record with its source ``file:line``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.progress import track

from tunelab.data.readers import detect_kind, load_preferences, load_records
from tunelab.data.files import read_rows
from tunelab.data.records import Conversation
from tunelab.errors import DataError
from tunelab.models.reward_scoring import RewardModelScorer


def _answer(messages: list[dict[str, str]]) -> str:
    return "".join(m["content"] for m in messages if m["role"] == "assistant")


def _is_preference_file(path: str) -> bool:
    first = next(iter(read_rows(path)))
    return detect_kind(first.data, first.source) == "preference"


def score_file(scorer: RewardModelScorer, path: str, on_error: str = "fail") -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Score every record of a preference or conversation file.

    Returns:
        One row per record (scores and source) and a summary (count, mean score, and for pairs
        the pairwise accuracy and mean margin).

    Raises:
        DataError: the file cannot be read or holds a bad record (with ``on_error: fail``).
    """
    rows: list[dict[str, Any]] = []
    batch = scorer.batch_size * 4
    if _is_preference_file(path):
        pairs, _ = load_preferences([path], on_error)
        for start in track(range(0, len(pairs), batch), description="scoring", transient=True):
            part = pairs[start : start + batch]
            chosen = scorer.score([p.prompt for p in part], [_answer(p.chosen) for p in part])
            rejected = scorer.score([p.prompt for p in part], [_answer(p.rejected) for p in part])
            rows += [{"source": p.source, "chosen": c, "rejected": r} for p, c, r in zip(part, chosen, rejected)]
        margins = [row["chosen"] - row["rejected"] for row in rows]
        summary = {"pairs": len(rows), "accuracy": sum(m > 0 for m in margins) / len(rows),
                   "mean_margin": sum(margins) / len(rows)}
        return rows, summary
    records, _ = load_records([path], on_error=on_error)
    conversations = [r for r in records if isinstance(r, Conversation)]
    if not conversations:
        raise DataError(f"{path}: no conversations or preference pairs to score")
    for start in track(range(0, len(conversations), batch), description="scoring", transient=True):
        part = conversations[start : start + batch]
        prompts = [r.messages[:-1] for r in part]
        scores = scorer.score(prompts, [r.messages[-1]["content"] for r in part])
        rows += [{"source": r.source, "score": s} for r, s in zip(part, scores)]
    return rows, {"records": len(rows), "mean_score": sum(r["score"] for r in rows) / len(rows)}


def write_scores(rows: list[dict[str, Any]], out: str | Path) -> None:
    """Write score rows as JSONL."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(json.dumps(row) + "\n" for row in rows))


def score_files(
    model: str, paths: list[str], out: str | None = None, batch_size: int = 8, device: str = "auto",
    skip_bad: bool = False, overwrite: bool = False,
) -> Iterator[tuple[str, dict[str, float], Path | None]]:
    """``tunelab reward score``: score each file with the reward model ``model``, one file at a time.

    With ``out``, the scores go to that JSONL file (one input) or to ``out/STEM.scores.jsonl`` (several);
    those files are claimed before the model loads. Yields each input, its summary and the file written.
    """
    from tunelab.models.precision import resolve_device

    outs: list[Path | None] = [None] * len(paths)
    if out:
        from tunelab.outputs import claim_files

        outs = [Path(out)] if len(paths) == 1 else [Path(out) / f"{Path(p).stem}.scores.jsonl" for p in paths]
        claim_files(outs, overwrite, "--out", paths)
    scorer = RewardModelScorer(model, resolve_device(device), batch_size=batch_size)
    for path, path_out in zip(paths, outs):
        rows, summary = score_file(scorer, path, "skip" if skip_bad else "fail")
        if path_out is not None:
            write_scores(rows, path_out)
        yield path, summary, path_out
