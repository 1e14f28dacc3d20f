"""Full fine-tuning: every weight trains (the embeddings and output head too, unless told not to)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from transformers import PreTrainedModel

from tunelab.config.base import MethodSettings
from tunelab.models.adapters import set_embeddings_trainable
from tunelab.models.methods.registry import MethodSpec, register


class FullSettings(MethodSettings):
    """method.type full: every weight trains."""

    type: Literal["full"] = "full"
    train_embeddings: bool | None = Field(
        None, description="Whether the input embeddings and output head train. null: yes."
    )


def apply_full(model: PreTrainedModel, method: FullSettings, task_type: str) -> PreTrainedModel:
    """Every weight trains; the embeddings and head stay frozen with ``train_embeddings: false``."""
    model.requires_grad_(True)
    if method.train_embeddings is False:
        set_embeddings_trainable(model, False)
    return model


register(MethodSpec(names=("full",), summary="every weight trains", settings=FullSettings, apply=apply_full, position=0,
                    trains_base=True))
