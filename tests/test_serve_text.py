"""Stop strings in linear time, and tool calls read back from answers (no server needed)."""

from __future__ import annotations

import json
import random
import time

import pytest

from tunelab.serve.protocol import Tool
from tunelab.serve.text_stream import TextStream, _StopAutomaton
from tunelab.serve.tools import may_become_call, parse_tool_calls, tool_call_schema


class CharTokenizer:
    """One token per character (id = code point), for exercising TextStream without a model."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def streamed(text: str, stops: list[str], final: bool = True) -> tuple[str, bool]:
    stream = TextStream(CharTokenizer(), stops)
    out = ""
    for char in text:
        stream.add([ord(char)])
        out += stream.pending()
        assert stream.text.startswith(out)  # nothing handed out is ever taken back
    stream.finish()
    return out + stream.pending(final=final), stream.stopped


def test_the_first_completed_stop_cuts_where_it_begins():
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("aab") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        # as a server checks after each character: the stop completed first (ties: the first listed) wins
        ends = [(text.find(s) + len(s), k) for k, s in enumerate(stops) if text.find(s) >= 0]
        expected = text
        if ends:
            end, k = min(ends)
            expected = text[: end - len(stops[k])]
        assert streamed(text, stops) == (expected, bool(ends)), (text, stops)


def test_a_possible_stop_is_held_back_until_it_is_not():
    stream = TextStream(CharTokenizer(), ["STOP"])
    stream.add([ord(c) for c in "abST"])
    assert stream.pending() == "ab"  # "ST" may begin STOP
    stream.add([ord("x")])
    assert stream.pending() == "STx"


def test_stop_matching_is_linear():
    stop = "a" * 999 + "b"  # the worst case for a naive matcher: every position almost matches
    automaton, text = _StopAutomaton(stop), "a" * 200_000
    started = time.perf_counter()
    assert not any(automaton.feed(c) for c in text)
    assert time.perf_counter() - started < 2.0  # ~0.1 s here; a quadratic check takes minutes
    assert automaton.feed("b")


TOOLS = [Tool.model_validate({"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}),
         Tool.model_validate({"type": "function", "function": {"name": "lookup"}})]


@pytest.mark.parametrize(("text", "names", "content"), [
    ('{"name": "search", "arguments": {"q": "cats"}}', ["search"], ""),
    ('  {"name": "lookup", "parameters": {"id": 3}}\n', ["lookup"], ""),
    ('[{"name": "search", "arguments": {}}, {"name": "lookup", "arguments": "{\\"id\\": 1}"}]', ["search", "lookup"], ""),
    ('Let me check.<tool_call>\n{"name": "search", "arguments": {"q": 1}}\n</tool_call>', ["search"], "Let me check."),
    ('{"name": "unknown", "arguments": {}}', [], None),
    ('{"name": "search", "arguments": [1]}', [], None),
    ("The answer is 4.", [], None),
    ('{"name": "search", "arguments": {', [], None),
])
def test_tool_calls_are_parsed_from_either_form(text, names, content):
    rest, calls = parse_tool_calls(text, TOOLS)
    assert [c.name for c in calls] == names
    assert rest == (text if content is None else content)
    for call in calls:
        assert isinstance(json.loads(call.arguments), dict) and call.id.startswith("call_")


def test_streaming_holds_back_only_what_may_be_a_call():
    assert may_become_call("") and may_become_call("  {") and may_become_call("<tool") and may_become_call("<tool_call>{")
    assert not may_become_call("Hello") and not may_become_call("<b>")
    schema = tool_call_schema(TOOLS)
    assert [o["properties"]["name"]["const"] for o in schema["anyOf"]] == ["search", "lookup"]
    assert tool_call_schema(TOOLS[:1])["properties"]["arguments"] == {"type": "object"}
