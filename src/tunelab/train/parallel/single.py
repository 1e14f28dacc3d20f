"""One process, plain PyTorch: the :class:`Parallel` interface every strategy implements.

The engine drives every strategy through it: backward over an accumulation window, clip and step,
evaluate, checkpoint, gather the final weights. :mod:`.ddp`, :mod:`.fsdp` and :mod:`.deepspeed`
override how passes run and how state is saved.
"""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from tunelab.config import TunelabConfig
from tunelab.data.packing import Batch
from tunelab.errors import TunelabError
from tunelab.train import checkpoint as checkpoints
from tunelab.train.objectives import Metrics, Objective
from tunelab.train.objectives.base import add_metrics
from tunelab.train.parallel.processes import Processes, window_share

SHARDED_DIR = "distributed"  # inside a checkpoint: per-process RNG, FSDP (DCP) or DeepSpeed state


class LossModule(torch.nn.Module):
    """The model and its objective as one module.

    The distributed wrappers (DDP, FSDP's root, DeepSpeed's engine) wrap this module, so their
    hooks see the whole loss computation however the objective calls the model (a reward model
    calls its backbone and head separately, DPO switches adapters off for the reference).
    """

    def __init__(self, model: torch.nn.Module, objective: Objective, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.heads = torch.nn.ModuleDict(objective.heads())  # trained beside the model (PPO's value head)
        self.objective = objective
        self.device = device

    def forward(self, batch: Batch, totals: dict[str, int]) -> tuple[torch.Tensor, Metrics]:
        """This micro-batch's share of the window's loss, and its metrics."""
        return self.objective.loss(self.model, batch.to(self.device), totals)


class Parallel:
    """One process: plain PyTorch. The strategies below override how passes run and state is saved."""

    def __init__(self, model: torch.nn.Module, objective: Objective, processes: Processes, device: torch.device,
                 config: TunelabConfig | None) -> None:
        # config: read by the sharded strategies; None will do for a one-process evaluation.
        self.model, self.objective, self.processes, self.device = model, objective, processes, device
        self.config = config
        self.module: torch.nn.Module = LossModule(model, objective, device)
        self.trainable: list[torch.nn.Parameter] = []

    # -- set-up ------------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        """Processes that share each optimizer step."""
        return self.processes.world_size

    def describe(self) -> str:
        """One line for the run log."""
        return "one process"

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Take the optimizer (DeepSpeed wraps it); called once after it is built."""
        self.trainable = [p for p in self.module.parameters() if p.requires_grad]  # the model's, then the heads'

    @property
    def heads(self) -> torch.nn.ModuleDict:
        """The objective's own trained modules (after sharding: their parameters are the optimizer's)."""
        return self.module.heads

    def head_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every head's whole state dict, by file name (every process must call this: sharded heads gather)."""
        from torch.distributed.tensor import DTensor

        return {f"{name}.safetensors": {key: (value.full_tensor() if isinstance(value, DTensor) else value).detach()
                                        for key, value in head.state_dict().items()}
                for name, head in self.heads.items()}

    # -- one optimizer step ------------------------------------------------------------------

    def _forward(self, batch: Batch, totals: dict[str, int]) -> tuple[torch.Tensor, Metrics]:
        return self.module(batch, totals)

    def _accumulating(self, last: bool) -> AbstractContextManager:
        return nullcontext()

    def _backward(self, loss: torch.Tensor, scale: float, scaler: torch.amp.GradScaler | None) -> None:
        scaled = loss if scale == 1.0 else loss * scale
        (scaler.scale(scaled) if scaler else scaled).backward()

    def backward_window(self, window: Sequence[Batch], totals: dict[str, int], autocast: Callable[[], Any],
                        scaler: torch.amp.GradScaler | None, metrics: dict[str, list[float]]) -> float:
        """Forward and backward this process's share of one optimizer step's micro-batches.

        ``totals`` is the objective's :meth:`window_totals` of the whole window.

        Returns:
            The step's loss over the whole window (all processes), as one process would get it.
            The objective's metrics over the whole window are added to ``metrics``.
        """
        plan = window_share(len(window), self.processes.rank, self.world_size)
        step_loss = torch.zeros((), device=self.device, dtype=torch.float64)  # summed as exactly as the parts allow
        local: dict[str, list[float]] = {}
        for number, index in enumerate(plan):
            with self._accumulating(last=number == len(plan) - 1):
                with autocast():
                    loss, batch_metrics = self._forward(window[0 if index is None else index], totals)
                # Gradients are averaged over processes; scaling by W makes them the window's sum.
                self._backward(loss, 0.0 if index is None else float(self.world_size), scaler)
            if index is not None:
                step_loss += loss.detach().double()
                add_metrics(local, batch_metrics)
        return self._combine(step_loss, local, metrics)

    def _combine(self, loss: torch.Tensor, local: dict[str, list[float]], into: dict[str, list[float]]) -> float:
        parts = self.processes.gather((float(loss), local)) if self.processes.distributed else [(float(loss), local)]
        for _, part in parts:
            add_metrics(into, {name: (total, count) for name, (total, count) in part.items()})
        return math.fsum(value for value, _ in parts) if len(parts) > 1 else parts[0][0]

    def clip_and_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                      max_grad_norm: float | None) -> float:
        """Unscale, clip to ``max_grad_norm``, step and zero the gradients; return the gradient norm.

        A non-finite norm skips the update (with fp16 the scaler also lowers its scale); the
        engine then stops the run unless a scaler is in use.
        """
        if scaler is not None:
            scaler.unscale_(optimizer)
        norm = self._grad_norm(torch.nn.utils.clip_grad_norm_(self.trainable, max_grad_norm or float("inf")))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        elif math.isfinite(norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def _grad_norm(self, norm: torch.Tensor) -> float:
        return float(norm)

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self, batches: list[Batch], autocast: Callable[[], Any], token_loss: bool) -> dict[str, float]:
        """Held-out loss (and the objective's metrics) over all ``batches``, shared among processes.

        Args:
            token_loss: report ``eval_loss`` as the mean token loss and ``eval_ppl`` (SFT,
                pretraining); otherwise the objective's mean and ``eval_<metric>``.
        """
        was_training = self.model.training
        self.module.eval()
        totals = self.objective.window_totals(batches)
        local: dict[str, list[float]] = {}
        loss = torch.zeros((), device=self.device, dtype=torch.float64)
        with torch.no_grad():
            for index in window_share(len(batches), self.processes.rank, self.world_size):
                with autocast():
                    part, batch_metrics = self._forward(batches[0 if index is None else index], totals)
                if index is not None:
                    loss += part.double()
                    add_metrics(local, batch_metrics)
        self.module.train(was_training)
        metrics: dict[str, list[float]] = {}
        value = self._combine(loss, local, metrics)
        if token_loss:
            return {"eval_loss": value, "eval_ppl": math.exp(min(value, 50.0))}
        return {"eval_loss": value, **{f"eval_{name}": total / max(count, 1) for name, (total, count) in metrics.items()}}

    def generation_context(self) -> AbstractContextManager:
        """Where generation (evaluators) can call the model directly: parameters gathered as needed."""
        return nullcontext()

    # -- weights and checkpoints -------------------------------------------------------------------

    @contextmanager
    def full_weights(self) -> Iterator[dict[str, torch.Tensor] | None]:
        """The whole model's weights for saving, on rank 0.

        Yields None when the model in memory already holds them (one process, DDP, ZeRO-1/2);
        sharded strategies yield a gathered state dict on rank 0 (None on the others). Every
        process must enter this context (it gathers).
        """
        yield None

    def save_checkpoint(self, output_dir: Path, step: int, tokenizer: PreTrainedTokenizerBase,
                        optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                        scaler: torch.amp.GradScaler | None, trainer_state: dict[str, Any], keep: int) -> None:
        """Write ``checkpoints/step-N`` atomically (every process calls this)."""
        heads = self.head_states()
        if not self.processes.distributed:
            checkpoints.save_checkpoint(output_dir, step, self.model, tokenizer, optimizer, scheduler, scaler,
                                        trainer_state, keep, extra_tensors=heads)
            return
        root = checkpoints.checkpoint_root(output_dir)
        staging = root / f".tmp-step-{step}-{SHARDED_DIR}"
        if self.processes.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.processes.barrier()
        if not self.processes.is_main:
            torch.save(_rng_state(), staging / f"rng-rank{self.processes.rank}.pt")
        self.processes.barrier()  # written before rank 0 moves the staging directory into the checkpoint
        self._save_sharded_state(staging, optimizer)
        state = {**trainer_state, "strategy": self.processes.strategy, "world_size": self.world_size}
        with self.full_weights() as weights:
            if self.processes.is_main:
                checkpoints.save_checkpoint(
                    output_dir, step, self.model, tokenizer, self._replicated_optimizer(optimizer), scheduler,
                    scaler, state, keep, extra_tensors=heads, state_dict=weights,
                    extra=lambda tmp: staging.rename(tmp / SHARDED_DIR))
        self.processes.barrier()

    def _save_sharded_state(self, directory: Path, optimizer: torch.optim.Optimizer) -> None:
        """Write the state that only exists in pieces (sharded weights, optimizer state)."""

    def _replicated_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer | None:
        """The optimizer whose ``state_dict()`` rank 0 saves whole (None when it is sharded)."""
        return optimizer

    def load_checkpoint(self, path: Path, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler,
                        scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
        """Restore weights, optimizer, schedule and RNG from a checkpoint; return the trainer state."""
        saved_world = checkpoints.read_trainer_state(path).get("world_size", 1)
        sharded = self._load_sharded_state(path / SHARDED_DIR, optimizer, saved_world)
        model, whole_optimizer = (None, None) if sharded else (self.model, optimizer)
        state = checkpoints.load_checkpoint(path, model, whole_optimizer, scheduler, scaler)
        if not sharded:  # sharded heads came back with the module's sharded state
            for name, head in self.heads.items():
                head.load_state_dict(load_file(path / f"{name}.safetensors", device=str(self.device)))
        own_rng = path / SHARDED_DIR / f"rng-rank{self.processes.rank}.pt"
        if self.processes.rank > 0 and own_rng.is_file():
            _set_rng_state(torch.load(own_rng, weights_only=True))
        return state

    def _load_sharded_state(self, directory: Path, optimizer: torch.optim.Optimizer, saved_world: int) -> bool:
        """Restore sharded weights and optimizer state; False when the checkpoint holds them whole."""
        for strategy in ("fsdp", "deepspeed"):
            if (directory / strategy).is_dir():
                raise TunelabError(f"{directory.parent} was written by distributed.strategy {strategy} (its optimizer "
                                   f"state is sharded); resume it with strategy {strategy}")
        return False


# Per-process RNG (rank 0's lives in the checkpoint's rng.pt and trainer_state.json)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
