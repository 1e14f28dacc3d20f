"""Records far longer than ``data.max_length``, cut before tokenization so they cost little.

Tokenizing a 30 MB conversation to keep its first 128 tokens took 13 GB and 57 s. No token of a
tokenizer covers more than ``longest_token_bytes`` bytes of text, so a conversation whose messages
hold more than :func:`raw_byte_limit` bytes is certainly longer than ``max_length`` tokens, and
its first ``max_length`` tokens lie inside the first ``raw_byte_limit`` bytes. Cutting the messages
there (keeping every message, so the roles and the template's structure stay the same) gives the
same ids and labels after truncation, at a bounded cost; ``data.overlong: drop`` drops such a
record without tokenizing it at all.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# Normalizers may shrink text (composing accents, stripping them); a margin of 4x covers them,
# and 64 tokens cover a pre-token that straddles the cut.
_SAFETY = 4
_MARGIN_TOKENS = 64


def longest_token_bytes(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most UTF-8 bytes any token's text (as stored in the vocabulary) takes; an upper bound per token."""
    return max((len(token.encode("utf-8")) for token in tokenizer.get_vocab()), default=1)


def raw_byte_limit(tokenizer: PreTrainedTokenizerBase, max_length: int) -> int:
    """Bytes of message text past which a conversation is certainly longer than ``max_length`` tokens."""
    return _SAFETY * longest_token_bytes(tokenizer) * (max_length + _MARGIN_TOKENS)


def message_bytes(messages: list[dict]) -> int:
    """UTF-8 size of all message contents (counted without encoding when the text is ASCII-sized)."""
    return sum(len(m["content"].encode("utf-8")) for m in messages)


def cut_messages(messages: list[dict], limit: int) -> list[dict]:
    """The messages with their contents cut so that all together hold at most ``limit`` bytes.

    Every message is kept (later ones with empty content), so the rendering up to the cut, and
    therefore the first ``max_length`` tokens and their labels, are those of the whole conversation.
    """
    room, out = limit, []
    for message in messages:
        data = message["content"].encode("utf-8")
        if len(data) > room:
            data = data[:room]
        room -= len(data)
        out.append({**message, "content": data.decode("utf-8", errors="ignore")})
    return out
