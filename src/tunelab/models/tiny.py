"""Offline tiny models: a randomly initialised HF model with a real BPE tokenizer and chat template.

Tests, examples and CI build these instead of downloading weights. The output directory is a plain
Hugging Face model directory (safetensors), loadable with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

from tunelab.data.templates import BUILTIN_TEMPLATES
from tunelab.errors import TunelabError, read_user_text

SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
}
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
SUPPORTED_ARCHS = ("llama",)


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


def train_tokenizer(vocab_size: int, corpus_file: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (digits split one by one) with chat special tokens.

    Args:
        vocab_size: target vocabulary size, special tokens included.
        corpus_file: text, JSON or JSONL file to learn merges from; the shipped corpus when None.

    Returns:
        A fast tokenizer with bos/eos/pad tokens and the chatml chat template.
    """
    specials = list(SPECIAL_TOKENS.values()) + CHAT_TOKENS
    tokenizer = Tokenizer(models.BPE())
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
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        additional_special_tokens=CHAT_TOKENS,
        **SPECIAL_TOKENS,
    )
    fast.chat_template = BUILTIN_TEMPLATES["chatml"]
    return fast


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
) -> Path:
    """Write a randomly initialised model directory with tokenizer and chat template.

    Args:
        out_dir: directory to create (or overwrite).
        arch: model family; only ``llama`` (the most common open architecture) for now.
        hidden: hidden size; must be divisible by ``heads``.
        layers: decoder layers.
        heads: attention heads; ``kv_heads`` (default: same) for grouped-query attention.
        vocab: tokenizer vocabulary size to train; the embedding is padded to a multiple of 64.
        intermediate: MLP width (default about 8/3 of hidden, rounded up to 32).
        max_positions: longest position the model supports.
        tokenizer_corpus: file to train the tokenizer on (default: the shipped corpus).
        seed: initialisation seed.

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
    out = Path(out_dir)
    tokenizer = train_tokenizer(vocab, tokenizer_corpus)
    padded_vocab = -(-len(tokenizer) // 64) * 64
    config = LlamaConfig(
        vocab_size=padded_vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or -(-(hidden * 8 // 3) // 32) * 32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
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
