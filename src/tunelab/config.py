"""The run configuration: schema, YAML loading, command-line overrides and readable errors.

A config is one YAML file with the sections ``model``, ``method``, ``data``, ``train``, ``eval``
and the key ``output_dir``. ``section.key=value`` overrides given after the file win over it.
Every mistake becomes a :class:`~tunelab.errors.ConfigError` whose message names the file, the
line and the key, and for an unknown key suggests the closest valid one.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.errors import ConfigError, read_user_text


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(_Section):
    """A tiny random model to build at model.path when nothing is there (tests, quickstart, CI)."""

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
        "for a frozen LoRA base on a GPU that supports it.",
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model. Off unless you trust the source."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "packed_sdpa"] = Field(
        "auto",
        description="Attention kernel. auto: packed_sdpa (per-sequence SDPA, no cross-sequence "
        "attention and no quadratic mask) when packing, sdpa otherwise.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a hub id.")
    tiny: TinyModelConfig | None = Field(
        None, description="Build a tiny random model at model.path first when that directory does not exist."
    )


class MethodConfig(_Section):
    """Which parameters train: all (full), chosen layers (freeze), or LoRA adapters."""

    type: Literal["full", "freeze", "lora"] = Field("lora", description="Fine-tuning method.")
    rank: int = Field(16, ge=1, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scale is alpha/r, or alpha/sqrt(r) with rsLoRA).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input (0 is the common default and the fastest).")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names that get LoRA, or all-linear (every linear layer but the output head)."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling alpha/sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    lora_plus_ratio: float | None = Field(
        None, gt=0, description="LoRA+: learning rate of the B matrices is lr times this ratio (paper: 16)."
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full next to LoRA (for example embed_tokens, lm_head)."
    )
    trainable_layers: list[int] | int = Field(
        2,
        description="freeze: decoder layers that train. A list of indices (negative counts from the end) "
        "or an int N meaning the last N layers.",
    )
    trainable_modules: list[str] = Field(
        default_factory=list,
        description="freeze: within the trainable layers, train only parameters whose name contains one of "
        "these strings (empty: the whole layer), e.g. [mlp].",
    )
    train_embeddings: bool = Field(False, description="freeze: also train the input embeddings and output head.")


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
    template: Literal["auto", "tokenizer", "chatml", "llama3", "alpaca", "plain"] = Field(
        "auto",
        description="Chat template: auto uses the tokenizer's own and chatml when it has none; "
        "tokenizer requires the tokenizer's own.",
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

    objective: Literal["sft", "pretrain"] = Field("sft", description="sft: chat fine-tuning; pretrain: continued pretraining on text.")
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
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(1.0, description="Clip the global gradient norm to this (null: no clipping).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast precision. auto: bf16 where the device runs it fast and correctly, else fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
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
        description="Regex whose first group is the final answer, for exact_match; the whole text when it does not match.",
    )
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch.")
    metrics: list[str] = Field(
        default_factory=lambda: ["exact_match"],
        description="Generation metrics logged at each evaluation as eval_<name> (see tunelab eval --metrics).",
    )

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, names: list[str]) -> list[str]:
        from tunelab.eval.metrics import METRICS

        unknown = [name for name in names if name not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
        return names


class TunelabConfig(_Section):
    """A whole run."""

    model: ModelConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_dir: str = Field(description="Where config.yaml, metrics.jsonl, checkpoints/ and final/ are written.")

    @model_validator(mode="after")
    def _check_combinations(self) -> TunelabConfig:
        if self.train.objective == "pretrain" and self.data.train_on != "all":
            # Continued pretraining trains every token by definition.
            self.data.train_on = "all"
        if self.data.packing and self.train.batch_tokens < self.data.max_length:
            raise ValueError(
                f"train.batch_tokens ({self.train.batch_tokens}) must be at least data.max_length "
                f"({self.data.max_length}) when packing, so that every sequence fits in a row"
            )
        if self.train.max_grad_norm is not None and self.train.max_grad_norm <= 0:
            raise ValueError("train.max_grad_norm must be positive, or null for no clipping")
        return self


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages


class _LineLoader(yaml.SafeLoader):
    """A YAML loader that remembers the line of every mapping key, by dotted path."""


def _compose_lines(node: yaml.Node, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[path] = key_node.start_mark.line + 1
            _compose_lines(value_node, path, lines)


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
        _compose_lines(node, "", lines)
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
            shown = repr(value) if not isinstance(value, dict) else "a mapping"
            text = f"'{key}' = {shown}: {error['msg']}"
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
