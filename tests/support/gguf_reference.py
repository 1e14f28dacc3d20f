"""A float64 numpy forward pass of llama.cpp's graphs over the tensors stored in a GGUF file.

Written from llama.cpp's semantics, not from tunelab's exporter, so that a test can check what a
file means rather than how it was written: ``llama`` rotates adjacent pairs of each head with
RoPE, ``qwen2``/``qwen3``/``gemma3`` the two halves ("neox"); Qwen2 adds Q/K/V biases, Qwen3 and
Gemma 3 RMS-normalise each query and key head; Gemma 3 scales the embeddings by sqrt(hidden),
wraps attention and MLP in pre- and post-norms, uses tanh-GELU, makes every 6th layer global and
the others attend to the last ``sliding_window`` tokens with RoPE base 10000.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def gguf_logits(path: Path, ids: list[int]) -> np.ndarray:
    """Logits ``[len(ids), vocab]`` of the model in the GGUF file at ``path``."""
    import gguf

    from tunelab.deploy.gguf import read_gguf

    meta = read_gguf(path)["metadata"]
    arch = meta["general.architecture"]
    reader = gguf.GGUFReader(str(path))
    w = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape.tolist())))
         .astype(np.float64) for t in reader.tensors}
    key = lambda name, default=None: meta.get(f"{arch}.{name}", default)  # noqa: E731
    n_head, n_kv = key("attention.head_count"), key("attention.head_count_kv")
    head_dim, eps = key("attention.key_length", key("rope.dimension_count")), key("attention.layer_norm_rms_epsilon")
    base, window = key("rope.freq_base"), key("attention.sliding_window")
    gemma = arch == "gemma3"
    T = len(ids)

    def rms(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight

    def rope(x: np.ndarray, theta_base: float) -> np.ndarray:  # x: [T, heads, head_dim]
        theta = np.arange(T)[:, None] * theta_base ** (-np.arange(0, head_dim, 2) / head_dim)[None, :]
        if "rope_freqs.weight" in w:  # Llama-3.1 scaling: ggml divides each frequency by its factor
            theta = theta / w["rope_freqs.weight"][None, :]
        cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        out = np.empty_like(x)
        if arch == "llama":  # pairs (2i, 2i + 1)
            even, odd = x[..., 0::2], x[..., 1::2]
            out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
        else:  # neox: pairs (i, i + head_dim / 2)
            a, b = x[..., : head_dim // 2], x[..., head_dim // 2:]
            out[..., : head_dim // 2], out[..., head_dim // 2:] = a * cos - b * sin, b * cos + a * sin
        return out

    def linear(h: np.ndarray, name: str) -> np.ndarray:
        out = h @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    x = w["token_embd.weight"][ids] * (np.sqrt(meta[f"{arch}.embedding_length"]) if gemma else 1.0)
    distance = np.arange(T)[:, None] - np.arange(T)[None, :]
    for layer in range(key("block_count")):
        p = f"blk.{layer}."
        sliding = gemma and (layer + 1) % 6 != 0
        h = rms(x, w[p + "attn_norm.weight"])
        q = linear(h, p + "attn_q").reshape(T, n_head, head_dim)
        k = linear(h, p + "attn_k").reshape(T, n_kv, head_dim)
        v = linear(h, p + "attn_v").reshape(T, n_kv, head_dim)
        if p + "attn_q_norm.weight" in w:
            q, k = rms(q, w[p + "attn_q_norm.weight"]), rms(k, w[p + "attn_k_norm.weight"])
        q, k = rope(q, 10000.0 if sliding else base), rope(k, 10000.0 if sliding else base)
        k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
        masked = (distance < 0) | ((distance >= window) if sliding else False)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_dim) + np.where(masked, -np.inf, 0.0)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = linear(np.einsum("hqk,khd->qhd", probs, v).reshape(T, n_head * head_dim), p + "attn_output")
        x = x + (rms(attn, w[p + "post_attention_norm.weight"]) if gemma else attn)
        h = rms(x, w[p + "ffn_norm.weight"])
        gate = linear(h, p + "ffn_gate")
        if gemma:
            act = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
        else:
            act = gate / (1 + np.exp(-gate))
        ffn = linear(act * linear(h, p + "ffn_up"), p + "ffn_down")
        x = x + (rms(ffn, w[p + "post_ffw_norm.weight"]) if gemma else ffn)
    x = rms(x, w["output_norm.weight"])
    return x @ w.get("output.weight", w["token_embd.weight"]).T
