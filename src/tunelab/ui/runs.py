"""Runs: the registry as a table, one run with its curves, config, data report, checkpoints and lineage,
and several runs side by side with what differs between them.

Numbers come from the same places the command line reads: the registry (``tunelab runs``),
each run's ``metrics.jsonl``, ``config.yaml`` and ``checkpoints/``, and the tokenized-data cache's
report. Runs launched from the UI show up before training registers them (at its end), from the
job list.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from fastapi import APIRouter, Depends

from tunelab.errors import TunelabError
from tunelab.track.diff import diff_runs
from tunelab.track.lineage import lineage_tree
from tunelab.track.registry import TrackError
from tunelab.ui.jobs import Job
from tunelab.ui.state import UIState, ui_state

router = APIRouter(prefix="/api")

TABLE_LIMIT = 5000  # newest runs in the table


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except ValueError:
        return None


def _numbers(metrics: dict[str, Any] | None) -> dict[str, float]:
    return {k: v for k, v in (metrics or {}).items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"}


def _data_name(info: dict[str, Any]) -> str:
    datasets = [i["path"] for i in info.get("inputs") or [] if i.get("kind") == "dataset"]
    return datasets[0] if datasets else ""


def run_row(info: dict[str, Any]) -> dict[str, Any]:
    """One line of the runs table from a registry record."""
    config = info.get("config") or {}
    model = info.get("base_model") or (config.get("model") or {}).get("path") or ""
    duration = info.get("wall_seconds")
    if duration is None:
        duration = _seconds_between(info.get("started_at"), info.get("finished_at"))
    return {"id": info["run_id"], "kind": info["kind"], "status": info.get("status", ""),
            "objective": info.get("objective") or "", "method": info.get("method") or "", "model": str(model),
            "data": _data_name(info), "metrics": _numbers(info.get("metrics")), "started": info.get("started_at"),
            "duration_s": duration, "path": info.get("path"), "parent": info.get("parent"), "job": None}


def job_row(job: Job) -> dict[str, Any]:
    """A line of the runs table for a training job the registry does not hold yet."""
    config = _read_yaml(Path(job.output_dir) / "config.yaml") if job.output_dir else {}
    return {"id": job.id, "kind": "train", "status": job.status, "objective": (config.get("train") or {}).get(
                "objective", ""), "method": (config.get("method") or {}).get("type", ""),
            "model": (config.get("model") or {}).get("path", ""), "data": ", ".join((config.get("data") or {}).get(
                "train") or []), "metrics": _numbers(_last_row(job.output_dir)), "started": job.started_at,
            "duration_s": _seconds_between(job.started_at, job.finished_at), "path": job.output_dir, "parent": None,
            "job": job.id}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def read_metrics_from(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete rows of a metrics.jsonl from byte ``offset``, and the offset after the last complete row.

    A line being written (no newline yet) waits for the next call; a line that is not JSON is skipped.
    """
    if not path.is_file():
        return [], offset
    with path.open("rb") as handle:
        size = handle.seek(0, 2)
        if offset > size:  # the file was rewritten (a resumed run drops rows after its checkpoint)
            offset = 0
        handle.seek(offset)
        data = handle.read()
    end = data.rfind(b"\n") + 1
    rows = []
    for line in data[:end].splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, offset + end


def _last_row(output_dir: str | None) -> dict[str, Any]:
    if not output_dir:
        return {}
    rows, _ = read_metrics_from(Path(output_dir) / "metrics.jsonl")
    last: dict[str, Any] = {}
    for row in rows:
        last |= row
    return last


def final_train_loss(rows: list[dict[str, Any]]) -> float | None:
    """The loss of the last logged training step (what the run page shows as the final loss)."""
    losses = [r["loss"] for r in rows if isinstance(r.get("loss"), int | float)]
    return losses[-1] if losses else None


def _checkpoints(output_dir: Path) -> list[dict[str, Any]]:
    from tunelab.train.checkpoint import list_checkpoints

    return [{"step": step, "path": str(path)} for step, path in list_checkpoints(output_dir)]


def _data_report(fingerprint: str | None, config: dict[str, Any]) -> dict[str, Any] | None:
    """The tokenize report training printed, from the data cache (None when the cache is gone)."""
    if not fingerprint:
        return None
    from tunelab.data.tokenize import TokenizeReport, default_cache_dir

    cache_dir = (config.get("data") or {}).get("cache_dir")
    meta_file = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / fingerprint / "meta.json"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    out: dict[str, Any] = {"fingerprint": fingerprint}
    for split in ("train", "eval"):
        if meta.get(f"{split}_report"):
            report = TokenizeReport(**meta[f"{split}_report"])
            out[split] = {"lines": report.lines(), "counts": meta[f"{split}_report"]}
    return out


def _job_for(state: UIState, ref: str) -> Job | None:
    if "-job-" not in ref:
        return None
    return state.jobs.get(ref)


