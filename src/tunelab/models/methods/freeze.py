"""Freeze tuning: everything frozen but chosen decoder layers (and, optionally, the embeddings and head)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from transformers import PreTrainedModel

from tunelab.config.base import MethodSettings
from tunelab.errors import TunelabError
from tunelab.models.adapters import (
    LayerChoice,
    count_parameters,
    decoder_layers,
    layer_indices,
    set_embeddings_trainable,
)
from tunelab.models.methods.registry import MethodSpec, register

DEFAULT_FREEZE_LAYERS = 2  # freeze without trainable_layers trains the last two decoder layers


class FreezeSettings(MethodSettings):
    """method.type freeze: only chosen decoder layers train."""

    type: Literal["freeze"] = "freeze"
    trainable_layers: LayerChoice = Field(
        None,
        description="Decoder layers that train: a list of indices (negative counts from the end), an int N meaning "
        "the last N layers, or a Python slice such as '-8:' or ':4'. null: the last 2 layers.",
    )
    trainable_modules: list[str] = Field(
        default_factory=list,
        description="Within the trainable layers, train only parameters whose name contains one of these strings "
        "(empty: the whole layer), e.g. [mlp].",
    )
    train_embeddings: bool | None = Field(
        None, description="Whether the input embeddings and output head train. null: no."
    )


def apply_freeze(model: PreTrainedModel, method: FreezeSettings, task_type: str = "CAUSAL_LM") -> PreTrainedModel:
    """Freeze everything but the chosen decoder layers (and, optionally, embeddings and head)."""
    layers = decoder_layers(model)
    spec = method.trainable_layers if method.trainable_layers is not None else DEFAULT_FREEZE_LAYERS
    chosen = layer_indices(spec, len(layers))
    model.requires_grad_(False)
    for index in chosen:
        for name, parameter in layers[index].named_parameters():
            if not method.trainable_modules or any(part in name for part in method.trainable_modules):
                parameter.requires_grad_(True)
    if method.train_embeddings:
        set_embeddings_trainable(model, True)
    if count_parameters(model).trainable == 0:
        raise TunelabError(f"method.trainable_modules {method.trainable_modules} matches no parameter in layers {chosen}")
    return model


register(MethodSpec(names=("freeze",), summary="chosen decoder layers train, the rest is frozen",
                    settings=FreezeSettings, apply=apply_freeze, position=1, trains_base=True))
