"""The ``track`` section: the run registry and an optional MLflow server."""

from __future__ import annotations

import importlib.util

from pydantic import Field, field_validator

from tunelab.config.base import Section


class TrackConfig(Section):
    """Run tracking: the run registry (lineage, tunelab runs) and an optional MLflow server."""

    registry: str | None = Field(
        None,
        description="Run registry file (SQLite). Default: $TUNELAB_REGISTRY, else $TUNELAB_HOME/runs.db "
        "(~/.tunelab/runs.db). Merge, export, eval and serve use $TUNELAB_REGISTRY or the default, so set "
        "that variable instead when their runs should land in the same registry.",
    )
    mlflow_uri: str | None = Field(
        None,
        description="Also log each run (config as params, metrics, lineage tags, run.json) to this MLflow "
        "tracking URI (pip install 'tunelab[track]'). Default: $TUNELAB_MLFLOW_URI.",
    )
    mlflow_experiment: str = Field("tunelab", description="MLflow experiment name.")

    @field_validator("mlflow_uri")
    @classmethod
    def _mlflow_installed(cls, uri: str | None) -> str | None:
        # Checked here so that a long training run does not fail only at its end (an import-system lookup,
        # not a read of a user's file).
        if uri and importlib.util.find_spec("mlflow") is None:
            raise ValueError("mlflow is not installed: pip install 'tunelab[track]' (or pip install mlflow), "
                             "or remove track.mlflow_uri")
        return uri
