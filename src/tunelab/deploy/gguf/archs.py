"""The model families tunelab writes as GGUF, and what llama.cpp's graph for each expects.

One :class:`GgufArch` per ``config.json`` ``model_type``. What differs between them (learned
from llama.cpp's ``convert_hf_to_gguf.py`` and its model graphs):

* ``llama`` and ``mistral`` are both llama.cpp's ``llama`` graph, which rotates adjacent pairs of
  each head with RoPE: the Q and K rows are permuted (:func:`~tunelab.deploy.gguf.tensors.permute_qk`).
  That graph has no sliding window, so a Mistral whose window is shorter than its context is
  written with the window as its context length (within it, full attention is the same thing).
* ``qwen2``, ``qwen3`` and ``gemma3`` rotate the two halves of each head, as transformers does
  (llama.cpp's "neox" RoPE): no permutation. Qwen2 has biases on Q/K/V; Qwen3 RMS-normalises each
  query and key head (``attn_q_norm``/``attn_k_norm``) and has no biases.
* ``gemma3``: every RMS norm computes ``x * (1 + weight)`` in transformers and ``x * weight`` in
  llama.cpp, so 1 is added to each norm weight. llama.cpp fixes what the file cannot say: every
  6th layer is global and the others slide over ``attention.sliding_window`` tokens; local layers
  use RoPE base 10000; queries are scaled by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the
  62-layer 27B). Configs that differ are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tunelab.errors import TunelabError


@dataclass(frozen=True)
class GgufArch:
    """How one Hugging Face model family is written for llama.cpp.

    Attributes:
        model_type: ``config.json``'s ``model_type``.
        name: llama.cpp's architecture (``general.architecture`` and the prefix of its keys).
        adjacent_pair_rope: llama.cpp rotates pairs ``(2i, 2i + 1)``; HF's Q/K rows are permuted.
        norm_shift: added to every norm weight on export (Gemma stores ``weight - 1``).
        layer_tensors: llama.cpp tensor names (after ``blk.N.``) a block must have.
        optional_layer_tensors: names a block may have (biases, where the graph reads them).
        activation: the ``hidden_act`` (``hidden_activation`` for Gemma) llama.cpp's graph computes.
        rope_scalings: the RoPE types (``rope_type``) it can reproduce.
    """

    model_type: str
    name: str
    adjacent_pair_rope: bool
    layer_tensors: tuple[str, ...]
    optional_layer_tensors: tuple[str, ...] = ()
    norm_shift: float = 0.0
    activation: str = "silu"
    rope_scalings: tuple[str, ...] = ("default", "linear")

    @property
    def gguf_arch(self) -> Any:
        """The ``gguf.MODEL_ARCH`` member of :attr:`name`."""
        from tunelab.deploy.gguf.gguf_lib import _gguf

        gguf = _gguf()
        return next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == self.name)


_PLAIN_BLOCK = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
_LLAMA_BIASES = ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias", "ffn_gate.bias", "ffn_up.bias",
                 "ffn_down.bias")

ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch("llama", "llama", True, _PLAIN_BLOCK, _LLAMA_BIASES,
                      rope_scalings=("default", "linear", "llama3")),
    "mistral": GgufArch("mistral", "llama", True, _PLAIN_BLOCK, _LLAMA_BIASES,
                        rope_scalings=("default", "linear", "llama3")),
    "qwen2": GgufArch("qwen2", "qwen2", False, _PLAIN_BLOCK, ("attn_q.bias", "attn_k.bias", "attn_v.bias")),
    "qwen3": GgufArch("qwen3", "qwen3", False, _PLAIN_BLOCK + ("attn_q_norm.weight", "attn_k_norm.weight")),
    "gemma3_text": GgufArch(
        "gemma3_text", "gemma3", False,
        _PLAIN_BLOCK + ("attn_q_norm.weight", "attn_k_norm.weight", "post_attention_norm.weight",
                        "post_ffw_norm.weight"),
        norm_shift=1.0, activation="gelu_pytorch_tanh",
    ),
}
SUPPORTED_MODEL_TYPES = tuple(ARCHS)
GEMMA3_SLIDING_PATTERN = 6  # llama.cpp: every 6th layer of a Gemma 3 is global
GEMMA3_LOCAL_ROPE_BASE = 10000.0  # llama.cpp's fixed RoPE base for Gemma 3's sliding layers


def arch_of(config: dict[str, Any]) -> GgufArch:
    """The :class:`GgufArch` of a config.json; a clear error for families tunelab cannot write."""
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        hint = " (a multimodal Gemma 3: export its text model, Gemma3ForCausalLM)" if model_type == "gemma3" else ""
        raise TunelabError(
            f"config.json: model_type {model_type!r} (architectures {config.get('architectures')}) cannot be "
            f"exported to GGUF by tunelab{hint}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}. "
            "For other architectures use llama.cpp's convert_hf_to_gguf.py."
        )
    return ARCHS[model_type]


def rope_parameters(config: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """The RoPE parameters (``rope_theta``, ``rope_type``, scaling) of a transformers 4 or 5 config.

    Gemma 3 in transformers 5 keeps one set per layer type (``full_attention``, ``sliding_attention``).
    """
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if layer_type in params and isinstance(params[layer_type], dict):
        params = dict(params[layer_type])
    elif any(isinstance(value, dict) for value in params.values()):
        params = {}
    if "rope_theta" not in params:
        default = config.get("rope_local_base_freq") if layer_type == "sliding_attention" else None
        params["rope_theta"] = float(default or config.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def head_dim(config: dict[str, Any]) -> int:
    """Size of each attention head (``head_dim``, else hidden / heads)."""
    return int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))


def gguf_hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The GGUF hyperparameters (keys without the ``ARCH.`` prefix) of a config.json.

    Raises:
        TunelabError: a family or a setting llama.cpp's graph would compute differently.
    """
    arch = arch_of(config)
    hidden = int(config["hidden_size"])
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    size = head_dim(config)
    rope = rope_parameters(config)
    context = int(config.get("max_position_embeddings", 2048))
    _check_common(config, arch)
    hparams: dict[str, Any] = {
        "vocab_size": int(config["vocab_size"]),
        "context_length": context,
        "embedding_length": hidden,
        "block_count": int(config["num_hidden_layers"]),
        "feed_forward_length": int(config["intermediate_size"]),
        "rope.dimension_count": size,
        "rope.freq_base": float(rope["rope_theta"]),
        "attention.head_count": n_head,
        "attention.head_count_kv": n_head_kv,
        "attention.key_length": size,
        "attention.value_length": size,
        "attention.layer_norm_rms_epsilon": float(config.get("rms_norm_eps", 1e-6)),
    }
    if rope["rope_type"] == "linear":
        hparams["rope.scaling.type"] = "linear"
        hparams["rope.scaling.factor"] = float(rope["factor"])
    if arch.model_type == "mistral":
        window = config.get("sliding_window")
        if window and int(window) < context:  # llama.cpp's llama graph attends to everything: keep to the window
            hparams["context_length"] = int(window)
    if arch.model_type == "gemma3_text":
        hparams["attention.sliding_window"] = int(config["sliding_window"])
        _check_gemma3(config, size)
    if arch.model_type in ("qwen2", "qwen3"):
        sliding = [t for t in config.get("layer_types") or [] if t != "full_attention"]
        if config.get("use_sliding_window") and sliding:
            raise TunelabError(f"config.json: {len(sliding)} sliding-window layers (use_sliding_window); llama.cpp's "
                               f"{arch.name} graph attends to the whole context in every layer")
    return hparams


