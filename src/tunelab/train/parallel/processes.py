"""This process's place in a run: joining torchrun's process group, and which micro-batches are its share."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tunelab.config import TunelabConfig, dump_config
from tunelab.errors import ConfigError
from tunelab.models.precision import resolve_device
from tunelab.train.parallel.launch import LaunchError, check_launch
from tunelab.train.reporting import console


@dataclass(frozen=True)
class Processes:
    """This process's place in the run."""

    strategy: str = "none"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group is in use (any strategy but ``none``)."""
        return self.strategy != "none"

    def barrier(self) -> None:
        """Wait for every process (no-op in one process)."""
        if self.distributed:
            dist.barrier()

    @contextmanager
    def node_main_first(self) -> Iterator[None]:
        """Run the body on each node's first process before the others (caches: write once, then read)."""
        if self.local_rank != 0:
            self.barrier()
        yield
        if self.local_rank == 0:
            self.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` (a small picklable object), in rank order."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def start_processes(config: TunelabConfig) -> tuple[Processes, torch.device]:
    """Join the process group that torchrun set up (or stay single) and pick this process's device.

    Checks the launch first (:func:`~tunelab.train.parallel.launch.check_launch`), then that the process
    group really has the launched size and that every process read the same config.

    Returns:
        The processes and this process's device (``cuda:LOCAL_RANK`` on GPUs).

    Raises:
        LaunchError: a launch that would not train as configured.
    """
    cfg = config.distributed
    world_size = check_launch(cfg, os.environ)
    if cfg.strategy == "none":
        return Processes(), resolve_device(config.train.device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = resolve_device(config.train.device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise LaunchError(f"local rank {local_rank} but only {torch.cuda.device_count()} GPUs are visible: start "
                              "at most one process per GPU (--nproc / --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("distributed.backend nccl needs GPUs; use gloo (or auto) on CPU")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=cfg.timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise LaunchError(f"the process group has {dist.get_world_size()} processes (this is rank {dist.get_rank()}) "
                          f"but the launcher said WORLD_SIZE={world_size}, RANK={rank}: the processes are not one run")
    processes = Processes(cfg.strategy, rank, local_rank, world_size)
    fingerprints = processes.gather(hashlib.sha256(dump_config(config).encode()).hexdigest())
    if len(set(fingerprints)) > 1:
        differing = [r for r, f in enumerate(fingerprints) if f != fingerprints[0]]
        raise LaunchError(f"processes {differing} read a different config than rank 0; give every process the same "
                          "config file and overrides")
    if not processes.is_main:
        console.quiet = True  # one voice: rank 0 prints, logs and shows progress
    if world_size == 1:
        console.print(f"[yellow]distributed.strategy {cfg.strategy} with a single process: nothing is sharded "
                      "or replicated (start more with --nproc N)")
    return processes, device


def stop_processes(processes: Processes) -> None:
    """Leave the process group at the end of a run."""
    if processes.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def window_share(window_size: int, rank: int, world_size: int) -> list[int | None]:
    """Which micro-batches of a window this process runs: ``rank, rank + W, ...``.

    Every process gets the same number of passes; ``None`` marks a padding pass (a short last
    window), which runs a micro-batch with zero weight so that collectives stay matched.
    """
    mine: list[int | None] = list(range(rank, window_size, world_size))
    passes = math.ceil(window_size / world_size)
    return mine + [None] * (passes - len(mine))