def resolve_run(state: UIState, ref: str) -> tuple[dict[str, Any] | None, Job | None]:
    """A run by registry id (or prefix) or UI job id: its registry record (None while training) and its job.

    Raises:
        TunelabError: neither a job nor a registered run.
    """
    job = _job_for(state, ref)
    if job is not None:
        run_json = Path(job.output_dir or "") / "run.json"
        info = None
        if job.status == "finished" and run_json.is_file():
            try:
                info = json.loads(run_json.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                info = None
        return info, job
    if not state.settings.registry.is_file():
        raise TrackError(f"no run registry at {state.settings.registry} (nothing recorded yet)")
    return state.registry().get(ref), None


def run_directory(info: dict[str, Any] | None, job: Job | None) -> Path | None:
    """Where the run's files are (its output_dir)."""
    if info and info.get("path"):
        return Path(info["path"])
    if job and job.output_dir:
        return Path(job.output_dir)
    return None


@router.get("/runs")
def list_runs(state: UIState = Depends(ui_state)) -> dict[str, Any]:
    """Every run of the registry (newest first) and the UI's training jobs not registered yet."""
    path = state.settings.registry
    notice = None
    rows: list[dict[str, Any]] = []
    if path.is_file():
        rows = [run_row(info) for info in state.registry().list(limit=TABLE_LIMIT)]
    else:
        notice = f"no run registry at {path} yet: runs appear here once tunelab train, eval, merge or serve " \
                 "records one (or launch one from the Launch page)"
    registered = {r["path"] for r in rows if r.get("path")}
    jobs = [job_row(j) for j in state.jobs.list("train")
            if not (j.status == "finished" and j.output_dir and str(Path(j.output_dir).resolve()) in registered)]
    return {"registry": str(path), "runs": jobs + rows, "notice": notice, "poll_ms": state.settings.poll_ms}


@router.get("/runs/{ref}")
def show_run(ref: str, state: UIState = Depends(ui_state)) -> dict[str, Any]:
    """One run: record, resolved config, data report, checkpoints, lineage, final loss, warnings."""
    info, job = resolve_run(state, ref)
    directory = run_directory(info, job)
    warnings = []
    if directory is not None and not directory.exists():
        warnings.append(f"the run directory {directory} no longer exists; showing what the registry recorded")
    config_file = directory / "config.yaml" if directory else None
    config = _read_yaml(config_file) if config_file and config_file.is_file() else (info or {}).get("config") or {}
    rows, _ = read_metrics_from(directory / "metrics.jsonl") if directory else ([], 0)
    lineage = None
    if info is not None and state.settings.registry.is_file():
        try:
            lineage = lineage_tree(state.registry(), info["run_id"]).to_dict()
        except TrackError as exc:
            warnings.append(str(exc))
    return {
        "ref": ref, "info": info, "job": job.public() if job else None,
        "kind": (info or {}).get("kind", "train"),
        "status": job.status if job and job.status in ("running", "stopping") else (info or {}).get(
            "status", job.status if job else ""),
        "directory": str(directory) if directory else None, "config": config,
        "config_yaml": yaml.safe_dump(config, sort_keys=False) if config else "",
        "final_loss": final_train_loss(rows), "metrics_rows": len(rows),
        "final_metrics": _numbers((info or {}).get("metrics")),
        "data_report": _data_report((info or {}).get("data_fingerprint"), config),
        "checkpoints": _checkpoints(directory) if directory and directory.exists() else [],
        "final_dir": str(directory / "final") if directory and (directory / "final").is_dir() else None,
        "lineage": lineage, "warnings": warnings, "poll_ms": state.settings.poll_ms,
    }


@router.get("/runs/{ref}/metrics")
def run_metrics(ref: str, offset: int = 0, state: UIState = Depends(ui_state)) -> dict[str, Any]:
    """Rows of the run's metrics.jsonl from byte ``offset`` (poll with the returned offset while it trains)."""
    info, job = resolve_run(state, ref)
    directory = run_directory(info, job)
    rows, next_offset = read_metrics_from(directory / "metrics.jsonl", offset) if directory else ([], offset)
    running = job is not None and job.status in ("running", "stopping")
    return {"rows": rows, "offset": next_offset, "reset": offset > 0 and next_offset < offset,
            "running": running, "status": job.status if job else (info or {}).get("status")}


@router.get("/diff")
def compare_runs(ids: str, state: UIState = Depends(ui_state)) -> dict[str, Any]:
    """What differs between runs (config, data, versions, metrics), as ``tunelab runs diff`` computes it."""
    refs = [r for r in ids.split(",") if r]
    if len(refs) < 2:
        raise TunelabError("choose at least two runs to compare")
    infos = []
    for ref in refs:
        info, job = resolve_run(state, ref)
        if info is None:
            raise TunelabError(f"{ref} has not finished (its config and metrics are not recorded yet)")
        infos.append(info)
    diffs = [{key: (a, b) for key, a, b in diff_runs(infos[0], other)} for other in infos[1:]]
    keys = sorted({key for diff in diffs for key in diff})
    table = []
    for key in keys:
        first = next(diff[key][0] for diff in diffs if key in diff)
        # A run whose value equals the first run's has no entry in its diff.
        table.append({"key": key, "values": [first, *(diff[key][1] if key in diff else first for diff in diffs)]})
    return {"runs": [{"id": i["run_id"], "kind": i["kind"], "path": i.get("path")} for i in infos],
            "diff": table}
