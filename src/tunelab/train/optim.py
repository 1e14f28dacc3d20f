"""AdamW with parameter groups, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from tunelab.config import TrainConfig


def parameter_groups(
    model: torch.nn.Module, lr: float, weight_decay: float, lora_plus_ratio: float | None = None
) -> list[dict]:
    """Split trainable parameters into AdamW groups.

    No weight decay on biases and norm weights (every parameter with fewer than 2 dimensions).
    With LoRA+, the LoRA B matrices get ``lr * lora_plus_ratio``.
    """
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decays = parameter.ndim >= 2
        is_lora_b = lora_plus_ratio is not None and "lora_B" in name
        groups.setdefault((decays, is_lora_b), []).append(parameter)
    return [
        {
            "params": params,
            "weight_decay": weight_decay if decays else 0.0,
            "lr": lr * (lora_plus_ratio if is_lora_b else 1.0),
        }
        for (decays, is_lora_b), params in sorted(groups.items())
    ]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, lora_plus_ratio: float | None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (fused kernels on CUDA)."""
    groups = parameter_groups(model, cfg.lr, cfg.weight_decay, lora_plus_ratio)
    on_cuda = any(p.is_cuda for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=on_cuda or None)


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Linear warmup over ``warmup`` steps, then cosine or linear decay to ``min_ratio`` at ``total``,
    or constant.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> LambdaLR:
    """The warmup + decay schedule as a LambdaLR (stepped once per optimizer step)."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, cfg.schedule, cfg.min_lr_ratio)
    )
