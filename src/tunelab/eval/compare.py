"""``tunelab compare``: two or more models' predictions on the same prompts -> who wins, and how sure.

Predictions are ``predictions.jsonl`` files written by ``tunelab eval`` (``id``, ``prompt``,
``prediction``, ``reference``), joined on ``id`` (on the prompt when a file has no ids). Per example, a verdict comes from a judge model
(pairwise with position swap), a per-example metric, or human labels; the statistics are in
:mod:`tunelab.eval.abtest`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path
from typing import Any

from tunelab.data.files import read_rows
from tunelab.errors import DataError, TunelabError
from tunelab.eval.abtest import bradley_terry, compare_pair, outcomes_from_scores
from tunelab.eval.judge import Judge, parse_judge_spec
from tunelab.eval.metrics import PER_EXAMPLE_METRICS, example_scores
from tunelab.failures import failure_reasons


def model_name(spec: str, taken: set[str]) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH``; the name defaults to the file's stem, or its folder for predictions.jsonl."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        stem = Path(path).stem
        name = Path(path).parent.name if stem == "predictions" and Path(path).parent.name else stem
    base, count = name, 2
    while name in taken:
        name, count = f"{base}-{count}", count + 1
    return name, path


def load_predictions(path: str) -> list[dict[str, Any]]:
    """The rows of a predictions file, in order.

    Raises:
        DataError: unreadable file, a row that is not an object or has no ``prediction`` field.
    """
    rows: list[dict[str, Any]] = []
    for row in read_rows(path):
        if row.error is not None:
            raise DataError(f"{row.source}: {row.error}")
        if not isinstance(row.data, dict) or "prediction" not in row.data:
            raise DataError(f"{row.source}: expected an object with a 'prediction' field (tunelab eval output)")
        rows.append(row.data)
    return rows


def prompt_key(row: dict[str, Any]) -> str | None:
    """The text a row answered: its ``prompt``, else its ``messages`` as JSON; None when it has neither."""
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    return json.dumps(row["messages"], sort_keys=True) if row.get("messages") else None


def key_rows(files: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, dict[str, dict[str, Any]]], str]:
    """Each model's rows keyed for the join, and what the key is: ``id``, or ``prompt`` when a file lacks ids.

    Rows of the same prompt are told apart by their order (the 2nd "hi" of one file meets the 2nd
    "hi" of the other).

    Raises:
        TunelabError: a file has rows without an id and rows without a prompt to match them by.
    """
    if all("id" in row for rows in files.values() for row in rows):
        return {name: {str(row["id"]): row for row in rows} for name, rows in files.items()}, "id"
    keyed: dict[str, dict[str, dict[str, Any]]] = {}
    for name, rows in files.items():
        seen: dict[str, int] = {}
        keyed[name] = {}
        for number, row in enumerate(rows, start=1):
            prompt = prompt_key(row)
            if prompt is None:
                raise TunelabError(f"--predictions {name}: row {number} has neither an 'id' nor a 'prompt' to match "
                                   "it with the other models' rows by")
            seen[prompt] = seen.get(prompt, 0) + 1
            keyed[name][prompt if seen[prompt] == 1 else f"{prompt}\x00{seen[prompt]}"] = row
    return keyed, "prompt"


def load_labels(path: str) -> dict[tuple[str, str, str], int]:
    """Human labels: JSONL rows ``{"id", "model_a", "model_b", "winner"}``, winner a model name or "tie".

    Returns:
        ``(id, model_a, model_b) -> outcome`` (+1 model_a wins, 0 tie, -1 model_b wins).
    """
    labels: dict[tuple[str, str, str], int] = {}
    for row in read_rows(path):
        data = row.data if row.error is None else None
        if not isinstance(data, dict) or not {"id", "model_a", "model_b", "winner"} <= data.keys():
            raise DataError(f"{row.source}: expected {{id, model_a, model_b, winner}} ({row.error or 'missing keys'})")
        a, b, winner = str(data["model_a"]), str(data["model_b"]), str(data["winner"])
        if winner not in (a, b, "tie"):
            raise DataError(f"{row.source}: winner {winner!r} is neither {a!r}, {b!r} nor 'tie'")
        outcome = 0 if winner == "tie" else 1 if winner == a else -1
        labels[(str(data["id"]), a, b)] = outcome
        labels[(str(data["id"]), b, a)] = -outcome
    return labels


def _pair_outcomes(
    judge: str, ids: list[str], rows_a: dict, rows_b: dict, name_a: str, name_b: str,
    judge_backend: Judge | None, labels: dict | None, answer_pattern: str | None,
) -> tuple[list[int | None], list[dict[str, Any]]]:
    """Per-example outcomes of A vs B and their details for the verdict log."""
    if judge.startswith("metric:"):
        metric = judge.removeprefix("metric:")
        score = lambda row: example_scores(metric, row["prediction"], row.get("reference"),  # noqa: E731
                                           **({"answer_pattern": answer_pattern} if answer_pattern else {}))
        scores_a = [score(rows_a[i]) for i in ids]
        scores_b = [score(rows_b[i]) for i in ids]
        outcomes = outcomes_from_scores(scores_a, scores_b)
        details = [{"score_a": a, "score_b": b} for a, b in zip(scores_a, scores_b)]
    elif judge == "labels":
        outcomes = [labels.get((i, name_a, name_b)) for i in ids]
        details = [{} for _ in ids]
    else:
        items = [{"question": rows_a[i].get("prompt", ""), "answer_a": rows_a[i]["prediction"],
                  "answer_b": rows_b[i]["prediction"]} for i in ids]
        verdicts = judge_backend.compare_many(items)
        outcomes = [v.outcome for v in verdicts]
        details = [{"verdict_ab": v.verdict_ab, "verdict_ba": v.verdict_ba, "error": v.error} for v in verdicts]
    return outcomes, details


def run_compare(
    prediction_specs: list[str], judge: str, out_dir: str | Path, judge_model: str | None = None,
    labels_path: str | None = None, cache_path: str | None = None, resamples: int = 10_000, seed: int = 0,
    answer_pattern: str | None = None,
) -> dict[str, Any]:
    """Compare every pair of models; write results.json and verdicts.jsonl under ``out_dir``.

    Args:
        prediction_specs: ``PATH`` or ``NAME=PATH`` of each model's predictions (two or more).
        judge: ``metric:NAME``, ``openai:BASE_URL``, ``hf:MODEL_DIR`` or ``labels`` (with ``labels_path``).
        out_dir: output directory.
        judge_model: model name for an OpenAI-compatible judge.
        labels_path: human labels (see :func:`load_labels`).
        cache_path: judge verdict cache (default ``out_dir/judge_cache.jsonl``).
        resamples: bootstrap resamples for win-rate CIs.
        seed: bootstrap seed.
        answer_pattern: final-answer regex for ``metric:exact_match``/``numeric_accuracy``.

    Raises:
        TunelabError: fewer than two models, an unknown judge, or no shared examples.
    """
    if len(prediction_specs) < 2:
        raise TunelabError("tunelab compare needs --predictions at least twice")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[dict[str, Any]]] = {}
    for spec in prediction_specs:
        name, path = model_name(spec, set(files))
        files[name] = load_predictions(path)
    models, matched_by = key_rows(files)
    labels, judge_backend = None, None
    if judge.startswith("metric:"):
        if judge.removeprefix("metric:") not in PER_EXAMPLE_METRICS:
            raise TunelabError(f"--judge {judge}: choose a per-example metric: {', '.join(PER_EXAMPLE_METRICS)}")
    elif judge == "labels":
        if not labels_path:
            raise TunelabError("--judge labels needs --labels FILE")
        labels = load_labels(labels_path)
    elif judge.startswith(("openai:", "hf:")) or judge == "openai":
        judge_backend = Judge(parse_judge_spec(judge, judge_model=judge_model),
                              cache_path=cache_path or str(out / "judge_cache.jsonl"))
    else:
        raise TunelabError(f"--judge {judge!r}: expected metric:NAME, openai:BASE_URL, hf:MODEL_DIR or labels")

    names = list(models)
    shared = [i for i in models[names[0]] if all(i in rows for rows in models.values())]  # first file's order
    if not shared:
        raise TunelabError(f"the predictions of {', '.join(names)} share no example {matched_by}")
    pairs, comparisons = [], []
    with (out / "verdicts.jsonl").open("w") as log:
        for name_a, name_b in combinations(names, 2):
            outcomes, details = _pair_outcomes(judge, shared, models[name_a], models[name_b], name_a, name_b,
                                               judge_backend, labels, answer_pattern)
            pairs.append(asdict(compare_pair(outcomes, name_a, name_b, resamples=resamples, seed=seed)))
            comparisons += [(name_a, name_b, o) for o in outcomes if o is not None]
            for example_id, outcome, detail in zip(shared, outcomes, details):
                log.write(json.dumps({"id": example_id, "model_a": name_a, "model_b": name_b,
                                      "outcome": outcome, **detail}) + "\n")
    ratings = [asdict(r) for r in bradley_terry(comparisons, seed=seed)] if len(names) > 2 else []
    results = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "judge": judge + (f" ({judge_model})" if judge_model else ""),
        "models": names,
        "examples": len(shared),
        "matched_by": matched_by,
        "pairs": pairs,
        "ratings": ratings,
        "accounting": {
            **{f"only_in_{name}": len(set(rows) - set(shared)) for name, rows in models.items()},
            **({f"judge_{k}": v for k, v in asdict(judge_backend.stats).items()} if judge_backend else {}),
            **({"judge_failure_reasons": failure_reasons(judge_backend.failures)} if judge_backend else {}),
        },
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results
