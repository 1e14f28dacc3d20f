"""LoRA and its variants: QLoRA (on a quantized base), DoRA, rsLoRA, PiSSA initialisation and LoRA+.

``method.type`` lora or qlora; qlora is LoRA on a base loaded in 4-bit NF4 (``model.quantization:
auto`` resolves to 4bit for it). The variants are LoRA's settings: ``use_dora``, ``use_rslora``,
``init: pissa``, ``lora_plus_ratio``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from peft import LoraConfig, PeftModel, get_peft_model
from pydantic import Field, model_validator
from transformers import PreTrainedModel

from tunelab.config.base import MethodSettings
from tunelab.errors import TunelabError
from tunelab.models.adapters import LayerChoice, decoder_layers, layer_indices, linear_module_names
from tunelab.models.methods.registry import MethodSpec, register
from tunelab.models.quant import is_quantized, prepare_kbit_model


class LoRASettings(MethodSettings):
    """method.type lora, qlora: low-rank adapters on the frozen (for qlora: quantized) base."""

    type: Literal["lora", "qlora"] = "lora"
    rank: int = Field(16, ge=1, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scale is alpha/r, or alpha/sqrt(r) with rsLoRA).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input (0 is the common default and the fastest).")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names that get LoRA, or all-linear (every linear layer but the output head)."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling alpha/sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    init: Literal["default", "gaussian", "pissa"] = Field(
        "default",
        description="LoRA initialisation. default: A random, B zero (the adapter starts as a no-op); gaussian: "
        "A Gaussian; pissa: A and B from the principal singular vectors of each weight, the base keeps the "
        "residual (the model starts unchanged; final/ is saved as an ordinary LoRA of rank 2r for the "
        "original base).",
    )
    pissa_niter: int | None = Field(
        16, ge=1, description="pissa: subspace iterations of the fast randomised SVD (null: exact SVD, slow on big models)."
    )
    lora_plus_ratio: float | None = Field(
        None, gt=0, description="LoRA+: learning rate of the B matrices is lr times this ratio (paper: 16)."
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full next to LoRA (for example embed_tokens, lm_head)."
    )
    trainable_layers: LayerChoice = Field(
        None,
        description="Decoder layers that get LoRA: a list of indices (negative counts from the end), an int N meaning "
        "the last N layers, or a Python slice such as '-8:' or ':4'. null: every layer.",
    )

    @model_validator(mode="after")
    def _pissa_without_dora(self) -> LoRASettings:
        if self.init == "pissa" and self.use_dora:
            raise ValueError("method.init pissa cannot be combined with use_dora; choose one")
        return self

    @property
    def needs_quantized_base(self) -> bool:
        """qlora trains on a quantized base."""
        return self.type == "qlora"

    @property
    def uses_pissa(self) -> bool:
        """``init: pissa``."""
        return self.init == "pissa"

    @property
    def lora_plus_lr_ratio(self) -> float | None:
        """``lora_plus_ratio``."""
        return self.lora_plus_ratio


def lora_config(method: LoRASettings, task_type: str = "CAUSAL_LM", model: PreTrainedModel | None = None) -> LoraConfig:
    """The PEFT LoRA config for a method section (``SEQ_CLS`` for a reward model: its head trains too).

    With ``method.trainable_layers`` only those decoder layers get LoRA; ``model`` is then needed
    to resolve them (and ``all-linear``, which PEFT does not combine with a layer choice).
    """
    target_modules = method.target_modules
    layers = None
    if method.trainable_layers is not None:
        if model is None:
            raise ValueError("lora_config: method.trainable_layers needs the model to resolve the layers")
        layers = layer_indices(method.trainable_layers, len(decoder_layers(model)))
        if target_modules == "all-linear":
            target_modules = linear_module_names(model)
    init: bool | str = {"default": True, "gaussian": "gaussian"}.get(method.init, "pissa")
    if method.init == "pissa" and method.pissa_niter is not None:
        init = f"pissa_niter_{method.pissa_niter}"
    return LoraConfig(
        r=method.rank,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=target_modules,
        layers_to_transform=layers,
        use_rslora=method.use_rslora,
        use_dora=method.use_dora,
        init_lora_weights=init,
        modules_to_save=method.modules_to_save or None,  # SEQ_CLS: PEFT adds the score head itself
        task_type=task_type,
    )


def apply_lora(model: PreTrainedModel, method: LoRASettings, task_type: str) -> PeftModel:
    """LoRA adapters (a quantized base is first prepared for k-bit training)."""
    if is_quantized(model):
        model = prepare_kbit_model(model)
    try:
        return get_peft_model(model, lora_config(method, task_type, model))
    except ValueError as exc:
        raise TunelabError(f"method (LoRA, target_modules {method.target_modules}): {exc}") from None


def save_initial_adapter(model: PeftModel, directory: Path) -> None:
    """Save a PiSSA adapter as initialised, before any training step.

    PiSSA moves the principal part of each weight into the adapter. With this initial state,
    :func:`save_pissa_as_lora` can later express the trained adapter as an ordinary LoRA for the
    original, unmodified base. The saved config says ``init_lora_weights: true`` (as PEFT requires
    for the conversion); the model's own config keeps ``pissa``.
    """
    config = model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True
    try:
        model.save_pretrained(str(directory), safe_serialization=True)
    finally:
        config.init_lora_weights = init


def save_pissa_as_lora(model: PeftModel, directory: Path, initial_dir: Path) -> None:
    """Save a trained PiSSA adapter as an ordinary LoRA (rank 2r) for the original base.

    ``W_res + A B = W + (A B - A0 B0)``, so ``[A | A0]`` and ``[B | -B0]`` form a LoRA of the
    unmodified weights (PEFT's ``path_initial_model_for_weight_conversion``). It loads with plain
    PEFT on the base model and merges like any LoRA.
    """
    model.save_pretrained(str(directory), safe_serialization=True,
                          path_initial_model_for_weight_conversion=str(initial_dir))


register(MethodSpec(names=("lora", "qlora"), summary="LoRA adapters (qlora: on a 4-bit base); DoRA, rsLoRA, PiSSA, "
                    "LoRA+ as settings", settings=LoRASettings, apply=apply_lora, position=2))
