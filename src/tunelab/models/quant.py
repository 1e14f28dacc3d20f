"""Quantized bases for adapter training: 4-bit NF4/FP4 (QLoRA) and 8-bit, through bitsandbytes.

The base is quantized while it loads (``BitsAndBytesConfig`` passed to ``from_pretrained``), then
prepared for k-bit training (PEFT: frozen weights, norms and embeddings upcast to float32). Only
adapters train on it; the quantized base is never saved, so an adapter trained on it loads on the
ordinary full-precision base (and merges into it, not into quantized weights).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import dataclass

import torch

from tunelab.config import ModelConfig
from tunelab.errors import TunelabError
from tunelab.models.precision import DTYPES, has_fast_bf16

INSTALL_HINT = "pip install 'tunelab[qlora]' (bitsandbytes >= 0.45; CPU and CUDA builds are on PyPI)"


def require_bitsandbytes() -> None:
    """Raise a clear error when bitsandbytes is not installed.

    Raises:
        TunelabError: naming the extra to install.
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TunelabError(f"model.quantization needs bitsandbytes, which is not installed: {INSTALL_HINT}")


def resolve_compute_dtype(model_cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The dtype 4-bit matmuls run in. auto: bf16 on a GPU or CPU that runs it fast, else fp32."""
    if model_cfg.quant_compute_dtype != "auto":
        return DTYPES[model_cfg.quant_compute_dtype]
    return torch.bfloat16 if has_fast_bf16(device) else torch.float32


def quantization_config(model_cfg: ModelConfig, device: torch.device):
    """The ``BitsAndBytesConfig`` for ``model.quantization`` (None for an unquantized base).

    Raises:
        TunelabError: bitsandbytes is not installed; a device that bitsandbytes cannot run on.
    """
    if model_cfg.quantization in ("none", "auto"):
        return None
    require_bitsandbytes()
    if device.type not in ("cpu", "cuda"):
        raise TunelabError(f"model.quantization {model_cfg.quantization}: bitsandbytes runs on cpu or cuda, not {device}")
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "8bit":
        _quiet_int8_cast_notice()
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_cfg.quant_type,
        bnb_4bit_use_double_quant=model_cfg.quant_double,
        bnb_4bit_compute_dtype=resolve_compute_dtype(model_cfg, device),
    )


def _quiet_int8_cast_notice() -> None:
    # bitsandbytes logs "inputs will be cast ... to float16" on every 8-bit matmul of a float32
    # input: one line per layer per step. It is expected (int8 matmuls take fp16 inputs), so it is
    # said once in the docs instead.
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastNotice) for f in logger.filters):
        logger.addFilter(_DropCastNotice())


class _DropCastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in record.getMessage()


def _bnb_classes() -> tuple[type, ...]:
    """bitsandbytes' quantized parameter classes, when bitsandbytes has been imported."""
    bnb = sys.modules.get("bitsandbytes")
    return (bnb.nn.Params4bit, bnb.nn.Int8Params) if bnb is not None else ()


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether any weight of the model is a bitsandbytes 4-bit or 8-bit parameter."""
    classes = _bnb_classes()
    return bool(classes) and any(isinstance(p, classes) for p in model.parameters())


def logical_numel(parameter: torch.Tensor) -> int:
    """Elements of the unquantized tensor (a packed 4-bit weight stores two per byte)."""
    classes = _bnb_classes()
    if classes and isinstance(parameter, classes[0]) and parameter.quant_state is not None:
        return parameter.quant_state.shape.numel()
    return parameter.numel()


@dataclass
class WeightMemory:
    """Bytes the model's weights take as loaded, and what the same weights take in bf16."""

    actual_bytes: int
    bf16_bytes: int

    def __str__(self) -> str:
        ratio = self.actual_bytes / max(self.bf16_bytes, 1)
        return (f"weights take {self.actual_bytes / 2**20:,.1f} MiB "
                f"({ratio:.2f}x of {self.bf16_bytes / 2**20:,.1f} MiB in bf16)")


def weight_memory(model: torch.nn.Module) -> WeightMemory:
    """Memory of the weights as loaded (quantization constants included) vs the same weights in bf16."""
    parameters = list(model.parameters())
    actual = sum(p.numel() * p.element_size() for p in parameters)
    classes = _bnb_classes()
    if classes:
        # The scales live outside the weight: absmax per 4-bit block (and, with double quantization,
        # the constants of the quantized absmax), one scale per row of an 8-bit weight.
        for parameter in parameters:
            scales: list[torch.Tensor | None] = []
            if isinstance(parameter, classes[0]) and parameter.quant_state is not None:
                state = parameter.quant_state
                scales = [state.absmax, state.state2.absmax if state.state2 is not None else None]
            elif isinstance(parameter, classes[1]):
                scales = [parameter.SCB]
            actual += sum(t.numel() * t.element_size() for t in scales if t is not None)
    bf16 = sum(logical_numel(p) for p in parameters) * 2
    return WeightMemory(actual, bf16)


CPU_KERNEL_OUT_MULTIPLE = 32
"""bitsandbytes' fused 4-bit CPU kernel repacks weights in groups of 32 output rows."""


def route_unfit_cpu_4bit_layers(model: torch.nn.Module) -> list[str]:
    """Send 4-bit layers that bitsandbytes' fused CPU kernel cannot take to its generic path; return them.

    On a CPU with AVX512-BF16, bitsandbytes runs a 4-bit layer outside training (evaluation,
    generation) through a fused kernel that first repacks the weight; the repacking needs the
    input size to be a multiple of the quantization block size (64) and the output size a
    multiple of 32, and fails with "shape '[128, 5]' is invalid" otherwise (the quickstart's
    352-wide MLP). Those layers are switched to the generic path that training uses (slower, same
    results); the others keep the fast kernel.

    Returns:
        ``name (in -> out)`` of each layer switched.

    Raises:
        TunelabError: such a layer exists and this bitsandbytes has no switch for the kernel (names them).
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return []
    unfit = []
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit) or module.weight.device.type != "cpu":
            continue
        state = module.weight.quant_state
        blocksize = state.blocksize if state is not None else 64
        if module.in_features % blocksize == 0 and module.out_features % CPU_KERNEL_OUT_MULTIPLE == 0:
            continue
        unfit.append(f"{name} ({module.in_features} -> {module.out_features})")
        if "support_avx512bf16_for_cpu" not in vars(module):
            raise TunelabError(
                f"model.quantization 4bit on a CPU: bitsandbytes' 4-bit CPU kernel needs layer input sizes that are "
                f"multiples of {blocksize} and output sizes that are multiples of {CPU_KERNEL_OUT_MULTIPLE}; "
                f"{', '.join(unfit)} are not. Use model.quantization: 8bit, no quantization, or a GPU")
        module.support_avx512bf16_for_cpu = False
    return unfit


def prepare_kbit_model(model: torch.nn.Module) -> torch.nn.Module:
    """PEFT's preparation of a quantized base for training (frozen weights; norms, embeddings and
    head upcast to float32 for stable training). Gradient checkpointing is left to the engine
    (non-reentrant, so the inputs need no grad hooks)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
