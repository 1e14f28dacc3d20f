"""The run configuration: schema, YAML loading, command-line overrides and readable errors.

A config is one YAML file with the sections ``model``, ``method``, ``data``, ``train``, ``eval``,
``track`` and the key ``output_dir``. ``section.key=value`` overrides given after the file win over it.
Every mistake becomes a :class:`~tunelab.errors.ConfigError` whose message names the file, the
line and the key, and for an unknown key suggests the closest valid one.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.errors import ConfigError, read_user_text


def objective_specs() -> dict[str, Any]:
    """The registered objectives (imported on first use: every file of tunelab.train.objectives declares one)."""
    from tunelab.train.objectives.registry import objective_specs as registered

    return registered()


def objective_spec(name: str) -> Any:
    """The registered objective ``name`` (see :func:`objective_specs`)."""
    return objective_specs()[name]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(_Section):
    """A tiny random model to build at model.path when nothing is there (tests, quickstart, CI)."""

    arch: Literal["llama", "mistral", "qwen2", "qwen3", "gemma3"] = Field("llama", description="Model family.")
    hidden: int = Field(64, ge=8, description="Hidden size.")
    layers: int = Field(2, ge=1, description="Decoder layers.")
    heads: int = Field(4, ge=1, description="Attention heads.")
    vocab: int = Field(1024, ge=300, description="Tokenizer vocabulary size to train.")
    tokenizer_corpus: str | None = Field(None, description="Text/JSON(L) file to train the tokenizer on (default: shipped corpus).")
    seed: int = Field(0, description="Initialisation seed.")


class ModelConfig(_Section):
    """Which model to start from and how to load it."""

    path: str = Field(description="Hugging Face model directory, or a hub id (needs network).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype of the loaded weights. auto: float32 for trained weights; bfloat16 "
        "for the frozen base of an adapter method (lora, qlora, prefix, prompt) on a GPU that supports it.",
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model. Off unless you trust the source."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "packed_sdpa", "packed_varlen"] = Field(
        "auto",
        description="Attention kernel. packed_sdpa: packed rows without cross-sequence attention or a quadratic "
        "mask, SDPA once per sequence. packed_varlen: the same, but one variable-length flash attention call "
        "per layer for the whole row where it can run (CUDA, bf16/fp16, PyTorch >= 2.10), packed_sdpa elsewhere. "
        "auto: packed_varlen when packing, sdpa otherwise.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a hub id.")
    tiny: TinyModelConfig | None = Field(
        None, description="Build a tiny random model at model.path first when that directory does not exist."
    )
    quantization: Literal["auto", "none", "4bit", "8bit"] = Field(
        "auto",
        description="Load the frozen base quantized with bitsandbytes (pip install 'tunelab[qlora]'). "
        "auto: 4bit for method qlora, none otherwise. Only adapter methods (qlora, lora, prefix, prompt) "
        "can train on a quantized base.",
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4bit: the 4-bit data type (NF4 is QLoRA's).")
    quant_double: bool = Field(
        True, description="4bit: double quantization (quantize the quantization constants too; ~0.4 bit/parameter less)."
    )
    quant_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="4bit: dtype the dequantized matmuls run in. auto: bfloat16 where the device runs it fast, else float32.",
    )


class MethodConfig(_Section):
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


class DataConfig(_Section):
    """Where the data is, how it is read, rendered, masked and batched."""

    train: list[str] = Field(description="Training data file(s): JSON, JSONL, CSV, Parquet or TXT, or a hub dataset id.")
    eval: list[str] | None = Field(None, description="Held-out data file(s). Without it, val_ratio splits train.")
    format: Literal["auto", "alpaca", "sharegpt", "messages", "qa", "text"] = Field(
        "auto", description="Record format; auto detects it from the first record."
    )
    val_ratio: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of train held out for evaluation when data.eval is not set."
    )
    max_length: int = Field(1024, ge=8, description="Longest sequence in tokens.")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with a sequence longer than max_length. It is always counted and reported."
    )
    packing: bool = Field(True, description="Padding-free packing of several sequences per row.")
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="fail: stop at the first bad record; skip: drop bad records and report how many and why."
    )
    train_on: Literal["assistant", "all", "last_assistant"] = Field(
        "assistant", description="Which tokens carry a loss: assistant turns, all tokens, or the last assistant turn."
    )
    template: Literal["auto", "tokenizer", "chatml", "gemma", "llama3", "alpaca", "plain"] = Field(
        "auto",
        description="Chat template: auto and tokenizer use the tokenizer's own; a tokenizer without one (a base "
        "model) needs a named built-in here, or train.objective: pretrain for plain text.",
    )
    system_prompt: str | None = Field(None, description="System message added to conversations that have none.")
    num_proc: int = Field(1, ge=1, description="Processes for tokenization (datasets map).")
    cache_dir: str | None = Field(
        None, description="Where tokenized data is cached by fingerprint (default ~/.cache/tunelab/data)."
    )
    max_samples: int | None = Field(None, ge=1, description="Use only the first N training records.")
    text_field: str = Field("text", description="Field that holds the text for format: text in JSON/CSV/Parquet.")

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class TrainConfig(_Section):
    """The training loop: objective, optimisation, precision, evaluation, checkpoints, logging."""

    objective: str = Field(
        "sft",
        description="What the run optimises: one of the registered objectives (each file in "
        "src/tunelab/train/objectives/ declares one, with its data, reference and settings). sft: chat "
        "fine-tuning; pretrain: continued pretraining on text; reward: a reward model on preference pairs; the "
        "preference, feedback and online RL objectives are listed in docs/alignment.md.",
    )
    beta: float | None = Field(
        None, gt=0,
        description="Strength of the preference objective. dpo/kto: inverse temperature of the implicit reward "
        "(default 0.1); simpo: reward scale (default 2.0); orpo: weight of the odds-ratio term (default 0.1).",
    )
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="dpo: sigmoid (DPO), ipo (IPO, length-normalised) or hinge (SLiC)."
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="dpo/simpo sigmoid loss: probability that a preference label is flipped (cDPO)."
    )
    rpo_alpha: float = Field(
        0.0, ge=0.0,
        description="dpo: weight of a negative log-likelihood term on the chosen answer (RPO, Pang et al. 2024; "
        "TRL's rpo_alpha; 1.0 in the paper). DPO can widen the margin by lowering the chosen answer's likelihood "
        "too, which costs accuracy where there is one right answer (math). 0: plain DPO.",
    )
    gamma: float = Field(0.5, ge=0.0, description="simpo: target reward margin.")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the loss on desirable records.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the loss on undesirable records.")
    reward_fn: list[str] = Field(
        default_factory=list,
        description="online RL: reward functions, built-in (exact_match, gsm8k, format, length) or "
        "module:function / path/file.py:function; several are summed with reward_weights.",
    )
    reward_weights: list[float] | None = Field(None, description="online RL: one weight per reward_fn (default 1 each).")
    reward_model: str | None = Field(
        None, description="online RL: a reward model directory (tunelab train.objective: reward output) scoring answers."
    )
    num_generations: int = Field(4, ge=1, description="online RL: answers sampled per prompt (the group size of the group-relative objectives, at least 2 there).")
    prompts_per_step: int = Field(8, ge=1, description="online RL: prompts per rollout phase (one RL step).")
    max_new_tokens: int = Field(64, ge=1, description="online RL: longest sampled answer.")
    temperature: float = Field(1.0, ge=0.0, description="online RL: sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="online RL: nucleus sampling mass.")
    generation_batch_size: int = Field(
        32, ge=1, description="online RL: sequences per generate call, and rows per micro-batch of the update.")
    rollout_generator: Literal["batched", "one_by_one", "vllm"] = Field(
        "batched",
        description="online RL: what samples the rollouts. batched: the policy in memory, generation_batch_size "
        "sequences per generate call; one_by_one: one sequence per call (slow; for comparison); vllm: a vLLM "
        "engine in the training process on the same GPU (pip install vllm; CUDA), synced with the policy after "
        "every update.",
    )
    vllm_gpu_memory_utilization: float = Field(
        0.3, gt=0.0, lt=1.0,
        description="rollout_generator vllm: the share of the GPU's memory vLLM may take (its weights and KV "
        "cache); the rest is the training's.",
    )
    kl_coef: float = Field(
        0.04, ge=0.0, description="online RL: weight of the KL penalty to the reference model (ppo: its start value)."
    )
    kl_target: float | None = Field(None, gt=0, description="ppo: adapt kl_coef towards this KL per sequence (null: fixed).")
    clip_range: float = Field(0.2, gt=0, description="online RL: clip range of the policy ratio.")
    clip_range_high: float | None = Field(None, gt=0, description="grpo: upper clip range (DAPO clip-higher; null: clip_range).")
    update_epochs: int = Field(1, ge=1, description="online RL: optimisation passes over each rollout batch.")
    minibatches: int = Field(1, ge=1, description="online RL: optimizer steps per pass (the rollout batch is split).")
    discount: float = Field(1.0, gt=0, le=1.0, description="ppo: discount gamma of GAE.")
    gae_lambda: float = Field(0.95, ge=0, le=1.0, description="ppo: lambda of GAE.")
    value_coef: float = Field(0.1, ge=0, description="ppo: weight of the value loss.")
    value_clip_range: float = Field(0.2, gt=0, description="ppo: clip range of the value update.")
    entropy_coef: float = Field(0.0, ge=0, description="online RL: entropy bonus weight.")
    whiten_advantages: bool = Field(True, description="ppo: normalise advantages over the batch.")
    precompute_reference: bool = Field(
        False,
        description="dpo/kto: compute the reference log-probs once before training and cache them on disk "
        "(no reference forward per step; a full fine-tune then needs no second model in memory).",
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

    @field_validator("objective")
    @classmethod
    def _registered_objective(cls, name: str) -> str:
        names = objective_specs()
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


class EvalConfig(_Section):
    """Generation-based evaluation on held-out records during and after training."""

    generate_samples: int = Field(
        0, ge=0, description="Held-out conversations to answer greedily at each evaluation (0: off)."
    )
    max_new_tokens: int = Field(64, ge=1, description="Longest generated answer.")
    answer_pattern: str = Field(
        r"(?im)^\s*answer\s*:\s*(.+?)\s*$",
        description="Regex whose first group is the final answer, for exact_match; the whole text when it does not match. Checked (it must compile and have a group) before anything loads.",
    )
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch.")
    metrics: list[str] = Field(
        default_factory=lambda: ["exact_match"],
        description="Generation metrics logged at each evaluation as eval_<name> (see tunelab eval --metrics).",
    )

    @field_validator("answer_pattern")
    @classmethod
    def _answer_regex(cls, pattern: str) -> str:
        from tunelab.data.answers import check_answer_pattern

        return check_answer_pattern(pattern)

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, names: list[str]) -> list[str]:
        from tunelab.eval.metrics import METRICS

        unknown = [name for name in names if name not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
        return names


class TrackConfig(_Section):
    """Run tracking: the run registry (lineage, tunelab runs) and an optional MLflow server."""

    registry: str | None = Field(
        None,
        description="Run registry file (SQLite). Default: $TUNELAB_REGISTRY, else $TUNELAB_HOME/runs.db "
        "(~/.tunelab/runs.db). Merge, export, eval and serve use $TUNELAB_REGISTRY or the default, so set "
        "that variable instead when their runs should land in the same registry.",
    )
    mlflow_uri: str | None = Field(
        None,
        description="Also log each run (config as params, metrics, lineage tags, run.json) to this MLflow "
        "tracking URI (pip install 'tunelab[track]'). Default: $TUNELAB_MLFLOW_URI.",
    )
    mlflow_experiment: str = Field("tunelab", description="MLflow experiment name.")

    @field_validator("mlflow_uri")
    @classmethod
    def _mlflow_installed(cls, uri: str | None) -> str | None:
        import importlib.util

        # Checked here so that a long training run does not fail only at its end.
        if uri and importlib.util.find_spec("mlflow") is None:
            raise ValueError("mlflow is not installed: pip install 'tunelab[track]' (or pip install mlflow), "
                             "or remove track.mlflow_uri")
        return uri


class FSDPConfig(_Section):
    """distributed.strategy fsdp: PyTorch FSDP2 (``fully_shard`` on every decoder layer, then the whole model)."""

    cpu_offload: bool = Field(
        False,
        description="Keep the sharded parameters, gradients and optimizer state in CPU memory and run the "
        "optimizer there (CPUOffloadPolicy): fits bigger models on the GPUs, slower.",
    )
    mixed_precision: Literal["none", "bf16", "fp16"] = Field(
        "none",
        description="Dtype the gathered parameters are computed in (MixedPrecisionPolicy param_dtype; gradients "
        "are reduced in float32, the optimizer keeps the loaded dtype). Halves all-gather traffic against "
        "float32 weights. none: as loaded; train.precision's autocast applies either way.",
    )
    reshard_after_forward: bool = Field(
        True,
        description="Free each layer's gathered parameters after its forward and gather them again for backward "
        "(least memory, like ZeRO-3); false keeps them until backward (less communication, like ZeRO-2).",
    )


class DeepSpeedConfig(_Section):
    """distributed.strategy deepspeed: DeepSpeed ZeRO (pip install --no-build-isolation 'tunelab[deepspeed]')."""

    zero_stage: Literal[1, 2, 3] = Field(
        2, description="ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."
    )
    offload_optimizer: bool = Field(
        False, description="ZeRO-Offload: optimizer state and step in CPU memory (stage 1-3)."
    )
    offload_params: bool = Field(False, description="ZeRO-Infinity: parameters in CPU memory between uses (stage 3).")
    config_file: str | None = Field(
        None,
        description="A DeepSpeed JSON config merged over the one tunelab builds (e.g. communication, "
        "bf16/fp16, offload details). Batch size, accumulation, clipping, optimizer and scheduler always come "
        "from train.*; the file must not set them differently.",
    )


class DistributedConfig(_Section):
    """Training with several processes (GPUs, nodes), launched by ``tunelab train --nproc N`` or torchrun."""

    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = Field(
        "none",
        description="none: one process. ddp: every process holds the whole model, gradients are all-reduced. "
        "fsdp: FSDP2, parameters, gradients and optimizer state sharded across processes. deepspeed: ZeRO "
        "stage 1/2/3. The global batch is train.grad_accum micro-batches per process times the number of "
        "processes. See docs/distributed.md.",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend. auto: nccl on CUDA, gloo on CPU."
    )
    timeout_minutes: float = Field(
        30.0, gt=0, description="How long a collective waits for the other processes before the run fails."
    )
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig, description="Options of strategy fsdp.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="Options of strategy deepspeed.")

    @model_validator(mode="after")
    def _options_of_the_strategy(self) -> DistributedConfig:
        for section in ("fsdp", "deepspeed"):
            # Set to other than its defaults (the resolved config.yaml of a run holds both at their defaults).
            options = getattr(self, section)
            if section in self.model_fields_set and self.strategy != section and options != type(options)():
                raise ValueError(f"{section} options apply to strategy {section} only (strategy is {self.strategy})")
        if self.deepspeed.offload_params and self.deepspeed.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs zero_stage 3 (only stage 3 shards parameters)")
        if self.deepspeed.config_file is not None:
            import json

            path = Path(self.deepspeed.config_file).expanduser()
            try:
                user = json.loads(read_user_text(path, "DeepSpeed config file", ConfigError))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            owned = sorted({"optimizer", "scheduler"} & set(user))
            if owned:
                raise ValueError(f"{path}: remove {', '.join(owned)}; tunelab builds the optimizer and "
                                 "schedule from train.lr, train.schedule, train.weight_decay ...")
        return self


class TunelabConfig(_Section):
    """A whole run."""

    model: ModelConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    track: TrackConfig = Field(default_factory=TrackConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    output_dir: str = Field(description="Where config.yaml, metrics.jsonl, checkpoints/ and final/ are written.")

    @model_validator(mode="after")
    def _check_distributed(self) -> TunelabConfig:
        # Combinations that would fail deep inside the engines, or train something else than asked.
        strategy = self.distributed.strategy
        if strategy == "none":
            return self
        if strategy == "deepspeed" and objective_spec(self.train.objective).online:
            raise ValueError(f"train.objective {self.train.objective} (online RL) runs with distributed.strategy "
                             "none, ddp or fsdp")
        if self.train.rollout_generator == "vllm" and strategy == "fsdp":
            raise ValueError("train.rollout_generator vllm loads the whole policy into each process's engine; use "
                             "distributed.strategy ddp or none with it (or rollout_generator batched with fsdp)")
        sharded = strategy == "fsdp" or (strategy == "deepspeed" and self.distributed.deepspeed.zero_stage == 3)
        if strategy in ("fsdp", "deepspeed") and self.train.precision == "fp16":
            raise ValueError(f"train.precision fp16 with distributed.strategy {strategy}: use bf16 (fp16 needs a "
                             "loss scaler synchronised across shards)")
        quantized = self.model.quantization not in ("none", "auto") or self.method.type == "qlora"
        if strategy in ("fsdp", "deepspeed") and quantized:
            raise ValueError(f"a quantized base (method qlora, model.quantization) cannot be sharded by "
                             f"distributed.strategy {strategy}; use strategy ddp (each process holds the "
                             "small 4-bit base)")
        if strategy == "deepspeed" and self.distributed.deepspeed.zero_stage == 3 and self.method.uses_virtual_tokens:
            raise ValueError(f"method.type {self.method.type} with DeepSpeed ZeRO-3: PEFT computes the saved virtual "
                             "tokens in one process, which ZeRO-3's partitioned encoder cannot do; use strategy "
                             "fsdp, ddp, or deepspeed zero_stage 1 or 2")
        if sharded and self.method.init == "pissa":
            raise ValueError("method.init pissa converts the trained adapter with the whole weights in one "
                             "process; use distributed.strategy ddp or deepspeed with zero_stage 1 or 2")
        return self

    @model_validator(mode="after")
    def _check_combinations(self) -> TunelabConfig:
        spec = objective_spec(self.train.objective)
        if spec.data == "text" and self.data.train_on != "all":
            # Continued pretraining trains every token by definition.
            self.data.train_on = "all"
        train = self.train
        if self.method.init == "pissa" and spec.uses_reference(train) and not (
                train.precompute_reference and spec.reference == "always"):
            # PiSSA moves the principal components into the adapter: adapters off is not the base.
            raise ValueError(f"method.init pissa with train.objective {train.objective}: switching the adapters off "
                             "does not give the base model back, so it cannot be the reference; use "
                             "train.precompute_reference: true (dpo/kto) or the default LoRA init")
        if spec.check is not None and (problem := spec.check(self)) is not None:
            raise ValueError(problem)
        if spec.online and train.grad_accum != 1:
            raise ValueError(f"train.grad_accum does not apply to train.objective {train.objective} (online RL): an "
                             "optimizer step takes one minibatch of the step's rollouts (train.minibatches), run "
                             "generation_batch_size rows at a time")
        per_row = spec.rows_per_example  # rollouts are batched by generation_batch_size, not by tokens
        if self.data.packing and self.train.batch_tokens < per_row * self.data.max_length:
            what = "twice data.max_length" if per_row == 2 else "data.max_length"
            raise ValueError(
                f"train.batch_tokens ({self.train.batch_tokens}) must be at least {what} "
                f"({per_row * self.data.max_length}) when packing, so that every "
                f"{'pair' if per_row == 2 else 'sequence'} fits in a row"
            )
        if self.train.max_grad_norm is not None and self.train.max_grad_norm <= 0:
            raise ValueError("train.max_grad_norm must be positive, or null for no clipping")
        if self.model.quantization == "auto":
            self.model.quantization = "4bit" if self.method.type == "qlora" else "none"
        if self.method.type == "qlora" and self.model.quantization == "none":
            raise ValueError("method.type qlora needs a quantized base: model.quantization 4bit or 8bit (or use lora)")
        if self.model.quantization != "none" and self.method.init == "pissa":
            raise ValueError(
                "method.init pissa with a quantized base would quantize the residual weights, and the saved "
                "adapter would not fit the full-precision base; use pissa with method.type lora, or qlora with "
                "init default"
            )
        if self.model.quantization != "none" and self.method.type in ("full", "freeze"):
            raise ValueError(
                f"model.quantization {self.model.quantization}: quantized weights cannot be trained by method "
                f"{self.method.type}; use qlora, lora, prefix or prompt, or model.quantization none"
            )
        if not spec.token_level:
            token_level = " or ".join(name for name, other in objective_specs().items() if other.token_level)
            if self.method.uses_virtual_tokens:
                raise ValueError(f"method.type {self.method.type} trains with train.objective {token_level} only")
            if self.train.neftune_alpha is not None:
                raise ValueError(f"train.neftune_alpha (NEFTune) applies to train.objective {token_level} only")
        for name, other in objective_specs().items():
            for key, what in other.own_settings.items():
                if name != self.train.objective and key in self.train.model_fields_set and \
                        getattr(self.train, key) != TrainConfig.model_fields[key].default:
                    raise ValueError(f"train.{key} ({what}) applies to train.objective {name} only")
        return self


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages


class _LineLoader(yaml.SafeLoader):
    """A YAML loader that remembers the line of every mapping key, by dotted path."""


def _compose_lines(node: yaml.Node, prefix: str, lines: dict[str, int], source: Path) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            line = key_node.start_mark.line + 1
            if path in lines:  # YAML keeps the last of two equal keys: the first would be dropped silently
                raise ConfigError(f"{source}:{line}: duplicate key '{path}' (first at line {lines[path]}); "
                                  "merge the two into one")
            lines[path] = line
            _compose_lines(value_node, path, lines, source)


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    text = read_user_text(path, "config file", ConfigError)
    loader = _LineLoader(text)
    try:
        node = loader.get_single_node()  # parsed once: the node gives key lines, then the data
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and context_mark:
            problem += f" ({context} started at line {context_mark.line + 1})"
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections (model:, data:, train: ...)")
    lines: dict[str, int] = {}
    if node is not None:
        _compose_lines(node, "", lines, path)
    return data, lines


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into its key path and a YAML-typed value.

    Raises:
        ConfigError: when the text has no ``=`` or an empty key.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _apply_override(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def all_keys(model: type[BaseModel] = TunelabConfig, prefix: str = "") -> list[str]:
    """Every valid dotted key of the schema, e.g. ``train.lr``."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(all_keys(annotation, f"{path}."))
    return keys


