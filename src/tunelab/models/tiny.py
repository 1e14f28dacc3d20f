"""Offline tiny models: a randomly initialised HF model with a real BPE tokenizer and chat template.

Tests, examples and CI build these instead of downloading weights. The output directory is a plain
Hugging Face model directory (safetensors), loadable with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from tunelab.data.templates import BUILTIN_TEMPLATES
from tunelab.errors import TunelabError, read_user_text

SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
}
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]


def default_corpus() -> str:
    """The licence-clean text shipped with tunelab for training tiny tokenizers."""
    return resources.files("tunelab.resources").joinpath("tiny_corpus.txt").read_text(encoding="utf-8")


def _corpus_lines(corpus_file: str | Path | None) -> list[str]:
    text = default_corpus() if corpus_file is None else read_user_text(corpus_file, "tokenizer corpus")
    # JSON/JSONL corpora: train on the string values, not on the JSON punctuation.
    lines: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("{", "[")):
            try:
                lines.extend(_strings_in(json.loads(stripped)))
                continue
            except json.JSONDecodeError:
                pass
        if stripped:
            lines.append(line)
    if not lines:
        raise TunelabError(f"{corpus_file}: tokenizer corpus is empty")
    return lines


def _strings_in(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings_in(v)]
    return []


# Qwen2's pre-tokenizer regex (transformers' Qwen2Tokenizer; llama.cpp's "qwen2" preset).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_END_OF_TEXT = "<|endoftext|>"


def train_tokenizer(vocab_size: int, corpus_file: str | Path | None = None,
                    style: str = "digits") -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with chat special tokens.

    Args:
        vocab_size: target vocabulary size, special tokens included.
        corpus_file: text, JSON or JSONL file to learn merges from; the shipped corpus when None.
        style: how text is split before BPE. ``digits``: every digit alone, then GPT-2's byte-level
            regex (llama.cpp's ``starcoder`` preset). ``qwen2``: Qwen2's regex and NFC normalisation,
            plus Qwen's ``<|endoftext|>`` token: transformers 5 rebuilds the tokenizer of every
            ``model_type: qwen2`` directory as its ``Qwen2Tokenizer`` (whatever tokenizer.json says),
            so a Qwen2 model only keeps its tokenizer if it is already of that shape.

    Returns:
        A fast tokenizer with bos/eos/pad tokens and the chatml chat template.
    """
    specials = list(SPECIAL_TOKENS.values()) + CHAT_TOKENS + ([QWEN2_END_OF_TEXT] if style == "qwen2" else [])
    tokenizer = Tokenizer(models.BPE())
    if style == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus_lines(corpus_file), trainer=trainer)
    extra = {"unk_token": QWEN2_END_OF_TEXT} if style == "qwen2" else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        additional_special_tokens=CHAT_TOKENS,
        **SPECIAL_TOKENS,
        **extra,
    )
    fast.chat_template = BUILTIN_TEMPLATES["chatml"]
    return fast


# Per-family defaults of the tiny models: head size (None: hidden / heads), sliding window, tied embeddings.
# Qwen3 and Gemma 3 keep their families' head sizes (128 and 256, every released size): transformers'
# GGUF reader takes those from its config defaults rather than from the file, so a smaller head
# would read back wrong there. Mistral's window is v0.1's; Gemma 3's that of its 270M and 1B models.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"head_dim": None, "sliding_window": None, "tied": False},
    "mistral": {"head_dim": None, "sliding_window": 4096, "tied": False},
    "qwen2": {"head_dim": None, "sliding_window": None, "tied": True},
    "qwen3": {"head_dim": 128, "sliding_window": None, "tied": True},
    "gemma3": {"head_dim": 256, "sliding_window": 512, "tied": True},
}
SUPPORTED_ARCHS = tuple(ARCH_DEFAULTS)


