"""``train.compile``: torch.compile of each decoder layer.

Only the repeated blocks are compiled (one graph serves every layer, since their weights are
graph inputs): norms, projections, rotary embeddings, the MLP and the LoRA adds fuse into fewer
kernels. Attention stays eager (``packed_sdpa`` is excluded from compilation: its per-row Python
lists would force a recompile at every new packing layout). Shapes change from step to step with
packing, so after the first new shape the layers are recompiled once with dynamic shapes.
"""

from __future__ import annotations

import importlib.util

import torch

from tunelab.config import TunelabConfig
from tunelab.errors import TunelabError
from tunelab.models.adapters import decoder_layers


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