# Names other tools use for our keys, so that "did you mean" finds them.
ALIASES = {
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "micro_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "lr_scheduler_type": "train.schedule",
    "lr_scheduler": "train.schedule",
    "warmup": "train.warmup_ratio",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "lora_rank": "method.rank",
    "lora_r": "method.rank",
    "lora_alpha": "method.alpha",
    "lora_dropout": "method.dropout",
    "lora_target_modules": "method.target_modules",
    "finetuning_type": "method.type",
    "model_name_or_path": "model.path",
    "base_model": "model.path",
    "dataset": "data.train",
    "sequence_len": "data.max_length",
    "cutoff_len": "data.max_length",
    "max_seq_length": "data.max_length",
    "sample_packing": "data.packing",
    "output": "output_dir",
}


def suggest_key(wrong: str) -> str | None:
    """The valid key closest to a wrong dotted key, or None when nothing is close."""
    valid = all_keys()
    section, _, leaf = wrong.rpartition(".")
    alias = difflib.get_close_matches(leaf, list(ALIASES), n=1, cutoff=0.8)
    if alias:
        return ALIASES[alias[0]]
    candidates = [k for k in valid if k.rpartition(".")[0] == section] if section else []
    for pool in (candidates, valid):
        match = difflib.get_close_matches(wrong, pool, n=1, cutoff=0.6)
        if match:
            return match[0]
    # A right leaf in the wrong section ("lr" at the top level -> "train.lr").
    by_leaf = [k for k in valid if k.rpartition(".")[2] == leaf]
    if by_leaf:
        return by_leaf[0]
    leaves = {k.rpartition(".")[2]: k for k in valid}
    match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.7)
    return leaves[match[0]] if match else None


