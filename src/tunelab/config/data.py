"""The ``data`` section: where the data is, how it is read, rendered, masked and batched."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from tunelab.config.base import Section

DEFAULT_MAX_LENGTH = 1024
"""The one default of the longest sequence in tokens: ``data.max_length`` and ``tunelab eval --max-length``."""

TrainOn = Literal["assistant", "all", "last_assistant"]


class DataConfig(Section):
    """Where the data is, how it is read, rendered, masked and batched."""

    train: list[str] = Field(description="Training data file(s): JSON, JSONL, CSV, Parquet or TXT, or a hub dataset id.")
    eval: list[str] | None = Field(None, description="Held-out data file(s). Without it, val_ratio splits train.")
    format: Literal["auto", "alpaca", "sharegpt", "messages", "qa", "text"] = Field(
        "auto", description="Record format; auto detects it from the first record."
    )
    val_ratio: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of train held out for evaluation when data.eval is not set."
    )
    max_length: int = Field(DEFAULT_MAX_LENGTH, ge=8, description="Longest sequence in tokens (training and evaluation).")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with a sequence longer than max_length. It is always counted and reported."
    )
    packing: bool = Field(True, description="Padding-free packing of several sequences per row.")
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="fail: stop at the first bad record; skip: drop bad records and report how many and why."
    )
    train_on: TrainOn = Field(
        "assistant",
        description="Which tokens carry a loss: assistant turns, all tokens, or the last assistant turn. "
        "Plain-text objectives (pretrain) train every token whatever this says.",
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

    def trained_tokens(self, data_kind: str) -> TrainOn:
        """Which tokens carry a loss for an objective training on ``data_kind``: every token of plain text
        (continued pretraining trains every token by definition), else ``train_on``."""
        return "all" if data_kind == "text" else self.train_on
