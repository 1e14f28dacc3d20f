"""How a training step runs fast: the switches of docs/speed.md, applied to the model once.

``train.compile`` compiles each decoder layer. Only the repeated blocks are compiled (one graph serves every layer, since their weights are
graph inputs): norms, projections, rotary embeddings, the MLP and the LoRA adds fuse into fewer
kernels. Attention stays eager (the packed attention is excluded from compilation: its Python
loops over sequences would specialise the graph to one packing layout), and the layout itself
reaches the layers as a tensor, so only its shape is guarded. Shapes change from step to step with
packing, so after the first new shape the layers are recompiled once with dynamic shapes.
"""

from __future__ import annotations

import importlib.util

import torch

from tunelab.config import TunelabConfig
from tunelab.errors import TunelabError
from tunelab.models.adapters import decoder_layers, enable_gradient_checkpointing
from tunelab.models.attention import packed_kernel
from tunelab.train.objectives import objective_spec
from tunelab.train.objectives.base import Objective
from tunelab.models.logprobs import chunked_loss_supported
from tunelab.train.reporting import console


def apply_speed_switches(cfg: TunelabConfig, model: torch.nn.Module, objective: Objective, device: torch.device,
                         varlen_attention: bool, activations: torch.dtype) -> None:
    """Apply the chunked loss (SFT and the DPO family), checkpointing and compile; log once what the run got.

    Args:
        varlen_attention: the model was loaded with ``packed_varlen`` for packed rows.
        activations: the dtype the layers compute in (under autocast, its dtype).
    """
    if hasattr(objective, "chunk_tokens") and use_chunked_loss(cfg, model, device):  # LM-head objectives
        objective.chunk_tokens = cfg.train.loss_chunk_tokens
    if cfg.train.gradient_checkpointing:
        checkpointed, layers = enable_gradient_checkpointing(model, cfg.train.checkpoint_layers)
        if checkpointed < layers:
            console.print(f"[dim]gradient checkpointing: {checkpointed} of {layers} decoder layers[/dim]")
    if varlen_attention:
        console.print(f"[dim]packed attention: {packed_kernel(device, activations)}[/dim]")
    if (blocker := compile_blocker(cfg, device)) is None and (compiled := compile_decoder_layers(model)):
        console.print(f"[dim]compile: {compiled} decoder layers with torch.compile "
                      "(attention eager; the first steps include compile time)[/dim]")
    elif blocker is None:
        console.print(f"[yellow]train.compile off: no stack of decoder layers found in {type(model).__name__}")
    elif cfg.train.compile == "on":
        console.print(f"[yellow]train.compile off: {blocker}")
    else:
        console.print(f"[dim]train.compile: off ({blocker})[/dim]")


def use_chunked_loss(cfg: TunelabConfig, model: torch.nn.Module, device: torch.device) -> bool:
    """Whether SFT computes its loss chunk by chunk (``train.chunked_loss``); says why once when it cannot."""
    if cfg.train.chunked_loss == "off":
        return False
    if cfg.distributed.strategy in ("fsdp", "deepspeed"):
        reason = f"distributed.strategy {cfg.distributed.strategy} shards the output layer"
    elif not chunked_loss_supported(model, device):
        reason = f"{type(model).__name__}'s logits are not its output layer applied to its hidden states"
    else:
        console.print(f"[dim]loss: chunked, {cfg.train.loss_chunk_tokens} positions at a time (no full logits)[/dim]")
        return True
    console.print(f"[yellow]train.chunked_loss off: {reason}; computing the full logits")
    return False




def compile_blocker(cfg: TunelabConfig, device: torch.device) -> str | None:
    """Why ``train.compile`` stays off for this run (None: compile).

    ``on`` compiles wherever torch.compile runs (also on a CPU, with a C++ compiler); ``auto``
    only on CUDA with triton, where the fused kernels pay for the compile time.
    """
    setting = cfg.train.compile
    if setting == "off":
        return "train.compile is off"
    if cfg.distributed.strategy == "deepspeed":
        return "DeepSpeed wraps the model itself"
    if setting == "auto" and objective_spec(cfg.train.objective).online:
        return "auto does not compile online RL (its rollouts change the shapes at every step)"
    if setting == "auto":
        if device.type != "cuda":
            return f"auto compiles on CUDA only (this run is on {device.type}; set train.compile: on to force it)"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
    return None


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """Compile every decoder layer in place; return how many were compiled (0: no layer stack found)."""
    try:
        layers = decoder_layers(model)
    except TunelabError:
        return 0
    for layer in layers:
        layer.compile()
    return len(layers)
