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


NATIVE_TEMPLATE = (  # a template that knows tools, shaped like Qwen 2.5's
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}>"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function.name }}({{ c.function.arguments.q }})"
    "</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}</{{ m.role }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_tools_and_calls_reach_a_template_as_it_expects(tokenizer):
    from tunelab.data.templates import BUILTIN_TEMPLATES
    from tunelab.serve.protocol import ChatMessage
    from tunelab.serve.tools import render_chat

    messages = [ChatMessage(role="user", content="find cats"),
                ChatMessage(role="assistant", tool_calls=[{"id": "call_1", "function": {
                    "name": "search", "arguments": '{"q": "cats"}'}}]),
                ChatMessage(role="tool", tool_call_id="call_1", content="3 cats")]
    native = render_chat(tokenizer, NATIVE_TEMPLATE, messages, TOOLS)
    assert native.startswith("<tools>search;lookup;</tools>") and "<tool_call>search(cats)</tool_call>" in native
    assert native.endswith("<tool>3 cats</tool>\n<assistant>")
    plain = render_chat(tokenizer, BUILTIN_TEMPLATES["chatml"], messages, TOOLS)
    assert plain.startswith("<|im_start|>system\nYou can call these functions:") and '"name": "lookup"' in plain
    assert '<|im_start|>assistant\n{"name": "search", "arguments": {"q": "cats"}}<|im_end|>' in plain
    assert "<|im_start|>tool\n3 cats<|im_end|>" in plain


def test_streaming_holds_back_only_what_may_be_a_call():
    assert may_become_call("") and may_become_call("  {") and may_become_call("<tool") and may_become_call("<tool_call>{")
    assert not may_become_call("Hello") and not may_become_call("<b>")
    schema = tool_call_schema(TOOLS)
    assert [o["properties"]["name"]["const"] for o in schema["anyOf"]] == ["search", "lookup"]
    assert tool_call_schema(TOOLS[:1])["properties"]["arguments"] == {"type": "object"}
