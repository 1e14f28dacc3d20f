"""The GGUF file's tensors: llama.cpp's names, the Q/K row permutation, Gemma's norm shift and each tensor's type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tunelab.deploy.gguf.archs import arch_of, gguf_hparams
from tunelab.deploy.gguf.hf_checkpoint import _Weights, llama3_rope_factors
from tunelab.errors import TunelabError

OUTTYPES = ("f32", "f16", "q8_0")
Q8_0_BLOCK = 32

ROPE_FREQS = "rope_freqs.weight"


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF Q/K projection rows (or bias) -> llama.cpp's order.

    HF Llama applies RoPE to the two halves of each head (dimension ``i`` pairs with ``i + d/2``);
    llama.cpp's ``llama`` graph rotates adjacent pairs (``2i`` with ``2i + 1``). Within each head,
    output row ``j < d/2`` moves to ``2j`` and row ``d/2 + j`` to ``2j + 1``: for one head of size 8,
    rows ``[0 1 2 3 4 5 6 7]`` become ``[0 4 1 5 2 6 3 7]``.

    Args:
        weights: ``[n_head * head_dim, ...]`` (a weight matrix or a bias vector).
        n_head: heads in this projection (the KV head count for K).
    """
    rows = weights.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of even size")
    return weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def unpermute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`permute_qk`: llama.cpp's Q/K row order back to HF's."""
    rows = weights.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of even size")
    return weights.reshape(n_head, rows // n_head // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


@dataclass
class _TensorPlan:
    hf_name: str | None  # None for tensors computed here (rope_freqs)
    name: str  # llama.cpp name
    shape: tuple[int, ...]  # numpy (row-major) order
    qtype: str  # "F32", "F16" or "Q8_0"
    permute_heads: int = 0  # Q/K: heads to permute over; 0: no permutation
    fallback: str = ""  # why the type differs from the file's outtype
    shift: float = 0.0  # added to the HF values (Gemma's norms)


def _llama_cpp_name(hf_name: str, name_map: Any) -> str | None:
    """llama.cpp's name for an HF tensor (gguf's own per-architecture name map), or None."""
    return name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def _plan_tensors(config: dict[str, Any], weights: _Weights, outtype: str) -> list[_TensorPlan]:
    """Every tensor of the GGUF file, in the order written, with its type and transformation."""
    from tunelab.deploy.gguf.gguf_lib import _gguf

    arch = arch_of(config)
    hparams = gguf_hparams(config)
    n_layers = hparams["block_count"]
    name_map = _gguf().get_tensor_name_map(arch.gguf_arch, n_layers)
    allowed_block = set(arch.layer_tensors) | set(arch.optional_layer_tensors)
    tied = bool(config.get("tie_word_embeddings", False))
    plan: list[_TensorPlan] = []
    unknown: list[str] = []
    for hf_name in weights.files:
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp from rope.freq_base
        if hf_name == "lm_head.weight" and tied and "model.embed_tokens.weight" in weights.files \
                and np.array_equal(weights.get(hf_name), weights.get("model.embed_tokens.weight")):
            continue  # a true copy: llama.cpp uses token_embd when output is absent
        name = _llama_cpp_name(hf_name, name_map)
        block = name.split(".", 2) if name and name.startswith("blk.") else None
        if name is None or (block is not None and (block[2] not in allowed_block or int(block[1]) >= n_layers)) \
                or (block is None and name not in ("token_embd.weight", "output_norm.weight", "output.weight")):
            unknown.append(hf_name)
            continue
        shape = weights.shape(hf_name)
        heads = 0
        if arch.adjacent_pair_rope and ".attn_q." in name:
            heads = hparams["attention.head_count"]
        elif arch.adjacent_pair_rope and ".attn_k." in name:
            heads = hparams["attention.head_count_kv"]
        shift = arch.norm_shift if name.endswith("norm.weight") else 0.0
        plan.append(_TensorPlan(hf_name, name, shape, _tensor_type(name, shape, outtype), heads, shift=shift))
        if plan[-1].qtype == "F16" and outtype == "q8_0":
            plan[-1].fallback = f"row size {shape[-1]} is not a multiple of {Q8_0_BLOCK}"
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise TunelabError(f"config.json says {arch.model_type} but the checkpoint has tensors llama.cpp's "
                           f"{arch.name} graph has no place for: {shown}")
    names = {p.name for p in plan}
    required = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{t}" for i in range(n_layers) for t in arch.layer_tensors
    ]
    if not tied:
        required.append("output.weight")
    missing = [n for n in required if n not in names]
    if missing:
        raise TunelabError(
            f"the checkpoint lacks tensors a {arch.model_type} model needs (llama.cpp names): {', '.join(missing[:5])}"
        )
    factors = llama3_rope_factors(config)
    if factors is not None:
        plan.insert(0, _TensorPlan(None, ROPE_FREQS, factors.shape, "F32"))

    def order(p: _TensorPlan) -> tuple[int, int, str]:
        if p.name.startswith("blk."):
            return (1, int(p.name.split(".")[1]), "")
        return ({"rope_freqs.weight": 0, "token_embd.weight": 0}.get(p.name, 2), 0, p.name)

    return sorted(plan, key=order)


def _prepared(p: _TensorPlan, weights: _Weights, factors: np.ndarray | None) -> np.ndarray:
    """The float32 values a planned tensor holds in the file: the HF weight permuted and shifted as llama.cpp needs."""
    data = factors if p.hf_name is None else weights.get(p.hf_name)
    if p.permute_heads:
        data = permute_qk(data, p.permute_heads)
    if p.shift:
        data = data + np.float32(p.shift)
    return data


def _tensor_type(name: str, shape: tuple[int, ...], outtype: str) -> str:
    """llama.cpp's choice: 1-D tensors (norms, biases) f32; matrices the outtype, q8_0 only where rows fit."""
    if len(shape) < 2 or not name.endswith(".weight"):
        return "F32"
    if outtype == "f32":
        return "F32"
    if outtype == "q8_0" and shape[-1] % Q8_0_BLOCK == 0:
        return "Q8_0"
    return "F16"
