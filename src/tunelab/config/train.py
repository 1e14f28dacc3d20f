"""The ``train`` section: the loop's own settings (objective, optimisation, precision, speed, cadence)."""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal

from pydantic import Field, field_validator

from tunelab.config.base import Section
from tunelab.config.objectives import objective_specs


class TrainConfig(Section):
    """The training loop: objective, optimisation, precision, speed, evaluation, checkpoints, logging.

    The objective's own settings (beta, num_generations, ...) are not here: they are the top-level
    section named after ``train.objective`` (see :class:`~tunelab.config.base.ObjectiveSettings`).
    """

    objective: str = Field(
        "sft",
        description="What the run optimises: one of the registered objectives (each file in "
        "src/tunelab/train/objectives/ declares one, with its data, reference and settings). sft: chat "
        "fine-tuning; pretrain: continued pretraining on text; reward: a reward model on preference pairs; the "
        "preference, feedback and online RL objectives are listed in docs/alignment.md. Its settings are the "
        "top-level section of the same name (e.g. dpo: {beta: 0.1}).",
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run; overrides epochs.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch when packing is off.")
    batch_tokens: int = Field(
        4096, ge=16, description="Token budget per micro-batch when packing (a row holds at most this many tokens)."
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0, description="Fraction of steps with linear warmup.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate decay after warmup.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Final learning rate as a fraction of lr.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (never on biases, norms or embeddings' norms).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(1.0, description="Clip the global gradient norm to this (null: no clipping).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast precision. auto: bf16 where the device runs it fast and correctly, else fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    checkpoint_layers: float = Field(
        1.0, gt=0.0, le=1.0,
        description="With gradient_checkpointing: the share of decoder layers whose activations are recomputed, "
        "spread evenly (selective checkpointing; e.g. 0.5 keeps every other layer's activations: more memory, "
        "less recomputation).",
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch.compile each decoder layer (attention stays eager). auto: on CUDA with triton installed; "
        "on: also on a CPU (needs a C++ compiler; the first steps pay the compile time); off: never.",
    )
    chunked_loss: Literal["auto", "on", "off"] = Field(
        "auto",
        description="sft/pretrain/dpo/simpo/orpo/kto: the output layer and the token log-probs over "
        "loss_chunk_tokens positions at a time, so the full logits never exist (same loss and gradients; on a "
        "CPU with a 32k vocabulary an SFT step took 0.34x the memory and 0.69x the time). auto and on: wherever it can run; it is switched off, with a log line, "
        "for models whose logits are not their output layer's (checked at start-up), prompt learning and "
        "sharded strategies.",
    )
    loss_chunk_tokens: int = Field(4096, ge=16, description="Trained positions per chunk of the chunked loss.")

    neftune_alpha: float | None = Field(
        None,
        gt=0,
        description="NEFTune: add uniform noise of scale alpha/sqrt(L*d) to the input embeddings while training "
        "(L: each sequence's own length, also inside packed rows; d: hidden size). Paper: 5. Off in evaluation. "
        "null: off.",
    )
    seed: int = Field(42, description="Seed for data order, initialisation and dropout.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N optimizer steps (0: only at the end).")
    eval_at_start: bool = Field(False, description="Also evaluate before the first step (a baseline to compare with).")
    save_every: int = Field(0, ge=0, description="Checkpoint every N optimizer steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="How many step checkpoints to keep.")
    log_every: int = Field(10, ge=1, description="Write a metrics row every N optimizer steps.")
    tensorboard: bool = Field(False, description="Also write TensorBoard event files to output_dir/tensorboard.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")

    @field_validator("objective")
    @classmethod
    def _registered_objective(cls, name: str) -> str:
        names = objective_specs()  # the registry, imported on first use
        if name not in names:
            close = difflib.get_close_matches(name, list(names), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown objective (registered: {', '.join(names)}){hint}")
        return name

    @field_validator("adam_betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError("each AdamW beta must be in [0, 1), e.g. [0.9, 0.999]")
        return betas

    @field_validator("device")
    @classmethod
    def _device_name(cls, name: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?|xpu(:\d+)?", name):
            raise ValueError("expected auto, cpu, cuda or cuda:N (N a GPU index), mps or xpu")
        return name

    @field_validator("chunked_loss", "compile", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare on/off as true/false.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("max_grad_norm")
    @classmethod
    def _positive_clip(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ValueError("train.max_grad_norm must be positive, or null for no clipping")
        return value