def _model_config(arch: str, shape: dict[str, Any], head_dim: int | None, sliding_window: int | None,
                  tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """The transformers config of a tiny ``arch`` model (``shape``: the sizes every family shares)."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if arch == "llama":  # unchanged since the first tiny model: the quickstart's numbers depend on it
        return LlamaConfig(**shape, rms_norm_eps=1e-6, tie_word_embeddings=False, **ids)
    tied = ARCH_DEFAULTS[arch]["tied"]
    head_dim = head_dim or shape["hidden_size"] // shape["num_attention_heads"]
    common = {**shape, "head_dim": head_dim, "rms_norm_eps": 1e-6, "tie_word_embeddings": tied, **ids}
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=sliding_window)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if arch == "qwen3":
        return Qwen3Config(**common, use_sliding_window=False, attention_bias=False)
    # Gemma 3: queries scaled by 1/sqrt(head_dim) (query_pre_attn_scalar), every 6th layer global.
    return Gemma3TextConfig(**common, query_pre_attn_scalar=head_dim, sliding_window=sliding_window)


def _perturb_vectors(model: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Add noise to every 1-D weight (norm scales, biases), which HF initialises to constants.

    With constant norms and zero biases, an export that drops a bias or swaps two norms would
    still give the same logits; with random ones it cannot.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def create_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    vocab: int = 1024,
    intermediate: int | None = None,
    max_positions: int = 2048,
    tokenizer_corpus: str | Path | None = None,
    seed: int = 0,
    head_dim: int | None = None,
    sliding_window: int | None = None,
) -> Path:
    """Write a randomly initialised model directory with tokenizer and chat template.

    Every family gets a byte-level BPE tokenizer trained on ``tokenizer_corpus`` (Qwen2 with its
    own pre-tokenizer, see :func:`train_tokenizer`) and the chatml template;
    ``generation_config.json`` stops at ``<|im_end|>`` and ``</s>``. The families:

    * ``llama``: Llama (the default; this model is unchanged from earlier tunelab versions);
    * ``mistral``: Mistral, with a sliding window (default 4096, as Mistral 7B v0.1);
    * ``qwen2``: Qwen2 (biases on the Q/K/V projections, tied embeddings);
    * ``qwen3``: Qwen3 (RMS norms on queries and keys, head size 128, tied embeddings);
    * ``gemma3``: Gemma 3 text (sandwich norms stored as ``weight - 1``, GELU, embeddings scaled
      by sqrt(hidden), sliding-window layers with every 6th layer global, head size 256).

    Non-llama families also get random norm weights and biases (see :func:`_perturb_vectors`).

    Args:
        out_dir: directory to create (or overwrite).
        arch: model family, one of :data:`SUPPORTED_ARCHS`.
        hidden: hidden size; must be divisible by ``heads``.
        layers: decoder layers.
        heads: attention heads; ``kv_heads`` (default: same) for grouped-query attention.
        vocab: tokenizer vocabulary size to train; the embedding is padded to a multiple of 64.
        intermediate: MLP width (default about 8/3 of hidden, rounded up to 32).
        max_positions: longest position the model supports.
        tokenizer_corpus: file to train the tokenizer on (default: the shipped corpus).
        seed: initialisation seed.
        head_dim: size of each attention head (default: the family's, see :data:`ARCH_DEFAULTS`).
        sliding_window: attention window of ``mistral`` and ``gemma3`` (default: the family's).

    Returns:
        The output directory.
    """
    if arch not in SUPPORTED_ARCHS:
        raise TunelabError(f"--arch {arch!r} is not supported; choose one of {', '.join(SUPPORTED_ARCHS)}")
    if hidden % heads:
        raise TunelabError(f"--hidden {hidden} must be divisible by --heads {heads}")
    kv_heads = kv_heads or heads
    if heads % kv_heads:
        raise TunelabError(f"--heads {heads} must be divisible by --kv-heads {kv_heads}")
    defaults = ARCH_DEFAULTS[arch]
    if arch == "llama" and head_dim not in (None, hidden // heads):
        raise TunelabError(f"--head-dim: the tiny llama model keeps hidden / heads = {hidden // heads}")
    if sliding_window is not None and defaults["sliding_window"] is None:
        raise TunelabError(f"--sliding-window: the tiny {arch} model has no sliding window (mistral and gemma3 do)")
    if sliding_window is not None and sliding_window < 1:
        raise TunelabError(f"--sliding-window {sliding_window} must be at least 1")
    out = Path(out_dir)
    tokenizer = train_tokenizer(vocab, tokenizer_corpus, style="qwen2" if arch == "qwen2" else "digits")
    padded_vocab = -(-len(tokenizer) // 64) * 64
    shape = {
        "vocab_size": padded_vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate or -(-(hidden * 8 // 3) // 32) * 32,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": max_positions,
    }
    config = _model_config(arch, shape, head_dim or defaults["head_dim"], sliding_window or defaults["sliding_window"],
                           tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if arch != "llama":
        _perturb_vectors(model, seed)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[end_of_turn, tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def write_tiny_model(out_dir: str | Path, overwrite: bool = False, **options: Any) -> Path:
    """:func:`create_tiny_model` into a claimed ``out_dir``, written beside and renamed into place.

    ``tunelab models tiny``: an existing ``out_dir`` is refused without ``overwrite`` and the
    tokenizer corpus is never replaced; ``options`` are :func:`create_tiny_model`'s.
    """
    from tunelab.outputs import atomic_output, claim_output

    out = claim_output(out_dir, overwrite, "OUT_DIR", [("tokenizer corpus", options.get("tokenizer_corpus"))])
    with atomic_output(out, what="tiny model") as tmp:
        create_tiny_model(tmp, **options)
    return out