def _key_of(loc: tuple, keep_unknown: bool) -> str:
    """The dotted config key of a pydantic error location (dropping union-branch and index parts)."""
    model: type[BaseModel] | None = TunelabConfig
    parts: list[str] = []
    for part in loc:
        if model is not None and part in model.model_fields:
            parts.append(str(part))
            annotation = model.model_fields[part].annotation
            nested = [a for a in (annotation, *typing.get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
            model = nested[0] if nested else None
        elif keep_unknown and isinstance(part, str):
            parts.append(part)
            break
        elif model is not None and model is not TunelabConfig:
            break
    return ".".join(parts)


def _format_errors(exc: ValidationError, source: str, lines: dict[str, int], overridden: set[str]) -> str:
    messages: dict[str, str] = {}  # one message per key (a union type reports each branch)
    for error in exc.errors():
        key = _key_of(error["loc"], keep_unknown=error["type"] == "extra_forbidden")
        from_command_line = key in overridden or any(o.startswith(f"{key}.") for o in overridden)
        where = "command line" if from_command_line else f"{source}:{lines[key]}" if key in lines else source
        kind = error["type"]
        if kind == "extra_forbidden":
            hint = suggest_key(key)
            text = f"unknown key '{key}'" + (f"; did you mean '{hint}'?" if hint else "")
        elif kind == "missing":
            text = f"missing required key '{key}'"
        elif not key:
            text = error["msg"].removeprefix("Value error, ")
        else:
            value = error.get("input")
            message = error["msg"].removeprefix("Value error, ")
            # A whole section's check (e.g. options that do not fit method.type) has a mapping as input.
            text = f"{key}: {message}" if isinstance(value, dict) else f"'{key}' = {value!r}: {message}"
        messages.setdefault(key, f"{where}: {text}")
    return "\n".join(messages.values())


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TunelabConfig:
    """Load a YAML config, apply ``section.key=value`` overrides and validate it.

    Args:
        path: the YAML file.
        overrides: ``section.key=value`` strings applied after the file, in order.

    Returns:
        The validated config. Relative data/model paths are resolved against the current directory.

    Raises:
        ConfigError: with one line per problem, naming the file and line (or "command line").
    """
    path = Path(path)
    data, lines = _read_yaml(path)
    overridden: set[str] = set()
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, keys, value)
        overridden.add(".".join(keys))
    return config_from_dict(data, source=str(path), lines=lines, overridden=overridden)


def config_from_dict(
    data: dict[str, Any],
    source: str = "config",
    lines: dict[str, int] | None = None,
    overridden: set[str] | None = None,
) -> TunelabConfig:
    """Validate a config given as a nested dict (as read from YAML).

    Raises:
        ConfigError: one readable line per problem.
    """
    try:
        return TunelabConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source, lines or {}, overridden or set())) from None


def dump_config(config: TunelabConfig) -> str:
    """The resolved config as YAML, as saved next to every output."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
