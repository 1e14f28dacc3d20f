"""Which parameters train: full fine-tuning, freezing all but chosen layers, or LoRA through PEFT."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from tunelab.config import MethodConfig
from tunelab.errors import TunelabError


@dataclass
class ParameterCount:
    """Trainable and total parameter counts."""

    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return f"{self.trainable:,} trainable of {self.total:,} parameters ({share:.2f}%)"


def count_parameters(model: torch.nn.Module) -> ParameterCount:
    """Count trainable and total parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return ParameterCount(trainable, total)


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList with ``num_hidden_layers`` entries."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise TunelabError(f"cannot find the {count} decoder layers of {type(model).__name__} to freeze")


def _layer_indices(spec: list[int] | int, count: int) -> list[int]:
    indices = list(range(count - spec, count)) if isinstance(spec, int) else [i % count for i in spec]
    bad = [i for i in (spec if isinstance(spec, list) else []) if not -count <= i < count]
    if bad or (isinstance(spec, int) and not 0 < spec <= count):
        raise TunelabError(f"method.trainable_layers {spec}: the model has {count} layers (0..{count - 1})")
    return sorted(set(indices))


def apply_freeze(model: PreTrainedModel, method: MethodConfig) -> list[int]:
    """Freeze everything but the chosen decoder layers (and, optionally, embeddings and head).

    Returns:
        The indices of the layers that train.
    """
    layers = decoder_layers(model)
    chosen = _layer_indices(method.trainable_layers, len(layers))
    model.requires_grad_(False)
    for index in chosen:
        for name, parameter in layers[index].named_parameters():
            if not method.trainable_modules or any(part in name for part in method.trainable_modules):
                parameter.requires_grad_(True)
    if method.train_embeddings:
        model.get_input_embeddings().requires_grad_(True)
        model.get_output_embeddings().requires_grad_(True)
    if count_parameters(model).trainable == 0:
        raise TunelabError(f"method.trainable_modules {method.trainable_modules} matches no parameter in layers {chosen}")
    return chosen


def lora_config(method: MethodConfig) -> LoraConfig:
    """The PEFT LoRA config for a method section."""
    return LoraConfig(
        r=method.rank,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=method.target_modules,
        use_rslora=method.use_rslora,
        use_dora=method.use_dora,
        modules_to_save=method.modules_to_save or None,
        task_type="CAUSAL_LM",
    )


def apply_method(model: PreTrainedModel, method: MethodConfig) -> PreTrainedModel | PeftModel:
    """Set up the parameters that train for ``method.type`` (full, freeze or lora).

    Raises:
        TunelabError: a layer index or target module that does not exist.
    """
    if method.type == "full":
        model.requires_grad_(True)
        return model
    if method.type == "freeze":
        apply_freeze(model, method)
        return model
    try:
        return get_peft_model(model, lora_config(method))
    except ValueError as exc:
        raise TunelabError(f"method.target_modules {method.target_modules}: {exc}") from None


def enable_gradient_checkpointing(model: PreTrainedModel | PeftModel) -> None:
    """Recompute activations in backward (non-reentrant, so frozen inputs need no grad hooks)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
