"""DeepSpeed ZeRO stage 1, 2 or 3 behind :class:`Parallel`, and the DeepSpeed config tunelab runs it with."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from tunelab.config import DistributedConfig, TrainConfig
from tunelab.data.packing import Batch
from tunelab.errors import ConfigError, TunelabError, read_user_text
from tunelab.train.objectives import Metrics
from tunelab.train.parallel.single import Parallel


class DeepSpeedParallel(Parallel):
    """DeepSpeed ZeRO stage 1, 2 or 3 with tunelab's optimizer and schedule."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.engine: Any = None
        self.stage = self.config.distributed.deepspeed.zero_stage

    def describe(self) -> str:
        options = self.config.distributed.deepspeed
        extras = [name for name, on in (("optimizer offload", options.offload_optimizer),
                                        ("parameter offload", options.offload_params)) if on]
        return f"DeepSpeed ZeRO-{self.stage} over {self.world_size} processes" + (
            f" ({', '.join(extras)})" if extras else "")

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        deepspeed = import_deepspeed(self.device)
        config = deepspeed_config(self.config.distributed, self.config.train, self.world_size, self.device)
        self.engine, _, _, _ = deepspeed.initialize(model=self.module, optimizer=optimizer, config=config)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

    def _forward(self, batch: Batch, totals: dict[str, int]) -> tuple[torch.Tensor, Metrics]:
        return self.engine(batch, totals)

    def _accumulating(self, last: bool) -> AbstractContextManager:
        self.engine.set_gradient_accumulation_boundary(last)
        return nullcontext()

    def _backward(self, loss: torch.Tensor, scale: float, scaler: torch.amp.GradScaler | None) -> None:
        self.engine.backward(loss * scale, scale_wrt_gas=False)

    def clip_and_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                      max_grad_norm: float | None) -> float:
        # DeepSpeed clips (config gradient_clipping) and zeroes the gradients inside its step.
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def generation_context(self) -> AbstractContextManager:
        return nullcontext()  # ZeRO-3's module hooks gather parameters whichever module is called

    @contextmanager
    def full_weights(self) -> Iterator[dict[str, torch.Tensor] | None]:
        if self.stage != 3:
            yield None  # ZeRO-1/2 keep whole parameters in every process
            return
        # Gathered layer by layer onto rank 0's CPU (prefix/prompt tuning is refused with ZeRO-3 by the config).
        adapters_only = isinstance(self.model, PeftModel)
        gathered = self.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=adapters_only)
        yield {name.removeprefix("model."): tensor for name, tensor in gathered.items()} if gathered else None

    def _replicated_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        return None

    def _save_sharded_state(self, directory: Path, optimizer: torch.optim.Optimizer) -> None:
        # A frozen base (LoRA, prefix) never changes: the sharded state holds what trains.
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False,
                                    exclude_frozen_parameters=True)

    def _load_sharded_state(self, directory: Path, optimizer: torch.optim.Optimizer, saved_world: int) -> bool:
        if not (directory / "deepspeed").is_dir():
            raise TunelabError(f"{directory.parent}: no DeepSpeed state in this checkpoint (written by a run with "
                               "another distributed.strategy); resume with the strategy that wrote it")
        if saved_world != self.world_size:
            raise TunelabError(
                f"{directory.parent} was written by {saved_world} processes; a DeepSpeed ZeRO checkpoint resumes "
                f"with the same number (--nproc {saved_world}). To change it, convert the checkpoint with "
                "DeepSpeed's ds_to_universal.py, or start a new run from its model directory"
            )
        path, _ = self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state", load_optimizer_states=True,
                                              load_lr_scheduler_states=False, load_module_strict=False)
        if path is None:
            raise TunelabError(f"{directory / 'deepspeed'}: DeepSpeed could not load this checkpoint")
        return True


# Keys tunelab always sets from train.*: a user's file may repeat them ("auto" or the same value).
OWNED_DEEPSPEED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                        "gradient_clipping")


def import_deepspeed(device: torch.device) -> Any:
    """Import DeepSpeed (on its CPU accelerator when training on CPU), or say how to install it."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("distributed.strategy deepspeed: DeepSpeed is not installed; "
                          "pip install --no-build-isolation 'tunelab[deepspeed]'") from None
    import logging

    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


def deepspeed_config(cfg: DistributedConfig, train: TrainConfig, world_size: int, device: torch.device) -> dict:
    """The DeepSpeed config for tunelab's loop, with ``distributed.deepspeed.config_file`` merged over it.

    The batch keys only describe tunelab's own accumulation to DeepSpeed (tunelab marks the
    accumulation boundary itself); the optimizer and schedule are tunelab's.

    Raises:
        ConfigError: the file is missing or not JSON, sets the optimizer or scheduler, or sets an owned key
            or the ZeRO stage differently.
    """
    import json

    options = cfg.deepspeed
    pin = device.type == "cuda"
    zero: dict[str, Any] = {"stage": options.zero_stage}
    if options.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if options.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.grad_accum * world_size,
        "gradient_clipping": train.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # offload runs tunelab's torch AdamW on the CPU copy
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if options.config_file is None:
        return config
    path = Path(options.config_file).expanduser()
    try:  # read here, once: the config only holds the path
        user = json.loads(read_user_text(path, "DeepSpeed config file", ConfigError))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    owned = sorted({"optimizer", "scheduler"} & set(user))
    if owned:
        raise ConfigError(f"{path}: remove {', '.join(owned)}; tunelab builds the optimizer and schedule from "
                          "train.lr, train.schedule, train.weight_decay ...")
    for key in OWNED_DEEPSPEED_KEYS:
        if key in user and user[key] != "auto" and user[key] != config[key]:
            raise ConfigError(f"{path}: {key} is {user[key]!r} but tunelab runs {config[key]!r} (from train.* and the "
                              "process count); remove it or set it to \"auto\"")
    merged = _merge(config, {k: v for k, v in user.items() if k not in OWNED_DEEPSPEED_KEYS})
    stage = merged["zero_optimization"].get("stage", options.zero_stage)
    if stage != options.zero_stage:
        raise ConfigError(f"{path}: zero_optimization.stage is {stage} but distributed.deepspeed.zero_stage is "
                          f"{options.zero_stage}; set the stage in one place")
    return merged


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged
