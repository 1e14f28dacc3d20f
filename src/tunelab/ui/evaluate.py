"""Evaluate and compare: ``tunelab eval`` and ``tunelab compare`` results as pages, and either launched.

Eval results are the eval runs of the registry (their ``results.json`` and ``predictions.jsonl``);
comparisons are the ``results.json`` + ``verdicts.jsonl`` of ``tunelab compare`` folders launched
from the UI or opened by path. The numbers are those files' numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from tunelab.errors import TunelabError
from tunelab.ui.state import UIState, ui_state

router = APIRouter(prefix="/api")

PAGE_SIZE = 50


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TunelabError(f"{path}: no {what} (was the folder moved or deleted?)") from None
    except (OSError, ValueError) as exc:
        raise TunelabError(f"{path}: unreadable {what} ({exc})") from None
    if not isinstance(data, dict):
        raise TunelabError(f"{path}: unreadable {what} (not a JSON object)")
    return data


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


@router.get("/evals")
def list_evals(state: UIState = Depends(ui_state)) -> dict[str, Any]:
    """Eval runs of the registry (newest first) and the UI's compare folders."""
    evals = []
    if state.settings.registry.is_file():
        for info in state.registry().list("eval", limit=2000):
            evals.append({"id": info["run_id"], "path": info.get("path"), "model": info.get("base_model"),
                          "started": info.get("started_at"), "metrics": {
                              k: v for k, v in (info.get("metrics") or {}).items() if isinstance(v, int | float)},
                          "exists": bool(info.get("path")) and Path(info["path"]).is_dir()})
    compares = [{"job": j.id, "path": j.output_dir, "status": j.status, "title": j.title,
                 "exists": bool(j.output_dir) and (Path(j.output_dir) / "results.json").is_file()}
                for j in state.jobs.list("compare")]
    return {"evals": evals, "compares": compares}


def eval_folder(state: UIState, ref: str) -> Path:
    """The folder of an eval run (registry id) or an eval output folder given by path."""
    if Path(ref).is_dir():
        return Path(ref)
    info = state.registry().get(ref)
    if info["kind"] != "eval":
        raise TunelabError(f"{ref} is a {info['kind']} run, not an evaluation")
    return Path(info["path"])


@router.get("/evals/results")
def eval_results(ref: str, state: UIState = Depends(ui_state)) -> dict[str, Any]:
    """An evaluation's results.json: metrics with CIs per set, accounting, options."""
    folder = eval_folder(state, ref)
    results = _read_json(folder / "results.json", "eval results (results.json)")
    return {"ref": ref, "folder": str(folder), "results": results,
            "predictions": sum(1 for _ in _jsonl(folder / "predictions.jsonl"))}


@router.get("/evals/predictions")
def eval_predictions(ref: str, q: str = "", page: int = 0, state: UIState = Depends(ui_state)) -> dict[str, Any]:
    """Per-example predictions, filtered by ``q`` (in prompt, prediction, reference or id), a page at a time."""
    folder = eval_folder(state, ref)
    rows = _jsonl(folder / "predictions.jsonl")
    needle = q.lower().strip()
    if needle:
        rows = [r for r in rows if any(needle in str(r.get(k, "")).lower()
                                       for k in ("id", "prompt", "prediction", "reference"))]
    start = max(0, page) * PAGE_SIZE
    return {"total": len(rows), "page": page, "page_size": PAGE_SIZE, "rows": [
        {k: r.get(k) for k in ("id", "set", "prompt", "prediction", "reference", "judge_score")}
        for r in rows[start:start + PAGE_SIZE]]}


@router.get("/compare")
def compare_results(path: str) -> dict[str, Any]:
    """A ``tunelab compare`` folder: pairs with win rates and CIs, Bradley-Terry ratings, verdicts."""
    folder = Path(path).expanduser()
    results = _read_json(folder / "results.json", "compare results (results.json)")
    if "pairs" not in results:
        raise TunelabError(f"{folder / 'results.json'}: not a tunelab compare result (no 'pairs')")
    verdicts = _jsonl(folder / "verdicts.jsonl")
    return {"path": str(folder), "results": results, "verdicts": verdicts[:2000], "verdict_count": len(verdicts)}


class EvalLaunch(BaseModel):
    """``tunelab eval`` options the page offers."""

    model: str = Field(min_length=1)
    data: list[str] = Field(min_length=1)
    out: str = Field(min_length=1)
    metrics: str | None = None
    max_samples: int | None = Field(None, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)


@router.post("/evals/launch")
def launch_eval(body: EvalLaunch, state: UIState = Depends(ui_state)) -> dict[str, Any]:
    """Start ``tunelab eval`` in the background."""
    if not Path(body.model).expanduser().is_dir():
        raise TunelabError(f"model {body.model}: no such directory")
    missing = [d for d in body.data if not Path(d).expanduser().is_file()]
    if missing:
        raise TunelabError(f"eval data not found: {', '.join(missing)}")
    argv = ["eval", "--model", body.model, "--out", body.out]
    for file in body.data:
        argv += ["--data", file]
    if body.metrics:
        argv += ["--metrics", body.metrics]
    if body.max_samples:
        argv += ["--max-samples", str(body.max_samples)]
    if body.max_new_tokens:
        argv += ["--max-new-tokens", str(body.max_new_tokens)]
    job = state.jobs.start("eval", argv, f"eval {Path(body.model).name}", output_dir=str(Path(body.out).resolve()))
    return job.public()


class CompareLaunch(BaseModel):
    """``tunelab compare`` options the page offers."""

    predictions: list[str] = Field(min_length=2)  # NAME=FILE or FILE
    judge: str = "metric:exact_match"
    labels: str | None = None
    out: str = Field(min_length=1)


@router.post("/compare/launch")
def launch_compare(body: CompareLaunch, state: UIState = Depends(ui_state)) -> dict[str, Any]:
    """Start ``tunelab compare`` in the background."""
    argv = ["compare", "--judge", body.judge, "--out", body.out]
    for spec in body.predictions:
        path = spec.partition("=")[2] or spec
        if not Path(path).expanduser().is_file():
            raise TunelabError(f"predictions file not found: {path}")
        argv += ["--predictions", spec]
    if body.labels:
        argv += ["--labels", body.labels]
    job = state.jobs.start("compare", argv, f"compare ({body.judge})", output_dir=str(Path(body.out).resolve()))
    return job.public()
