"""Where the engine's steps come from: what a step trains on, offline (a dataset) or online (rollouts).

A source turns a step number into :class:`StepWork`: the micro-batch windows of the step's
optimizer steps and what to log besides the losses. :class:`OfflineSource` reads the run's one
stream of micro-batches (``grad_accum × processes`` per step); the online source,
:class:`tunelab.train.rl.source.RolloutSource`, samples, scores and hands the rollouts to the
online objective, which makes ``update_epochs × minibatches`` windows of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tunelab.data.packing import Batch
from tunelab.train.batches import MicroBatches
from tunelab.train.objectives.base import Objective


@dataclass
class StepWork:
    """What one engine step trains on, and what it logs besides the losses.

    Attributes:
        windows: the micro-batches of each of the step's optimizer steps.
        tokens: tokens the step processed.
        weight: the step's weight in a log window's mean loss (trained units offline; 1 per RL step).
        metrics: per-step values logged as their mean over the log window (rewards, lengths, ...).
    """

    windows: list[list[Any]]
    tokens: int
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)


class OfflineSource:
    """Consecutive windows of ``grad_accum`` micro-batches of the run's stream; the position is resumable.

    Args:
        stream: the run's micro-batches (every process reads the same stream).
        grad_accum: micro-batches per optimizer step, all processes together.
        held_out: evaluation batches.
        token_loss: report the held-out loss as a token mean with its perplexity (SFT, pretraining).
    """

    def __init__(self, stream: MicroBatches, objective: Objective, grad_accum: int, epochs: float,
                 max_steps: int | None, held_out: list[Batch], token_loss: bool) -> None:
        self.stream, self.objective, self.grad_accum = stream, objective, grad_accum
        self.total_micro = None if max_steps else stream.count(epochs)
        self.max_steps, self.held_out, self.token_loss = max_steps, held_out, token_loss
        self.micro = 0

    def total_steps(self) -> int:
        """Optimizer steps of the run: ``max_steps``, or ``epochs`` over the stream."""
        return self.max_steps or -(-self.total_micro // self.grad_accum)

    def progress(self, steps: int) -> float:
        """Epochs read so far."""
        return self.stream.progress(self.micro)

    def step(self, step: int) -> StepWork:
        """The next window of micro-batches."""
        end = self.micro + self.grad_accum
        if self.total_micro is not None:
            end = min(end, self.total_micro)
        window = [self.stream.get(m) for m in range(self.micro, end)]
        self.micro = end
        return StepWork([window], sum(batch.num_tokens for batch in window),
                        self.objective.window_totals(window)["units"])

    def updated(self) -> None:
        """Nothing to refresh after an update."""

    def evaluate(self, parallel: Any, autocast: Callable[[], Any]) -> dict[str, float]:
        """Held-out loss (and the objective's metrics) over the evaluation batches."""
        return parallel.evaluate(self.held_out, autocast, token_loss=self.token_loss) if self.held_out else {}

    def state_dict(self) -> dict[str, Any]:
        """The stream position (``micro``: micro-batches read)."""
        return {"micro": self.micro}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's position."""
        self.micro = state["micro"]
