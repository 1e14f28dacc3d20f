"""The ``model`` section: which model to start from and how to load it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunelab.config.base import Section

Quantization = Literal["auto", "none", "4bit", "8bit"]


class TinyModelConfig(Section):
    """A tiny random model to build at model.path when nothing is there (tests, quickstart, CI)."""

    arch: Literal["llama", "mistral", "qwen2", "qwen3", "gemma3"] = Field("llama", description="Model family.")
    hidden: int = Field(64, ge=8, description="Hidden size.")
    layers: int = Field(2, ge=1, description="Decoder layers.")
    heads: int = Field(4, ge=1, description="Attention heads.")
    vocab: int = Field(1024, ge=300, description="Tokenizer vocabulary size to train.")
    tokenizer_corpus: str | None = Field(None, description="Text/JSON(L) file to train the tokenizer on (default: shipped corpus).")
    seed: int = Field(0, description="Initialisation seed.")


class ModelConfig(Section):
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
    quantization: Quantization = Field(
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
