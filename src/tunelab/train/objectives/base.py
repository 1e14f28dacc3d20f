"""What the engine asks of an objective: window totals, then each micro-batch's share of the loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from tunelab.data.packing import Batch

Metrics = dict[str, tuple[float, int]]  # name -> (sum over the batch, how many it summed)


def add_metrics(into: dict[str, list[float]], metrics: Metrics) -> None:
    """Accumulate (sum, count) metrics into running ``[sum, count]`` pairs."""
    for name, (total, count) in metrics.items():
        into.setdefault(name, [0.0, 0])
        into[name][0] += total
        into[name][1] += count


class Objective(Protocol):
    """Turns micro-batches into a loss.

    The engine first calls :meth:`window_totals` on all micro-batches of an optimizer step,
    then :meth:`loss` on each: the loss returned is that micro-batch's share of the step's mean
    (summed over its items, divided by the window's total), so accumulating gradients over the
    window equals one big batch. ``totals["units"]`` is what the loss is a mean over (trained
    tokens, pairs, examples); the engine weights logged losses by it.
    """

    def window_totals(self, window: Sequence[Batch]) -> dict[str, int]:
        """Counts over the whole window that normalise the loss (``units`` at least)."""
        ...

    def heads(self) -> dict[str, torch.nn.Module]:
        """Modules the objective trains besides the model (PPO's value head), by file name stem; often none.

        The engine trains, distributes and checkpoints them with the model, and saves them in ``final/``.
        """
        ...

    def loss(self, model: torch.nn.Module, batch: Batch, totals: dict[str, int]) -> tuple[torch.Tensor, Metrics]:
        """This micro-batch's share of the window's loss, and metrics as (sum, count)."""
        ...
