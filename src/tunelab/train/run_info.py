"""``run.json``: what produced a training run (versions, git commit, data fingerprint) and how it went.

The run is also registered in the run registry (and MLflow when ``track.mlflow_uri`` is set),
with the dataset and base model as its inputs and ``final/`` as its output, so that
``tunelab runs lineage`` can follow it into merges, exports and servers.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import torch

from tunelab.config import TunelabConfig
from tunelab.track.provenance import PACKAGES, files_fingerprint, git_commit, package_versions
from tunelab.track.record import Artifact, model_artifact, record_run

__all__ = ["PACKAGES", "git_commit", "package_versions", "write_run_json"]


def write_run_json(
    output_dir: Path,
    config: TunelabConfig,
    data_fingerprint: str,
    device: torch.device,
    precision: str,
    parameters: Any,
    steps: int,
    train_seconds: float,
    wall_seconds: float,
    final_metrics: dict[str, Any],
) -> Path:
    """Write ``output_dir/run.json``, register the run, and return the file's path.

    Raises:
        TrackError: ``track.mlflow_uri`` is set but mlflow is missing (run.json is written first).
    """
    started = datetime.now(UTC) - timedelta(seconds=wall_seconds)
    inputs = [Artifact("dataset", ", ".join(config.data.train), data_fingerprint), Artifact("model", config.model.path)]
    if config.data.eval:
        inputs.append(Artifact("dataset", ", ".join(config.data.eval), files_fingerprint(config.data.eval)))
    details = {
        "base_model": config.model.path,
        "method": config.method.type,
        "quantization": config.base_quantization,  # model.quantization with auto resolved
        "objective": config.train.objective,
        "data_fingerprint": data_fingerprint,
        "device": str(device),
        "precision": precision,
        "parameters": {"trainable": parameters.trainable, "total": parameters.total},
        "steps": steps,
        "train_seconds": round(train_seconds, 3),
        "wall_seconds": round(wall_seconds, 3),
        "final_metrics": final_metrics,
    }
    path = output_dir / "run.json"
    record_run(
        "train", path, inputs=inputs, outputs=[model_artifact(output_dir / "final")],
        config=config.model_dump(mode="json"), metrics=final_metrics, details=details,
        started_at=started.isoformat(timespec="seconds"), registry=config.track.registry,
        mlflow_uri=config.track.mlflow_uri, mlflow_experiment=config.track.mlflow_experiment,
    )
    return path
