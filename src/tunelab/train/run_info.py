"""``run.json``: what produced a run (versions, git commit, data fingerprint) and how it went."""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from tunelab.config import TunelabConfig

PACKAGES = ("tunelab", "torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "safetensors")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide a run's numbers."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(directory: Path | None = None) -> str | None:
    """The commit of the git checkout holding ``directory`` (the current directory), if any."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


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
    """Write ``output_dir/run.json`` and return its path."""
    info = {
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "base_model": config.model.path,
        "method": config.method.type,
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
    path.write_text(json.dumps(info, indent=2))
    return path
