"""Checking a GGUF file's vocabulary against the HF tokenizer, including llama.cpp-style tokenization of probe texts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.deploy.gguf.bpe import gguf_bpe_tokenize
from tunelab.deploy.gguf.gguf_lib import _gguf
from tunelab.deploy.gguf.tokenizer import (
    _SPECIAL_ID_KEYS,
    _adds_special,
    _chat_template,
    _load_hf_tokenizer,
    _merges,
    _special_ids,
    sentencepiece_adds_space_prefix,
)
from tunelab.errors import TunelabError

# Texts whose tokenization by the GGUF vocabulary (llama.cpp's algorithm) must equal the HF tokenizer's.
_TOKENIZER_PROBES = (
    "Hello world! It's a test: 12345 + 678 = 13023.",
    "a  1, b   22 and   333\tdigits 3.14159 and 1,000,000 and x2y",
    "Line one\nline two\n\n  indented\r\nwindows line ",
    "I'm sure they'll say we'd've LIKED it; don't you?",
    "naïve café, straße, Ελληνικά, русский, 日本語のテキスト, 한국어, emoji 🙂👍🏽",
    "def f(x):\n    return x**2  # comment\n\tpass",
    "   leading and trailing spaces   ",
    "",
)


def _verify_tokenizer(model_dir: Path, meta: dict[str, Any], n_vocab: int, problems: list[str],
                      check_tokenization: bool) -> dict[str, Any]:
    gguf = _gguf()
    hf = _load_hf_tokenizer(model_dir)
    model = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    types: list[int] = meta.get("tokenizer.ggml.token_type") or []
    if len(tokens) != n_vocab or len(types) != n_vocab:
        problems.append(f"{len(tokens)} tokens / {len(types)} token types, the embedding has {n_vocab} rows")
        return {"model": model}
    hf_vocab = {i: t for t, i in hf.get_vocab().items()}
    added = hf.added_tokens_decoder
    summary: dict[str, Any] = {"model": model, "pre": meta.get("tokenizer.ggml.pre"), "n_tokens": len(tokens),
                               "n_hf_tokens": len(hf_vocab)}
    wrong = [i for i, t in hf_vocab.items() if not (i < len(tokens) and _same_token(tokens[i], t, model))]
    if wrong:
        problems.append(f"{len(wrong)} tokens differ from the HF tokenizer's, e.g. id {wrong[0]}: "
                        f"{tokens[wrong[0]] if wrong[0] < len(tokens) else None!r} vs {hf_vocab[wrong[0]]!r}")
    own_pieces = _sp_size(model_dir) if model == "llama" else 0  # their types are checked against sentencepiece
    for i in range(own_pieces, n_vocab):
        if i in added:
            expected = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
        elif i in hf_vocab:
            expected = gguf.TokenType.NORMAL
        else:
            expected = gguf.TokenType.UNUSED
        if types[i] != int(expected):
            problems.append(f"token {i} ({tokens[i]!r}) has type {types[i]}, expected {expected.name}")
            break
    if model == "gpt2":
        hf_merges = _merges(json.loads(hf.backend_tokenizer.to_str())["model"])
        merges = meta.get("tokenizer.ggml.merges") or []
        if merges != hf_merges:
            first = next((i for i, (a, b) in enumerate(zip(merges, hf_merges)) if a != b),
                         min(len(merges), len(hf_merges)))
            problems.append(f"merges differ from the HF tokenizer's ({len(merges)} vs {len(hf_merges)}; "
                            f"first difference at {first})")
        summary["n_merges"] = len(merges)
    elif model == "llama":
        summary.update(_verify_sentencepiece(model_dir, meta, problems))
    else:
        problems.append(f"tokenizer.ggml.model {model!r} is not one tunelab writes")

    expected_ids, _ = _special_ids(model_dir, hf, n_vocab)
    for kind, key in _SPECIAL_ID_KEYS.items():
        actual = meta.get(key)
        if actual != expected_ids.get(kind):
            problems.append(f"{key} is {actual!r}, the HF model gives {expected_ids.get(kind)!r}")
    summary["special_ids"] = expected_ids
    add_bos, add_eos = _adds_special(hf)
    if meta.get("tokenizer.ggml.add_bos_token") != add_bos or meta.get("tokenizer.ggml.add_eos_token") != add_eos:
        problems.append(f"add_bos/add_eos are {meta.get('tokenizer.ggml.add_bos_token')}/"
                        f"{meta.get('tokenizer.ggml.add_eos_token')}, the HF tokenizer adds {add_bos}/{add_eos}")
    template = _chat_template(hf)
    stored_template = meta.get("tokenizer.chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t["name"] == "default"), None)
    if stored_template != template:
        problems.append("tokenizer.chat_template differs from the HF tokenizer's chat template")
    summary["chat_template"] = stored_template is not None
    if check_tokenization and model == "gpt2":
        summary["tokenization_checked"] = _check_bpe_tokenization(hf, meta, problems)
    return summary


def _same_token(stored: str, hf_token: str, model: str | None) -> bool:
    return stored == hf_token or (model == "llama" and stored == hf_token.replace("\u2581", " "))


def _sp_size(model_dir: Path) -> int:
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise TunelabError("checking a SentencePiece vocabulary needs the sentencepiece package") from None
    return SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model")).vocab_size()


def _verify_sentencepiece(model_dir: Path, meta: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    gguf = _gguf()
    space_prefix = sentencepiece_adds_space_prefix(model_dir / "tokenizer.model")
    if meta.get("tokenizer.ggml.add_space_prefix") != space_prefix:
        problems.append(f"tokenizer.ggml.add_space_prefix is {meta.get('tokenizer.ggml.add_space_prefix')!r}, "
                        f"the SentencePiece model's add_dummy_prefix is {space_prefix}")
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        problems.append("the sentencepiece package is needed to check a SentencePiece vocabulary")
        return {}
    sp = SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    tokens, scores, types = (meta.get(k) or [] for k in
                             ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"))
    if len(scores) != len(tokens):
        problems.append(f"{len(scores)} scores for {len(tokens)} tokens")
        return {}
    for i in range(sp.vocab_size()):
        expected_type = (gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                         else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.BYTE if sp.is_byte(i)
                         else gguf.TokenType.NORMAL)
        if tokens[i] != sp.id_to_piece(i) or scores[i] != np.float32(sp.get_score(i)) or types[i] != int(expected_type):
            problems.append(f"SentencePiece piece {i} differs: {(tokens[i], scores[i], types[i])} vs "
                            f"{(sp.id_to_piece(i), sp.get_score(i), int(expected_type))}")
            break
    return {"n_pieces": sp.vocab_size(), "pieces_checked": True, "add_space_prefix": space_prefix}


def _check_bpe_tokenization(hf: Any, meta: dict[str, Any], problems: list[str]) -> int:
    probes = list(_TOKENIZER_PROBES)
    if hf.chat_template:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30?"},
                    {"role": "assistant", "content": "12 + 30 = 42."}]
        try:
            probes.append(hf.apply_chat_template(messages, tokenize=False))
        except Exception as exc:  # a template that needs other roles: still check the plain texts
            problems.append(f"the chat template cannot render a plain conversation: {exc}")
    for text in probes:
        expected = hf.encode(text, add_special_tokens=False)
        actual = gguf_bpe_tokenize(text, meta)
        if actual != expected:
            problems.append(f"llama.cpp-style tokenization of {text[:40]!r} gives {actual[:12]}..., "
                            f"the HF tokenizer {expected[:12]}...")
    return len(probes)
