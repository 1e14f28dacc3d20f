"""Generated tokens -> text, with stop strings, in time linear in the length of the answer.

:class:`TextStream` decodes tokens incrementally (each token costs two decodes of a short window,
never a decode of the whole answer) and finds stop strings with one Knuth-Morris-Pratt automaton
per stop string, fed each new character once. Text that might be the start of a stop string is
held back until it is known not to be; a stop string ends the text where it begins. Streaming and
non-streaming answers go through the same steps, so they are equal.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1000


def _failure_table(pattern: str) -> list[int]:
    """KMP failure function: for each prefix, the length of its longest proper border."""
    table, border = [0] * len(pattern), 0
    for i in range(1, len(pattern)):
        while border and pattern[i] != pattern[border]:
            border = table[border - 1]
        if pattern[i] == pattern[border]:
            border += 1
        table[i] = border
    return table


class _StopAutomaton:
    """Matches one stop string against a stream of characters."""

    def __init__(self, stop: str) -> None:
        self.stop, self.table, self.state = stop, _failure_table(stop), 0

    def feed(self, char: str) -> bool:
        """Advance by one character; True when the stop string ends with it."""
        while self.state and char != self.stop[self.state]:
            self.state = self.table[self.state - 1]
        if char == self.stop[self.state]:
            self.state += 1
        if self.state == len(self.stop):
            self.state = self.table[self.state - 1]
            return True
        return False


class TextStream:
    """Text of a growing list of generated tokens, cut at the first stop string.

    Args:
        tokenizer: decodes the tokens (special tokens skipped).
        stops: stop strings (at most :data:`MAX_STOP_STRINGS`, each at most :data:`MAX_STOP_CHARS`;
            the server checks the limits).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.automata = [_StopAutomaton(s) for s in stops if s]
        self.tokens: list[int] = []
        self._prefix_offset = self._read_offset = 0
        self.text = ""  # decoded so far, cut at a stop string once one is found
        self.emitted = 0  # characters of ``text`` handed out
        self.stopped = False  # a stop string was found

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, tokens: list[int]) -> None:
        """Take newly generated tokens (ignored once a stop string was found)."""
        if self.stopped:
            return
        self.tokens.extend(tokens)
        prefix = self._decode(self.tokens[self._prefix_offset:self._read_offset])
        window = self._decode(self.tokens[self._prefix_offset:])
        if len(window) <= len(prefix) or window.endswith("\ufffd"):
            return  # an incomplete character: wait for the next token
        self._prefix_offset, self._read_offset = self._read_offset, len(self.tokens)
        self._take(window[len(prefix):])

    def _take(self, new: str) -> None:
        start = len(self.text)
        self.text += new
        for offset, char in enumerate(new):
            for automaton in self.automata:
                if automaton.feed(char):
                    self.text = self.text[: start + offset + 1 - len(automaton.stop)]
                    self.stopped = True
                    return

    def finish(self) -> None:
        """No more tokens: decode what an incomplete character held back."""
        if self.stopped or self._read_offset == len(self.tokens):
            return
        prefix = self._decode(self.tokens[self._prefix_offset:self._read_offset])
        window = self._decode(self.tokens[self._prefix_offset:])
        self._read_offset = len(self.tokens)
        if len(window) > len(prefix):
            self._take(window[len(prefix):])

    def pending(self, final: bool = False) -> str:
        """Text not handed out yet; until ``final``, text that may begin a stop string is held back."""
        held = 0 if final or self.stopped else max((a.state for a in self.automata), default=0)
        end = max(self.emitted, len(self.text) - held)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece
