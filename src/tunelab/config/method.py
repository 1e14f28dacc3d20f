"""The ``method`` section: which parameters train (full, freeze, LoRA/QLoRA, prefix or prompt tuning)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tunelab.config.base import Section


class MethodConfig(Section):
    """Which parameters train: all (full), chosen layers (freeze), LoRA/QLoRA adapters, or virtual tokens
    (prefix and prompt tuning)."""

    type: Literal["full", "freeze", "lora", "qlora", "prefix", "prompt"] = Field(
        "lora",
        description="Fine-tuning method. qlora: LoRA on a base loaded in 4-bit NF4 (see model.quantization); "
        "prefix: trained key/value vectors prepended in every layer; prompt: trained input embeddings prepended "
        "to every sequence. See docs/methods.md.",
    )
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
    trainable_layers: list[int] | int | str | None = Field(
        None,
        description="Decoder layers that train (freeze) or get LoRA (lora, qlora): a list of indices (negative "
        "counts from the end), an int N meaning the last N layers, or a Python slice such as '-8:' or ':4'. "
        "null: the last 2 layers for freeze, every layer for LoRA.",
    )
    trainable_modules: list[str] = Field(
        default_factory=list,
        description="freeze: within the trainable layers, train only parameters whose name contains one of "
        "these strings (empty: the whole layer), e.g. [mlp].",
    )
    train_embeddings: bool | None = Field(
        None,
        description="full, freeze: whether the input embeddings and output head train. null: yes for full, "
        "no for freeze.",
    )
    num_virtual_tokens: int = Field(20, ge=1, description="prefix, prompt: number of virtual tokens.")
    prefix_projection: bool = Field(
        False,
        description="prefix: produce the prefix through a trained 2-layer MLP (more parameters, often more "
        "stable); the saved adapter holds the projected prefix.",
    )
    prompt_init: Literal["vocab", "random", "text"] = Field(
        "vocab",
        description="prompt: initial virtual tokens. vocab: embeddings of random vocabulary tokens (the model's "
        "own scale); random: N(0, 1) vectors; text: the embeddings of prompt_init_text.",
    )
    prompt_init_text: str | None = Field(
        None,
        description="prompt_init text: the text whose token embeddings start the virtual tokens (repeated or cut "
        "to num_virtual_tokens), e.g. a task instruction.",
    )

    @property
    def uses_lora(self) -> bool:
        """Whether the method trains LoRA adapters (lora or qlora)."""
        return self.type in ("lora", "qlora")

    @property
    def uses_virtual_tokens(self) -> bool:
        """Whether the method prepends trained virtual tokens (prefix or prompt tuning)."""
        return self.type in ("prefix", "prompt")

    @field_validator("trainable_layers")
    @classmethod
    def _layer_slice(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = value.split(":")
            if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts if p.strip()):
                raise ValueError(f"{value!r} is not a layer slice; use start:stop such as '-8:', ':4' or '2:6'")
        return value

    @model_validator(mode="after")
    def _options_of_the_method(self) -> MethodConfig:
        # Options that would silently do nothing for the chosen method are errors.
        wrong: list[str] = []
        if self.trainable_modules and self.type != "freeze":
            wrong.append("trainable_modules (freeze only)")
        if self.train_embeddings is not None and self.type not in ("full", "freeze"):
            wrong.append("train_embeddings (full, freeze; use modules_to_save with LoRA)")
        if self.trainable_layers is not None and self.type not in ("freeze", "lora", "qlora"):
            wrong.append("trainable_layers (freeze, lora, qlora)")
        if not self.uses_lora and (self.init != "default" or self.lora_plus_ratio is not None or self.use_dora
                                   or self.use_rslora):
            wrong.append("init, lora_plus_ratio, use_dora, use_rslora (lora, qlora)")
        if self.prefix_projection and self.type != "prefix":
            wrong.append("prefix_projection (prefix only)")
        if (self.prompt_init != "vocab" or self.prompt_init_text is not None) and self.type != "prompt":
            wrong.append("prompt_init, prompt_init_text (prompt only)")
        if wrong:
            raise ValueError(f"method.type {self.type} does not use: {'; '.join(wrong)}")
        if (self.prompt_init == "text") != bool(self.prompt_init_text and self.prompt_init_text.strip()):
            raise ValueError("method.prompt_init text and method.prompt_init_text go together: set both, or neither")
        if self.init == "pissa" and self.use_dora:
            raise ValueError("method.init pissa cannot be combined with use_dora; choose one")
        return self
