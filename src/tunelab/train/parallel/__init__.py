"""Training across processes: one process, DDP, FSDP2 (``fully_shard``) or DeepSpeed ZeRO.

One module per strategy (:mod:`.single`, :mod:`.ddp`, :mod:`.fsdp`, :mod:`.deepspeed`), all behind
the same :class:`~tunelab.train.parallel.single.Parallel` interface: backward over an
accumulation window, clip and step, evaluate, checkpoint, gather the final weights.

How a step is split. An optimizer step takes ``grad_accum × world_size`` consecutive micro-batches
of the run's single stream (the stream one process would read); process ``r`` runs micro-batches
``r, r + W, r + 2W, ...`` of that window. Every process builds the whole window (cheap: it only
collates token ids) and normalises its losses by the whole window's totals (trained tokens, pairs),
and gradients are summed across processes (the loss is scaled by W, since DDP, FSDP and DeepSpeed
average). So a step with W processes has the same loss and gradients as one process with
``grad_accum × W`` micro-batches, and the learning-rate schedule, which counts optimizer steps,
is the same. A short last window is padded with zero-weighted passes so that every process runs
the same number of forwards (FSDP and ZeRO-3 gather parameters in each one).

Only rank 0 writes metrics, progress, ``config.yaml``, checkpoints' shared files and ``final/``;
the other processes are quiet. See docs/distributed.md.
"""

from __future__ import annotations

import torch

from tunelab.config import TunelabConfig
from tunelab.train.objectives import Objective
from tunelab.train.parallel.ddp import DDPParallel
from tunelab.train.parallel.deepspeed import DeepSpeedParallel, deepspeed_config
from tunelab.train.parallel.fsdp import FSDPParallel
from tunelab.train.parallel.launch import LaunchError
from tunelab.train.parallel.processes import Processes, start_processes, stop_processes, window_share
from tunelab.train.parallel.single import Parallel

STRATEGIES: dict[str, type[Parallel]] = {
    "none": Parallel, "ddp": DDPParallel, "fsdp": FSDPParallel, "deepspeed": DeepSpeedParallel,
}


def parallelize(model: torch.nn.Module, objective: Objective, processes: Processes, device: torch.device,
                config: TunelabConfig) -> Parallel:
    """Wrap the model for ``processes.strategy``; build the optimizer after this (FSDP replaces parameters)."""
    return STRATEGIES[processes.strategy](model, objective, processes, device, config)


__all__ = ["LaunchError", "Parallel", "Processes", "deepspeed_config", "parallelize", "start_processes",
           "stop_processes", "window_share"]
