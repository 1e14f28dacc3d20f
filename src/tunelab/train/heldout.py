"""Held-out loss outside a training run, computed exactly as training's evaluation computes it.

``tunelab eval`` reports perplexity with this, so a run's ``eval_loss`` and the perplexity of its
saved model on the same data agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tunelab.data.packing import Batch
from tunelab.train.objectives.sft import SFTObjective
from tunelab.train.parallel.processes import Processes
from tunelab.train.parallel.single import Parallel


def evaluate_loss(model: torch.nn.Module, batches: list[Batch], device: torch.device,
                  autocast: Callable[[], Any]) -> dict[str, float]:
    """Token-averaged held-out loss and its perplexity (``eval_loss``, ``eval_ppl``) over ``batches``, in one process."""
    return Parallel(model, SFTObjective(), Processes(), device, None).evaluate(batches, autocast, token_loss=True)
