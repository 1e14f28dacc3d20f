"""DistributedDataParallel: the whole model in every process, gradients all-reduced once a step."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from tunelab.data.packing import Batch
from tunelab.train.objectives import Metrics
from tunelab.train.parallel.single import Parallel


class DDPParallel(Parallel):
    """DistributedDataParallel: every process holds the whole model; gradients are all-reduced once a step."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Buffers (rotary tables) are identical everywhere: no broadcast before every forward.
        self.ddp = DistributedDataParallel(self.module, device_ids=device_ids, broadcast_buffers=False)

    def describe(self) -> str:
        return f"DDP over {self.world_size} processes"

    def _forward(self, batch: Batch, totals: dict[str, int]) -> tuple[torch.Tensor, Metrics]:
        return self.ddp(batch, totals)

    def _accumulating(self, last: bool) -> AbstractContextManager:
        return nullcontext() if last else self.ddp.no_sync()  # one all-reduce per optimizer step
