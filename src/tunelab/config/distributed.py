"""The ``distributed`` section: several processes (GPUs, nodes) and their strategy."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tunelab.config.base import Section


class FSDPConfig(Section):
    """distributed.strategy fsdp: PyTorch FSDP2 (``fully_shard`` on every decoder layer, then the whole model)."""

    cpu_offload: bool = Field(
        False,
        description="Keep the sharded parameters, gradients and optimizer state in CPU memory and run the "
        "optimizer there (CPUOffloadPolicy): fits bigger models on the GPUs, slower.",
    )
    mixed_precision: Literal["none", "bf16", "fp16"] = Field(
        "none",
        description="Dtype the gathered parameters are computed in (MixedPrecisionPolicy param_dtype; gradients "
        "are reduced in float32, the optimizer keeps the loaded dtype). Halves all-gather traffic against "
        "float32 weights. none: as loaded; train.precision's autocast applies either way.",
    )
    reshard_after_forward: bool = Field(
        True,
        description="Free each layer's gathered parameters after its forward and gather them again for backward "
        "(least memory, like ZeRO-3); false keeps them until backward (less communication, like ZeRO-2).",
    )


class DeepSpeedConfig(Section):
    """distributed.strategy deepspeed: DeepSpeed ZeRO (pip install --no-build-isolation 'tunelab[deepspeed]')."""

    zero_stage: Literal[1, 2, 3] = Field(
        2, description="ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."
    )
    offload_optimizer: bool = Field(
        False, description="ZeRO-Offload: optimizer state and step in CPU memory (stage 1-3)."
    )
    offload_params: bool = Field(False, description="ZeRO-Infinity: parameters in CPU memory between uses (stage 3).")
    config_file: str | None = Field(
        None,
        description="A DeepSpeed JSON config merged over the one tunelab builds (e.g. communication, "
        "bf16/fp16, offload details). Batch size, accumulation, clipping, optimizer and scheduler always come "
        "from train.*; the file must not set them differently (it is read and checked where DeepSpeed starts).",
    )


class DistributedConfig(Section):
    """Training with several processes (GPUs, nodes), launched by ``tunelab train --nproc N`` or torchrun."""

    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = Field(
        "none",
        description="none: one process. ddp: every process holds the whole model, gradients are all-reduced. "
        "fsdp: FSDP2, parameters, gradients and optimizer state sharded across processes. deepspeed: ZeRO "
        "stage 1/2/3. The global batch is train.grad_accum micro-batches per process times the number of "
        "processes. See docs/distributed.md.",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend. auto: nccl on CUDA, gloo on CPU."
    )
    timeout_minutes: float = Field(
        30.0, gt=0, description="How long a collective waits for the other processes before the run fails."
    )
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig, description="Options of strategy fsdp.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="Options of strategy deepspeed.")

    @model_validator(mode="after")
    def _options_of_the_strategy(self) -> DistributedConfig:
        for section in ("fsdp", "deepspeed"):
            # Set to other than its defaults (the resolved config.yaml of a run holds both at their defaults).
            options = getattr(self, section)
            if section in self.model_fields_set and self.strategy != section and options != type(options)():
                raise ValueError(f"{section} options apply to strategy {section} only (strategy is {self.strategy})")
        if self.deepspeed.offload_params and self.deepspeed.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs zero_stage 3 (only stage 3 shards parameters)")
        return self
