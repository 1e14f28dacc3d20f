"""Tools declared to a model: one rendering for training records and for the server.

A conversation may come with the functions the assistant could call (glaive's sharegpt ``tools``
field, OpenAI-style ``tools`` next to ``messages``). A chat template that reads a ``tools``
variable (Llama 3.1, Qwen 2.5, Hermes, Mistral ...) gets them the way Hugging Face passes them; a
template that does not (tunelab's built-ins, most small models) gets them as a system message. The
server (``tunelab serve``) declares a request's tools through the same function, so a model is
asked at serving time in exactly the words it was trained on.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tunelab.errors import DataError

Tool = dict[str, Any]  # {"type": "function", "function": {"name", "description"?, "parameters"?}}


def template_reads(template: str, variable: str) -> bool:
    """Whether a Jinja chat template uses ``variable`` (a word match on its source)."""
    return re.search(rf"\b{variable}\b", template) is not None


def parse_tools(value: Any) -> list[Tool]:
    """A record's ``tools`` field as OpenAI-style tool objects.

    Accepts a list (or its JSON text, as glaive writes it) of function specs ``{"name", ...}`` or
    of ``{"type": "function", "function": {...}}`` objects; an empty field gives ``[]``.

    Raises:
        DataError: the field is not JSON, not a list, or a tool has no name.
    """
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"'tools' is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, list):
        raise DataError("'tools' must be a list of function specs")
    tools = []
    for index, item in enumerate(value):
        function = item.get("function") if isinstance(item, dict) and item.get("type") == "function" else item
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise DataError(f"'tools' item {index} has no function name")
        tools.append({"type": "function", "function": function})
    return tools


def tools_system_text(tools: list[Tool]) -> str:
    """The system message that declares ``tools`` to a template that cannot."""
    lines = [json.dumps(tool["function"]) for tool in tools]
    return ("You can call these functions:\n" + "\n".join(lines) + "\nTo call a function, answer with only a JSON "
            'object: {"name": <function name>, "arguments": <arguments object>}.')


def declare_tools(template: str, messages: list[dict[str, Any]],
                  tools: list[Tool] | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Messages and ``apply_chat_template`` keyword arguments that declare ``tools``.

    A template that reads ``tools`` gets them as the ``tools`` argument; any other gets them
    appended to the first system message, or as a new one.
    """
    if not tools:
        return messages, {}
    if template_reads(template, "tools"):
        return messages, {"tools": tools}
    declared = tools_system_text(tools)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{declared}"}, *messages[1:]], {}
    return [{"role": "system", "content": declared}, *messages], {}
