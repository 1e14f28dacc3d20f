"""The Hugging Face side of the export: a Llama model directory's config.json and safetensors weights."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import TunelabError

SUPPORTED_MODEL_TYPES = ("llama",)


def _read_config(model_dir: Path) -> dict[str, Any]:
    if (model_dir / "adapter_config.json").is_file():
        raise TunelabError(
            f"--model {model_dir}: this is a PEFT adapter; merge it into its base first "
            f"(tunelab merge --adapter {model_dir} --out DIR) and export DIR"
        )
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise TunelabError(f"--model {model_dir}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TunelabError(f"{config_file}: not valid JSON ({exc})") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TunelabError(
            f"{config_file}: model_type {model_type!r} (architectures {config.get('architectures')}) cannot be "
            f"exported to GGUF by tunelab; supported: {', '.join(SUPPORTED_MODEL_TYPES)} (LlamaForCausalLM). "
            "For other architectures use llama.cpp's convert_hf_to_gguf.py."
        )
    if config.get("quantization_config"):
        raise TunelabError(
            f"{config_file}: the weights are quantized ({config['quantization_config'].get('quant_method', '?')}); "
            "export the unquantized (bfloat16/float16/float32) checkpoint instead"
        )
    return config


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope theta, rope scaling parameters) from a transformers 4 or 5 config."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    return theta, params


def llama_hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The ``llama.*`` GGUF metadata (keys without the ``llama.`` prefix) for a Llama config.json."""
    hidden = int(config["hidden_size"])
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or hidden // n_head)
    theta, rope = _rope(config)
    hparams: dict[str, Any] = {
        "vocab_size": int(config["vocab_size"]),
        "context_length": int(config.get("max_position_embeddings", 2048)),
        "embedding_length": hidden,
        "block_count": int(config["num_hidden_layers"]),
        "feed_forward_length": int(config["intermediate_size"]),
        "rope.dimension_count": head_dim,
        "rope.freq_base": theta,
        "attention.head_count": n_head,
        "attention.head_count_kv": n_head_kv,
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "attention.layer_norm_rms_epsilon": float(config.get("rms_norm_eps", 1e-6)),
    }
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "linear":
        hparams["rope.scaling.type"] = "linear"
        hparams["rope.scaling.factor"] = float(rope["factor"])
    elif rope_type not in ("default", "llama3"):
        raise TunelabError(
            f"config.json: rope scaling {rope_type!r} is not supported by tunelab's GGUF export "
            "(supported: none, linear, llama3)"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise TunelabError(f"config.json: hidden_act {config['hidden_act']!r}; llama.cpp's llama graph uses silu")
    return hparams


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray | None:
    """The ``rope_freqs`` tensor llama.cpp needs for Llama-3.1-style rope scaling, else None.

    One factor per rotated pair: llama.cpp divides each RoPE frequency by it, which reproduces
    transformers' ``llama3`` frequencies (short wavelengths kept, long ones divided by ``factor``,
    a smooth blend between).
    """
    theta, rope = _rope(config)
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    hparams = llama_hparams(config)
    dim = hparams["rope.dimension_count"]
    factor = float(rope.get("factor", 8.0))
    low_freq_factor = float(rope.get("low_freq_factor", 1.0))
    high_freq_factor = float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (i / dim)
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file (one file or a sharded index)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    raise TunelabError(
        f"--model {model_dir}: no model.safetensors (or model.safetensors.index.json); tunelab reads "
        "safetensors only"
    )


class _Weights:
    """Read HF tensors as float32 numpy arrays, one at a time (open files are kept for reuse)."""

    def __init__(self, model_dir: Path) -> None:
        self.files = _weight_files(model_dir)
        self._stack = contextlib.ExitStack()
        self._open: dict[Path, Any] = {}

    def _handle(self, name: str) -> Any:
        from safetensors import safe_open

        path = self.files[name]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._open[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        import torch

        return self._handle(name).get_tensor(name).to(torch.float32).numpy()

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> _Weights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
