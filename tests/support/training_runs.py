"""What the training tests read from a finished or killed run: its logged metrics, its final weights, a kill -9."""

from __future__ import annotations

import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import REPO
from tunelab.train.reporting import read_metrics


def metric_rows(output_dir, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every row of the run's metrics.jsonl that logged ``key``."""
    return [(row["step"], row[key]) for row in read_metrics(output_dir / "metrics.jsonl") if key in row]


def losses(output_dir) -> list[tuple[int, float]]:
    """``(step, loss)`` of every row of the run's metrics.jsonl that logged a training loss."""
    return metric_rows(output_dir, "loss")


def final_weights(output_dir) -> dict[str, torch.Tensor]:
    """The tensors the run saved in ``final/`` (the adapter's, or the whole model's)."""
    final = output_dir / "final"
    files = list(final.glob("adapter_model.safetensors")) or list(final.glob("model*.safetensors"))
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(file))
    return weights


def kill_after_step(config_path, step: int) -> None:
    """Start a one-process ``tunelab train`` run and SIGKILL it as soon as it reports optimizer step ``step``."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "train", str(config_path)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO,
    )
    try:
        for line in process.stderr:
            if line.startswith(f"step {step}:"):
                process.kill()
                break
    finally:
        process.kill()
        process.wait(timeout=60)
    assert process.returncode == -9, "the run ended before it could be killed"
