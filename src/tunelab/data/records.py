"""Canonical records and the readers that turn file formats into them.

Formats: ``alpaca`` (instruction/input/output/system/history), ``sharegpt`` (conversations of
from/value), ``messages`` (OpenAI role/content) and ``text``; the conversation formats may carry
``tools`` (the functions the assistant could call). Each reader validates a row and
raises :class:`DataError` for a row that cannot be used; :mod:`tunelab.data.readers` reads files
through them (stopping at the first bad row, or skipping it and counting why).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from tunelab.data.files import Row
from tunelab.data.tool_declarations import parse_tools
from tunelab.errors import DataError

Format = Literal["alpaca", "sharegpt", "messages", "qa", "text"]
ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "function_call": "assistant",
    "system": "system",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}


@dataclass
class Conversation:
    """Messages ``[{role, content}]`` for SFT; ``source`` is the ``file:line`` it came from.

    ``tools`` are the functions the assistant could call (OpenAI-style ``{"type": "function",
    "function": {...}}``), declared to the model when the conversation is rendered.
    """

    messages: list[dict[str, str]]
    source: str = ""
    tools: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Text:
    """Raw text for continued pretraining."""

    text: str
    source: str = ""


@dataclass
class Prompt:
    """Messages to answer (ending with a user or tool turn) and an optional reference answer."""

    messages: list[dict[str, str]]
    reference: str | None = None
    source: str = ""
    tools: list[dict[str, Any]] = field(default_factory=list)


Record = Conversation | Text


@dataclass
class LoadReport:
    """What was read and what was skipped (and why) from the data files."""

    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, source: str) -> None:
        """Count a skipped record under its reason, remembering the first place it happened."""
        self.skipped[reason] += 1
        self.examples.setdefault(reason, source)

    def summary(self) -> str:
        """One line per skip reason, e.g. ``3 skipped: record has no 'output' field (first at a.json:7)``."""
        return "\n".join(
            f"{count} skipped: {reason} (first at {self.examples[reason]})" for reason, count in self.skipped.most_common()
        )


def detect_format(data: Any, source: str) -> Format:
    """Guess the format of a raw row from its keys.

    Raises:
        DataError: nothing matches; the message lists the keys found.
    """
    if isinstance(data, str):
        return "text"
    if not isinstance(data, dict):
        raise DataError(f"{source}: expected an object per record, got {type(data).__name__}")
    if "messages" in data:
        return "messages"
    if "conversations" in data:
        return "sharegpt"
    if "instruction" in data or ("output" in data and "input" in data):
        return "alpaca"
    if "question" in data and "answer" in data:
        return "qa"
    if "text" in data:
        return "text"
    raise DataError(
        f"{source}: cannot detect the data format from keys {sorted(data)}; "
        "expected messages, conversations, instruction/output, question/answer or text (or set data.format)"
    )


def _text_field(value: Any, name: str, required: bool = True) -> str:
    if value is None:
        if required:
            raise DataError(f"record has no '{name}' field")
        return ""
    if isinstance(value, list):  # content parts: [{"type": "text", "text": ...}]
        parts = []
        for part in value:
            if isinstance(part, dict) and isinstance(part.get("text", part.get("value")), str):
                parts.append(part.get("text", part.get("value")))
            else:
                raise DataError(f"'{name}' holds a non-text part ({part!r:.60}); only text is supported")
        value = "".join(parts)
    if not isinstance(value, str):
        raise DataError(f"'{name}' must be text, got {type(value).__name__}")
    return value


def check_roles(messages: list[dict[str, str]]) -> None:
    """Raise unless the roles come in an order a chat template can render and a model should learn.

    An optional system message first; then the user speaks first, user and assistant take turns,
    and tool results follow the assistant message that called the tool (the assistant answers
    after them). Templates that do not check this render such conversations silently, and the
    model learns a dialogue that never happens.

    Raises:
        DataError: naming the first message (1-based) that is out of order.
    """
    previous = None
    for number, message in enumerate(messages, start=1):
        role = message["role"]
        if role == "system":
            if number > 1:
                raise DataError(f"message {number} is a system message; only the first message may be one")
            continue
        if previous is None and role != "user":
            raise DataError(f"message {number} is a {role} message, but the conversation must start with the user "
                            "(after an optional system message)")
        if role == previous and role in ("user", "assistant"):
            raise DataError(f"messages {number - 1} and {number} are both {role} messages; user and assistant "
                            "must take turns (merge the two, or fix the roles)")
        if role == "tool" and previous not in ("assistant", "tool"):
            raise DataError(f"message {number} is a tool result after a {previous} message; tool results follow "
                            "the assistant message that called the tool")
        if role == "user" and previous == "tool":
            raise DataError(f"message {number} is a user message right after a tool result; the assistant "
                            "answers after tool results")
        previous = role


def _check_conversation(messages: list[dict[str, str]]) -> None:
    if not messages:
        raise DataError("conversation has no messages")
    check_roles(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("conversation has no assistant message")
    for message in messages:
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError("assistant message is empty")


def _from_alpaca(data: dict[str, Any]) -> Conversation:
    if "output" not in data:
        raise DataError("record has no 'output' field")
    instruction = _text_field(data.get("instruction"), "instruction", required=False)
    extra = _text_field(data.get("input"), "input", required=False)
    output = _text_field(data["output"], "output")
    messages: list[dict[str, str]] = []
    system = _text_field(data.get("system"), "system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = data.get("history") or []
    if not isinstance(history, list):
        raise DataError("'history' must be a list of [user, assistant] pairs")
    for turn in history:
        if not (isinstance(turn, list | tuple) and len(turn) == 2):
            raise DataError("'history' must be a list of [user, assistant] pairs")
        messages.append({"role": "user", "content": _text_field(turn[0], "history")})
        messages.append({"role": "assistant", "content": _text_field(turn[1], "history")})
    user = f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra
    if not user.strip():
        raise DataError("'instruction' and 'input' are both empty")
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return Conversation(messages)


def _from_sharegpt(data: dict[str, Any]) -> Conversation:
    turns = data.get("conversations")
    if not isinstance(turns, list):
        raise DataError("'conversations' must be a list of {from, value} turns")
    messages: list[dict[str, str]] = []
    system = _text_field(data.get("system"), "system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    for turn in turns:
        if not isinstance(turn, dict):
            raise DataError("each turn in 'conversations' must be an object")
        speaker = turn.get("from", turn.get("role"))
        role = SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            raise DataError(f"unknown speaker {speaker!r} (expected one of {', '.join(sorted(SHAREGPT_ROLES))})")
        content = _text_field(turn.get("value", turn.get("content")), "value")
        messages.append({"role": role, "content": content})
    return Conversation(messages, tools=parse_tools(data.get("tools")))


def _from_messages(data: dict[str, Any]) -> Conversation:
    raw = data.get("messages")
    if not isinstance(raw, list):
        raise DataError("'messages' must be a list of {role, content} objects")
    messages = []
    for message in raw:
        if not isinstance(message, dict):
            raise DataError("each message must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"unknown role {role!r} (expected one of {', '.join(sorted(ROLES))})")
        messages.append({"role": role, "content": _text_field(message.get("content"), "content")})
    return Conversation(messages, tools=parse_tools(data.get("tools")))


def _from_text(data: Any, text_field: str) -> Text:
    if not isinstance(data, str | dict):
        raise DataError(f"expected a string or an object with a '{text_field}' field, got {type(data).__name__}")
    text = data if isinstance(data, str) else _text_field(data.get(text_field), text_field)
    if not text.strip():
        raise DataError("text is empty")
    return Text(text)


def _from_qa(data: dict[str, Any]) -> Conversation:
    question = _text_field(data.get("question"), "question")
    if not question.strip():
        raise DataError("'question' is empty")
    return Conversation([{"role": "user", "content": question},
                         {"role": "assistant", "content": _text_field(data.get("answer"), "answer")}])


CONVERTERS: dict[str, Callable[[Any], Conversation]] = {
    "alpaca": _from_alpaca,
    "sharegpt": _from_sharegpt,
    "messages": _from_messages,
    "qa": _from_qa,
}


def to_record(row: Row, fmt: Format, text_field: str = "text", system_prompt: str | None = None) -> Record:
    """Convert one raw row into a canonical record.

    Raises:
        DataError: the row is not a valid record of this format; the message starts with its source.
    """
    try:
        if fmt == "text":
            record: Record = _from_text(row.data, text_field)
        else:
            if not isinstance(row.data, dict):
                raise DataError(f"expected an object, got {type(row.data).__name__}")
            record = CONVERTERS[fmt](row.data)
            _check_conversation(record.messages)
            if system_prompt and record.messages[0]["role"] != "system":
                record.messages.insert(0, {"role": "system", "content": system_prompt})
    except DataError as exc:
        raise DataError(f"{row.source}: {exc}") from None
    record.source = row.source
    return record


def to_prompt(row: Row, fmt: Format, text_field: str = "text", system_prompt: str | None = None) -> Prompt:
    """Convert one raw row into a prompt: a final assistant turn, or a ``reference`` field, is the reference.

    Records without an answer are valid prompts (alpaca without ``output``, a conversation
    ending with the user); their reference is None.

    Raises:
        DataError: the row cannot be read as a prompt; the message starts with its source.
    """
    try:
        if fmt == "text":
            raise DataError("a plain-text record is not a prompt (expected a conversation or instruction)")
        if not isinstance(row.data, dict):
            raise DataError(f"expected an object, got {type(row.data).__name__}")
        data = row.data
        if fmt == "alpaca" and data.get("output") is None:
            data = {**data, "output": ""}
        if fmt == "qa" and data.get("answer") is None:
            data = {**data, "answer": ""}
        conversation = CONVERTERS[fmt](data)
        messages = conversation.messages
        reference = _text_field(data.get("reference"), "reference", required=False) or None
        if messages and messages[-1]["role"] == "assistant":
            reference = messages.pop()["content"] or reference
        if not any(m["role"] == "user" for m in messages):
            raise DataError("prompt has no user message")
        check_roles(messages)
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
    except DataError as exc:
        raise DataError(f"{row.source}: {exc}") from None
    return Prompt(messages, reference, row.source, conversation.tools)


def record_to_json(record: Conversation | Text | Prompt) -> dict[str, Any]:
    """The canonical JSONL object of a record: ``{"messages"}``, ``{"text"}`` or ``{"messages", "reference"}``.

    These are the objects ``tunelab data`` writes; every reader here reads them back unchanged.
    """
    if isinstance(record, Text):
        return {"text": record.text}
    tools = {"tools": record.tools} if record.tools else {}
    if isinstance(record, Prompt):
        return {"messages": record.messages, "reference": record.reference, **tools}
    return {"messages": record.messages, **tools}
