"""A copy of each run in MLflow (``pip install 'tunelab[track]'``) when a tracking URI is set."""

from __future__ import annotations

import math
from typing import Any

from tunelab.track.registry import TrackError


def require_mlflow() -> Any:
    """The mlflow module.

    Raises:
        TrackError: mlflow is not installed, with the command that installs it.
    """
    try:
        import mlflow
    except ImportError:
        raise TrackError("track.mlflow_uri (or TUNELAB_MLFLOW_URI) is set but mlflow is not installed: "
                         "pip install 'tunelab[track]' (or pip install mlflow), or unset the URI to use only "
                         "the built-in registry") from None
    return mlflow


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def log_to_mlflow(info: dict[str, Any], uri: str, experiment: str = "tunelab") -> str:
    """Log a run's config (params), numeric metrics, lineage tags and run.json; return the MLflow run id."""
    mlflow = require_mlflow()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    tags = {"tunelab.run_id": info["run_id"], "tunelab.kind": info["kind"], "tunelab.parent": info.get("parent") or "",
            "tunelab.git_commit": info.get("git_commit") or "", "tunelab.base_model": str(info.get("base_model") or ""),
            "tunelab.data_fingerprint": info.get("data_fingerprint") or ""}
    with mlflow.start_run(run_name=info["run_id"], tags=tags) as run:
        params = {k: str(v)[:500] for k, v in flatten(info.get("config") or {}).items()}  # MLflow's value limit
        if params:
            mlflow.log_params(params)
        metrics = {k: float(v) for k, v in flatten(info.get("metrics") or {}).items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
        if metrics:
            mlflow.log_metrics(metrics)
        mlflow.log_dict(info, "run.json")
        return run.info.run_id
