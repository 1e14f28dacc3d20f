"""llama.cpp's byte-level BPE tokenization (a ``gpt2`` vocabulary) re-implemented in Python.

Used to check an export without llama.cpp: the pre-tokenizer presets tunelab knows, each as the
regexes llama.cpp splits text with, and the split / byte-encode / merge algorithm.
"""

from __future__ import annotations

import math
from typing import Any

from tunelab.errors import TunelabError

# llama.cpp's pre-tokenizer presets (``tokenizer.ggml.pre``) that tunelab recognises in a
# tokenizer.json, each as the regexes llama.cpp splits text with, in order (llama-vocab.cpp). The
# GPT-2 expression is written as in HF's ByteLevel pre-tokenizer (a trailing ``|\s+``), which splits
# the same pieces as llama.cpp's custom GPT-2 splitter.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_PRESETS: dict[str, tuple[str, ...]] = {
    "gpt-2": (_GPT2_REGEX,),
    "starcoder": (r"\p{N}", _GPT2_REGEX),  # every digit its own piece, then GPT-2
    "llama-bpe": (_LLAMA3_REGEX,),
    "qwen2": (_QWEN2_REGEX,),
}
_IGNORE_MERGES_PRESETS = ("llama-bpe",)  # llama.cpp looks whole words up before merging only for these


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE tokens)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def gguf_bpe_tokenize(text: str, meta: dict[str, Any]) -> list[int]:
    """Tokenize ``text`` the way llama.cpp does with a ``gpt2`` GGUF vocabulary (special tokens parsed).

    Control and user-defined tokens are matched first (longest first); the rest is split with the
    regexes of the file's pre-tokenizer preset, byte-level encoded and merged by merge rank.
    Written to check an export without llama.cpp; not fast.
    """
    import regex

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta["tokenizer.ggml.token_type"]
    preset = meta.get("tokenizer.ggml.pre", "gpt-2")
    if preset not in PRE_TOKENIZER_PRESETS:
        raise TunelabError(f"pre-tokenizer preset {preset!r} is not one tunelab can reproduce")
    token_to_id = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(meta.get("tokenizer.ggml.merges") or [])}
    specials = sorted((t for t, ty in zip(tokens, types) if ty in (3, 4)), key=len, reverse=True)
    byte_map = _bytes_to_unicode()
    ignore_merges = preset in _IGNORE_MERGES_PRESETS
    patterns = [regex.compile(p) for p in PRE_TOKENIZER_PRESETS[preset]]

    def split_words(fragment: str) -> list[str]:
        pieces = [fragment]
        for pattern in patterns:
            out: list[str] = []
            for piece in pieces:
                pos = 0
                for match in pattern.finditer(piece):
                    if match.start() > pos:
                        out.append(piece[pos:match.start()])
                    if match.group():
                        out.append(match.group())
                    pos = match.end()
                if pos < len(piece):
                    out.append(piece[pos:])
            pieces = out
        return pieces

    def bpe(word: str) -> list[int]:
        encoded = "".join(byte_map[b] for b in word.encode("utf-8"))
        if ignore_merges and encoded in token_to_id:
            return [token_to_id[encoded]]
        symbols = list(encoded)
        while len(symbols) > 1:
            pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
            rank, i = min(pairs)
            if rank == math.inf:
                break
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        ids = []
        for symbol in symbols:
            if symbol in token_to_id:
                ids.append(token_to_id[symbol])
            else:  # llama.cpp falls back to the single-byte tokens
                ids.extend(token_to_id[c] for c in symbol)
        return ids

    special_re = regex.compile("|".join(regex.escape(s) for s in specials)) if specials else None
    ids: list[int] = []
    pos = 0
    fragments: list[tuple[str, bool]] = []
    if special_re is not None:
        for match in special_re.finditer(text):
            fragments.append((text[pos:match.start()], False))
            fragments.append((match.group(), True))
            pos = match.end()
    fragments.append((text[pos:], False))
    for fragment, is_special in fragments:
        if is_special:
            ids.append(token_to_id[fragment])
        elif fragment:
            for word in split_words(fragment):
                ids.extend(bpe(word))
    return ids
