"""The Hugging Face side of the export: a model directory's config.json and safetensors weights."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.deploy.gguf.archs import arch_of, head_dim, rope_parameters
from tunelab.errors import TunelabError


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
    try:
        arch_of(config)
    except TunelabError as exc:
        raise TunelabError(str(exc).replace("config.json:", f"{config_file}:", 1)) from None
    if config.get("quantization_config"):
        raise TunelabError(
            f"{config_file}: the weights are quantized ({config['quantization_config'].get('quant_method', '?')}); "
            "export the unquantized (bfloat16/float16/float32) checkpoint instead"
        )
    return config


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray | None:
    """The ``rope_freqs`` tensor llama.cpp needs for Llama-3.1-style rope scaling, else None.

    One factor per rotated pair: llama.cpp divides each RoPE frequency by it, which reproduces
    transformers' ``llama3`` frequencies (short wavelengths kept, long ones divided by ``factor``,
    a smooth blend between).
    """
    rope = rope_parameters(config)
    if rope["rope_type"] != "llama3":
        return None
    theta = float(rope["rope_theta"])
    dim = head_dim(config)
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
