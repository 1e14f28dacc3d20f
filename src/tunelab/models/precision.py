"""Device and precision: where a model runs and in which dtypes, decided in one place.

Precision names (``train.precision``, ``distributed.fsdp.mixed_precision``) are ``fp32``,
``bf16`` and ``fp16``; dtype names (``model.dtype``, ``model.quant_compute_dtype``, ``--dtype``)
are ``float32``, ``bfloat16`` and ``float16``. Both map to torch dtypes only here.
"""

from __future__ import annotations

from typing import Literal

import torch

from tunelab.errors import TunelabError

Precision = Literal["fp32", "bf16", "fp16"]
PRECISION_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype a precision runs activations in under autocast; None for ``fp32`` (no autocast)."""
    return None if precision == "fp32" else PRECISION_DTYPES.get(precision)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; an unavailable device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TunelabError(f"train.device: {name}, but no CUDA device is available (use auto or cpu)")
    return device


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX).

    Without them bf16 autocast is emulated and measured 10-20x slower than fp32 (AVX2 EPYC, torch 2.13).
    """
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bf16 runs fast on ``device``: a GPU that supports it, or a CPU with native bf16."""
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """``auto``: bf16 on a GPU that supports it and on CPUs with native bf16, else fp32.

    Raises:
        TunelabError: fp16 asked for on a CPU (no GradScaler support there that pays).
    """
    if precision == "auto":
        return "bf16" if has_fast_bf16(device) else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise TunelabError("train.precision: fp16 needs a GPU; use bf16 or fp32 on a CPU")
    return precision  # type: ignore[return-value]


def device_dtype(device: torch.device) -> torch.dtype:
    """bf16 weights on a GPU that supports them, fp32 elsewhere (evaluation and serving have no optimizer)."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
