"""What the training methods share: parameter counts, the decoder layer stack and a choice of its layers,
the embeddings switch, linear layer names and gradient checkpointing. The methods themselves (full, freeze,
LoRA/QLoRA, prefix/prompt tuning) are one file each in :mod:`tunelab.models.methods`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from peft import PeftModel
from pydantic import AfterValidator
from transformers import PreTrainedModel

from tunelab.errors import TunelabError
from tunelab.models.quant import logical_numel


def _layer_slice(value: Any) -> Any:
    if isinstance(value, str):
        parts = value.split(":")
        if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts if p.strip()):
            raise ValueError(f"{value!r} is not a layer slice; use start:stop such as '-8:', ':4' or '2:6'")
    return value


LayerChoice = Annotated[list[int] | int | str | None, AfterValidator(_layer_slice)]
"""``method.trainable_layers``: indices, the last N layers, or a ``start:stop`` slice (resolved by :func:`layer_indices`)."""

@dataclass
class ParameterCount:
    """Trainable and total parameter counts."""

    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return f"{self.trainable:,} trainable of {self.total:,} parameters ({share:.2f}%)"


def count_parameters(model: torch.nn.Module) -> ParameterCount:
    """Count trainable and total parameters (a 4-bit weight counts its unquantized elements)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(logical_numel(p) for p in model.parameters())
    return ParameterCount(trainable, total)


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList with ``num_hidden_layers`` entries."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise TunelabError(f"cannot find the {count} decoder layers of {type(model).__name__}")


def layer_indices(spec: list[int] | int | str, count: int) -> list[int]:
    """Resolve ``method.trainable_layers`` against a model with ``count`` decoder layers.

    Args:
        spec: a list of indices (negative counts from the end), an int N (the last N layers), or a
            slice ``"start:stop"`` in Python's notation (``"-8:"``, ``":4"``, ``"2:6"``).
        count: the number of decoder layers.

    Returns:
        Sorted, distinct layer indices.

    Raises:
        TunelabError: an index out of range, N outside 1..count, or a slice that selects nothing.
    """
    if isinstance(spec, str):
        start, _, stop = spec.partition(":")
        indices = list(range(count))[slice(int(start) if start.strip() else None, int(stop) if stop.strip() else None)]
        if not indices:
            raise TunelabError(f"method.trainable_layers '{spec}' selects no layer; the model has {count} (0..{count - 1})")
        return indices
    if isinstance(spec, int):
        if not 0 < spec <= count:
            raise TunelabError(f"method.trainable_layers {spec}: the model has {count} layers; use 1..{count}")
        return list(range(count - spec, count))
    bad = [i for i in spec if not -count <= i < count]
    if bad or not spec:
        raise TunelabError(f"method.trainable_layers {spec}: the model has {count} layers (0..{count - 1})")
    return sorted({i % count for i in spec})


def set_embeddings_trainable(model: PreTrainedModel, trainable: bool) -> None:
    """Switch training of the input embeddings and the output head (absent on a sequence classifier)."""
    model.get_input_embeddings().requires_grad_(trainable)
    output = model.get_output_embeddings()  # None for a sequence-classification model
    if output is not None:
        output.requires_grad_(trainable)


def linear_module_names(model: PreTrainedModel) -> list[str]:
    """Names (last component) of the linear layers inside the decoder layers: what all-linear means."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in decoder_layers(model).named_modules()
        if isinstance(module, torch.nn.Linear)  # bitsandbytes' 4/8-bit linears subclass it
    }
    return sorted(names)


def enable_gradient_checkpointing(model: PreTrainedModel | PeftModel, fraction: float = 1.0) -> tuple[int, int]:
    """Recompute activations in backward (non-reentrant, so frozen inputs need no grad hooks).

    ``fraction`` < 1 checkpoints only that share of the decoder layers, spread evenly (selective
    checkpointing: the others keep their activations, trading memory for less recomputation).
    Returns (checkpointed layers, decoder layers).
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    try:
        layers = decoder_layers(base)
    except TunelabError:  # no recognisable layer stack: the model's own checkpointing, all or nothing
        return 0, 0
    keep = max(1, round(fraction * len(layers)))
    chosen = {i * len(layers) // keep for i in range(keep)}
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index in chosen
    return len(chosen), len(layers)
