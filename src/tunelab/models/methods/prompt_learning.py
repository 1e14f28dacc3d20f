"""Prompt learning: trained virtual tokens prepended to each row, as prefix tuning or prompt tuning (PEFT).

prefix: trained key/value vectors in every layer; prompt: trained input embeddings before every
sequence. Both need one sequence per row, train with next-token objectives only, and are what
:func:`has_virtual_tokens` recognises on a model.
"""

from __future__ import annotations

from typing import Literal

import torch
from peft import PeftConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from pydantic import Field, model_validator
from transformers import PreTrainedModel

from tunelab.config.base import MethodSettings
from tunelab.errors import TunelabError
from tunelab.models.methods.registry import MethodSpec, register
from tunelab.models.quant import is_quantized, prepare_kbit_model

PROMPT_ENCODER_FILE = "prompt_encoder.safetensors"


class PrefixSettings(MethodSettings):
    """method.type prefix: trained key/value vectors prepended in every layer."""

    type: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, ge=1, description="Number of virtual tokens.")
    prefix_projection: bool = Field(
        False,
        description="Produce the prefix through a trained 2-layer MLP (more parameters, often more stable); the "
        "saved adapter holds the projected prefix.",
    )


class PromptSettings(MethodSettings):
    """method.type prompt: trained input embeddings prepended to every sequence."""

    type: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(20, ge=1, description="Number of virtual tokens.")
    prompt_init: Literal["vocab", "random", "text"] = Field(
        "vocab",
        description="Initial virtual tokens. vocab: embeddings of random vocabulary tokens (the model's own "
        "scale); random: N(0, 1) vectors; text: the embeddings of prompt_init_text.",
    )
    prompt_init_text: str | None = Field(
        None,
        description="prompt_init text: the text whose token embeddings start the virtual tokens (repeated or cut "
        "to num_virtual_tokens), e.g. a task instruction.",
    )

    @model_validator(mode="after")
    def _text_init_has_a_text(self) -> PromptSettings:
        if (self.prompt_init == "text") != bool(self.prompt_init_text and self.prompt_init_text.strip()):
            raise ValueError("method.prompt_init text and method.prompt_init_text go together: set both, or neither")
        return self


def prompt_learning_config(method: PrefixSettings | PromptSettings, task_type: str, model: PreTrainedModel) -> PeftConfig:
    """The PEFT config for prefix tuning or prompt tuning.

    Prompt tuning's text initialisation tokenizes ``method.prompt_init_text`` with the tokenizer
    in the model's directory.
    """
    if isinstance(method, PrefixSettings):
        return PrefixTuningConfig(
            task_type=task_type, num_virtual_tokens=method.num_virtual_tokens, prefix_projection=method.prefix_projection
        )
    init = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM", "text": "TEXT"}[method.prompt_init]
    text = {"prompt_tuning_init_text": method.prompt_init_text, "tokenizer_name_or_path": model.name_or_path}
    return PromptTuningConfig(
        task_type=task_type, num_virtual_tokens=method.num_virtual_tokens, prompt_tuning_init=init,
        **(text if init == "TEXT" else {}),
    )


def apply_prompt_learning(model: PreTrainedModel, method: PrefixSettings | PromptSettings, task_type: str) -> PeftModel:
    """Virtual tokens (a quantized base is first prepared for k-bit training)."""
    if is_quantized(model):
        model = prepare_kbit_model(model)
    try:
        return get_peft_model(model, prompt_learning_config(method, task_type, model))
    except (ValueError, OSError) as exc:
        raise TunelabError(f"method.type {method.type}: {exc}") from None


def has_virtual_tokens(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a PEFT prefix/prompt-tuning model (one sequence per row; no packing, no chunked loss)."""
    return isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning


def prompt_encoder_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full trainable state of a prefix-tuning projection, or None for every other model.

    With ``prefix_projection`` PEFT saves only the projection's output (what inference needs); a
    checkpoint that training resumes from also needs the embedding and MLP that produce it.
    """
    config = model.active_peft_config if isinstance(model, PeftModel) else None
    if not isinstance(config, PrefixTuningConfig) or not config.prefix_projection:
        return None
    return {name: tensor.detach().contiguous() for name, tensor in model.prompt_encoder["default"].state_dict().items()}


def load_prompt_encoder_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`prompt_encoder_state` returned."""
    model.prompt_encoder["default"].load_state_dict(state, strict=True)


register(MethodSpec(names=("prefix",), summary="prefix tuning: trained key/value vectors in every layer",
                    settings=PrefixSettings, apply=apply_prompt_learning, prompt_learning=True, position=3))
register(MethodSpec(names=("prompt",), summary="prompt tuning: trained input embeddings before every sequence",
                    settings=PromptSettings, apply=apply_prompt_learning, prompt_learning=True, position=4))
