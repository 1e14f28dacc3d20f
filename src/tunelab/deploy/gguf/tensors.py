"""The GGUF file's tensors: llama.cpp's names, the Q/K row permutation and each tensor's type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tunelab.deploy.gguf.hf_checkpoint import _Weights, llama3_rope_factors, llama_hparams
from tunelab.errors import TunelabError

OUTTYPES = ("f32", "f16", "q8_0")
Q8_0_BLOCK = 32

# HF Llama tensor names -> llama.cpp names (``{bid}`` is the layer index).
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.down_proj.bias": "ffn_down.bias",
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
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


def _plan_tensors(config: dict[str, Any], weights: _Weights, outtype: str) -> list[_TensorPlan]:
    """Every tensor of the GGUF file, in the order written, with its type."""
    hparams = llama_hparams(config)
    n_layers = hparams["block_count"]
    tied = bool(config.get("tie_word_embeddings", False))
    plan: list[_TensorPlan] = []
    unknown: list[str] = []
    for hf_name in weights.files:
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp from rope.freq_base
        if hf_name == "lm_head.weight" and tied and "model.embed_tokens.weight" in weights.files \
                and np.array_equal(weights.get(hf_name), weights.get("model.embed_tokens.weight")):
            continue  # a true copy: llama.cpp uses token_embd when output is absent
        if hf_name in _GLOBAL_TENSORS:
            name = _GLOBAL_TENSORS[hf_name]
        else:
            parts = hf_name.split(".", 3)
            if len(parts) != 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit() \
                    or parts[3] not in _LAYER_TENSORS or int(parts[2]) >= n_layers:
                unknown.append(hf_name)
                continue
            name = f"blk.{parts[2]}.{_LAYER_TENSORS[parts[3]]}"
        shape = weights.shape(hf_name)
        heads = 0
        if ".attn_q." in name:
            heads = hparams["attention.head_count"]
        elif ".attn_k." in name:
            heads = hparams["attention.head_count_kv"]
        plan.append(_TensorPlan(hf_name, name, shape, _tensor_type(name, shape, outtype), heads))
        if plan[-1].qtype == "F16" and outtype == "q8_0":
            plan[-1].fallback = f"row size {shape[-1]} is not a multiple of {Q8_0_BLOCK}"
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise TunelabError(f"config.json says llama but the checkpoint has tensors llama.cpp has no place for: {shown}")
    names = {p.name for p in plan}
    required = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{t}" for i in range(n_layers)
        for t in ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                  "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
    ]
    if not tied:
        required.append("output.weight")
    missing = [n for n in required if n not in names]
    if missing:
        raise TunelabError(
            f"the checkpoint lacks tensors a Llama model needs (llama.cpp names): {', '.join(missing[:5])}"
        )
    factors = llama3_rope_factors(config)
    if factors is not None:
        plan.insert(0, _TensorPlan(None, ROPE_FREQS, factors.shape, "F32"))

    def order(p: _TensorPlan) -> tuple[int, int, str]:
        if p.name.startswith("blk."):
            return (1, int(p.name.split(".")[1]), "")
        return ({"rope_freqs.weight": 0, "token_embd.weight": 0}.get(p.name, 2), 0, p.name)

    return sorted(plan, key=order)


def _tensor_type(name: str, shape: tuple[int, ...], outtype: str) -> str:
    """llama.cpp's choice: 1-D tensors (norms, biases) f32; matrices the outtype, q8_0 only where rows fit."""
    if len(shape) < 2 or not name.endswith(".weight"):
        return "F32"
    if outtype == "f32":
        return "F32"
    if outtype == "q8_0" and shape[-1] % Q8_0_BLOCK == 0:
        return "Q8_0"
    return "F16"