def export_notes(config: dict[str, Any]) -> list[str]:
    """What the GGUF file says differently from config.json, and why (shown after an export)."""
    arch = arch_of(config)
    notes = []
    hparams = gguf_hparams(config)
    if arch.model_type == "mistral" and hparams["context_length"] != int(config.get("max_position_embeddings", 2048)):
        notes.append(f"context length {hparams['context_length']} (the sliding window; config.json says "
                     f"{config.get('max_position_embeddings')}): llama.cpp runs Mistral as llama, without a "
                     "window, which only gives transformers' answers within the window")
    if arch.norm_shift:
        notes.append(f"norm weights stored plus {arch.norm_shift:g} (llama.cpp multiplies by the weight, "
                     "transformers' Gemma by 1 + weight)")
    return notes


def _check_common(config: dict[str, Any], arch: GgufArch) -> None:
    activation = config.get("hidden_activation") or config.get("hidden_act") or "silu"
    if activation != arch.activation:
        raise TunelabError(f"config.json: activation {activation!r}; llama.cpp's {arch.name} graph computes "
                           f"{arch.activation}")
    rope = rope_parameters(config)
    if rope["rope_type"] not in arch.rope_scalings:
        supported = ", ".join(s for s in arch.rope_scalings if s != "default")
        raise TunelabError(f"config.json: rope scaling {rope['rope_type']!r} is not supported by tunelab's GGUF export "
                           f"of {arch.model_type} (supported: none, {supported})")
    partial = float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) or 1.0)
    if not math.isclose(partial, 1.0):
        raise TunelabError(f"config.json: partial_rotary_factor {partial}; tunelab writes models that rotate "
                           "whole heads")
    if arch.model_type in ("qwen3", "gemma3_text") and config.get("attention_bias"):
        raise TunelabError(f"config.json: attention_bias is true; llama.cpp's {arch.name} graph has no Q/K/V biases")


def _check_gemma3(config: dict[str, Any], size: int) -> None:
    layers = int(config["num_hidden_layers"])
    expected = ["full_attention" if (i + 1) % GEMMA3_SLIDING_PATTERN == 0 else "sliding_attention"
                for i in range(layers)]
    if list(config.get("layer_types") or expected) != expected:
        raise TunelabError(f"config.json: layer_types {config.get('layer_types')} differ from Gemma 3's pattern "
                           f"(every {GEMMA3_SLIDING_PATTERN}th layer global), which llama.cpp assumes")
    local = rope_parameters(config, "sliding_attention")
    if float(local["rope_theta"]) != GEMMA3_LOCAL_ROPE_BASE or local["rope_type"] != "default":
        raise TunelabError(f"config.json: the sliding layers' RoPE ({local}) is not llama.cpp's fixed one "
                           f"(base {GEMMA3_LOCAL_ROPE_BASE:g}, no scaling)")
    scale_dim = int(config["hidden_size"]) // int(config["num_attention_heads"]) if layers == 62 else size
    if float(config.get("query_pre_attn_scalar", size)) != scale_dim:
        raise TunelabError(f"config.json: query_pre_attn_scalar {config.get('query_pre_attn_scalar')}; llama.cpp "
                           f"scales Gemma 3's queries by 1/sqrt({scale_dim})")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if config.get(key):
            raise TunelabError(f"config.json: {key} {config[key]}; Gemma 3 has none and tunelab writes none")
    if config.get("use_bidirectional_attention"):
        raise TunelabError("config.json: use_bidirectional_attention (an embedding model); llama.cpp's gemma3 "
                           "graph is causal")
