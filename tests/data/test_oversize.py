"""A record far longer than data.max_length is cut before tokenization: same tokens, bounded cost."""

from __future__ import annotations

import random

import pytest

from tunelab.data.oversize import cut_messages, raw_byte_limit
from tunelab.data.pair_tokenize import PairTokenizer
from tunelab.data.templates import resolve_template
from tunelab.data.tokenize import _Tokenizer

WORDS = "the cat sat on a mat and 12345 ünïcode 😀 tabs\t\tnewlines\n".split(" ")


def long_text(words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def conversations() -> list[list[dict]]:
    text = long_text(4_000)  # about 20 KB: twice the byte limit of max_length 128
    return [
        [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}],
        [{"role": "user", "content": "q " * 40}, {"role": "assistant", "content": text}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": text},
         {"role": "user", "content": "more"}, {"role": "assistant", "content": "done"}],
    ]


@pytest.mark.parametrize("train_on", ["assistant", "last_assistant", "all"])
@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_cut_record_gives_the_tokens_truncation_keeps(tokenizer, train_on: str, overlong: str) -> None:
    template = resolve_template(tokenizer, "auto")
    stop = {tokenizer.eos_token_id}
    cut = _Tokenizer(tokenizer, template, train_on, 128, overlong, stop, "conversations")
    whole = _Tokenizer(tokenizer, template, train_on, 128, overlong, stop, "conversations")
    whole.byte_limit = 10**12  # never cut
    for messages in conversations():
        assert len(str(messages).encode()) > cut.byte_limit  # each one is cut
        assert cut._conversation(messages) == whole._conversation(messages)


def test_pairs_are_cut_the_same_way(tokenizer) -> None:
    template = resolve_template(tokenizer, "auto")
    cut = PairTokenizer(tokenizer, template, 96, "truncate", {tokenizer.eos_token_id})
    whole = PairTokenizer(tokenizer, template, 96, "truncate", {tokenizer.eos_token_id})
    whole.byte_limit = 10**12
    prompt = [{"role": "user", "content": "Write."}]
    for answer in (long_text(4_000, 1), "short"):
        messages = prompt + [{"role": "assistant", "content": answer}]
        assert cut._sequence(messages, 0, "chosen") == whole._sequence(messages, 0, "chosen")


def test_a_30_mb_record_is_never_tokenized_whole(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    template = resolve_template(tokenizer, "auto")
    seen: list[int] = []
    original = type(tokenizer).__call__

    def spy(self, text, *args, **kwargs):
        seen.append(len(text))
        return original(self, text, *args, **kwargs)

    fn = _Tokenizer(tokenizer, template, "assistant", 128, "truncate", {tokenizer.eos_token_id}, "conversations")
    messages = [{"role": "user", "content": "Write a long text."}, {"role": "assistant", "content": "x" * 30_000_000}]
    monkeypatch.setattr(type(tokenizer), "__call__", spy)
    (ids, labels, flag), = fn._conversation(messages)
    assert (len(ids), flag) == (128, "truncated")
    assert max(seen) < raw_byte_limit(tokenizer, 128) + 1000  # the template's text around the cut contents


def test_cut_keeps_every_message_and_whole_characters() -> None:
    messages = [{"role": "user", "content": "é" * 10}, {"role": "assistant", "content": "abc"}]
    cut = cut_messages(messages, 5)  # 2 bytes per é: two whole characters fit
    assert cut == [{"role": "user", "content": "éé"}, {"role": "assistant", "content": ""}]
