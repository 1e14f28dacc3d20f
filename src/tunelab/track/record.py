"""Record a run: write its ``run.json``, register it (SQLite) and, when asked, log it to MLflow.

Every train, eval, merge, export and serve calls :func:`record_run` once its outputs exist. The
``run.json`` is written first and always; registering is best-effort (a broken registry is a
warning, never a lost run); MLflow gets a copy when ``track.mlflow_uri`` (or
``TUNELAB_MLFLOW_URI``) names a tracking server.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tunelab.track.provenance import git_commit, new_run_id, package_versions
from tunelab.track.registry import Registry, TrackError, normalize_path, read_run_json, registry_path, run_json_beside

logger = logging.getLogger("tunelab.track")


@dataclass
class Artifact:
    """Something a run read or wrote: a dataset, model, adapter, export, eval report or monitoring store."""

    kind: str
    path: str
    fingerprint: str | None = None


def model_artifact(path: str | Path) -> Artifact:
    """A model directory, or an adapter directory when it holds ``adapter_config.json``."""
    kind = "adapter" if (Path(path).expanduser() / "adapter_config.json").is_file() else "model"
    return Artifact(kind, str(path))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _producer(registry: Registry, path: str) -> dict[str, Any] | None:
    try:
        return registry.producer_of(path)
    except TrackError as exc:
        logger.warning("%s; looking for the producer of %s in run.json files only", exc, path)
        beside = run_json_beside(path)
        return read_run_json(beside) if beside else None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON through a temporary file, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def record_run(
    kind: str,
    run_json: Path | None,
    *,
    inputs: list[Artifact],
    outputs: list[Artifact],
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    details: dict[str, Any] | None = None,
    started_at: str | None = None,
    status: str = "finished",
    registry: str | Path | None = None,
    mlflow_uri: str | None = None,
    mlflow_experiment: str = "tunelab",
    path: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``run.json`` (when a path is given), register the run and log it to MLflow if asked.

    Args:
        kind: train, eval, merge, export or serve.
        run_json: where to write the run's record (None: registry only, e.g. a server).
        inputs: what the run read; the first is its primary input, whose producer is the parent.
        outputs: what the run wrote.
        config: the resolved config or command options.
        metrics: final metrics.
        details: other fields kept at the top level of run.json (e.g. steps, device).
        started_at: ISO time the run started (default: now).
        status: finished, running (a server) or failed.
        registry: registry file (default :func:`~tunelab.track.registry.registry_path`).
        mlflow_uri: MLflow tracking URI (default ``$TUNELAB_MLFLOW_URI``; none: no MLflow).
        mlflow_experiment: MLflow experiment name.
        path: where the run's outputs are, for listings (default: the folder of ``run_json``).

    Returns:
        The run's info, as written to run.json.

    Raises:
        TrackError: MLflow was asked for but is not installed (run.json and the registry are
            written before).
    """
    reg = Registry(registry_path(registry))
    linked = []
    for artifact in inputs:
        row = asdict(artifact) | {"path": normalize_path(artifact.path)}
        producer = _producer(reg, row["path"]) if artifact.kind != "dataset" else None
        linked.append(row | {"run_id": producer["run_id"] if producer else None})
    now = _now()
    info: dict[str, Any] = {
        "run_id": new_run_id(kind),
        "kind": kind,
        "status": status,
        "started_at": started_at or now,
        "finished_at": now if status != "running" else None,
        "path": normalize_path(path) if path else str(run_json.parent.resolve()) if run_json else None,
        "parent": linked[0]["run_id"] if linked else None,
        "inputs": linked,
        "outputs": [asdict(a) | {"path": normalize_path(a.path)} for a in outputs],
        "git_commit": git_commit(),
        "versions": package_versions(),
        **(details or {}),
        "metrics": metrics or {},
        "config": config or {},
        "registry": str(reg.path),
    }
    if run_json is not None:
        write_json_atomic(run_json, info)
    try:
        reg.add(info)
    except TrackError as exc:
        logger.warning("%s; the run is not registered%s", exc, f" (its record is in {run_json})" if run_json else "")
    uri = mlflow_uri or os.environ.get("TUNELAB_MLFLOW_URI")
    if uri:
        from tunelab.track.mlflow_log import log_to_mlflow

        kept = f" (the run's record is in {run_json})" if run_json else ""
        try:
            info["mlflow_run_id"] = log_to_mlflow(info, uri, mlflow_experiment)
        except TrackError as exc:
            raise TrackError(f"{exc}{kept}") from None
        except Exception as exc:  # noqa: BLE001 - a tracking server that is down must not fail a finished run
            logger.warning("could not log run %s to MLflow at %s: %s%s", info["run_id"], uri, exc, kept)
            return info
        if run_json is not None:
            write_json_atomic(run_json, info)
    return info


def mark_finished(run_id: str, status: str = "stopped", registry: str | Path | None = None) -> None:
    """Set a registered run's final status (a server that stopped); a registry problem is a warning."""
    try:
        Registry(registry).set_status(run_id, status, _now())
    except TrackError as exc:
        logger.warning("%s; run %s keeps its old status", exc, run_id)


def record_export(model_dir: str, out: str | Path, options: dict[str, Any], checks: dict[str, Any] | None) -> None:
    """Record ``tunelab export``: run.json in the output folder, or ``FILE.run.json`` beside an output file."""
    out = Path(out)
    run_json = out / "run.json" if out.is_dir() else out.with_name(out.name + ".run.json")
    numbers: dict[str, Any] = {}
    for key, value in (checks or {}).items():
        if isinstance(value, dict):
            numbers |= {f"{key}.{k}": v for k, v in value.items() if isinstance(v, int | float)}
        elif isinstance(value, int | float):
            numbers[key] = float(value) if isinstance(value, bool) else value
    record_run("export", run_json, inputs=[model_artifact(model_dir)], outputs=[Artifact("export", str(out))],
               config=options, metrics=numbers, details={"base_model": model_dir, "format": options.get("format")},
               path=out)
