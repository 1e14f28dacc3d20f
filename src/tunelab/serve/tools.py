"""Tool calling: chat messages and tools into the prompt, tool calls out of the answer.

Rendering goes through the model's chat template. A template that knows tools (it reads a
``tools`` variable: Llama 3.1, Qwen 2.5, Hermes, Mistral ...) gets them as Hugging Face passes
them (``apply_chat_template(tools=...)``), and assistant ``tool_calls`` and ``role: tool``
messages as HF's chat format has them. A template that does not (tunelab's built-ins, most
small models) gets the tools as a system message and each past call as the assistant text
``{"name": ..., "arguments": {...}}`` — the format tool-call datasets such as glaive (sharegpt
``function_call`` turns) train into a model, so a model fine-tuned with tunelab is asked and
answers in the form it learned.

Answers are read back in either form: a JSON object ``{"name", "arguments"|"parameters"}`` (or a
list of them) naming a declared tool, or such objects inside ``<tool_call>...</tool_call>`` tags.
``tool_choice`` ``required`` or a named function is enforced by the grammar of
:func:`tool_call_schema`, so the answer is always a valid call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from tunelab.data.tool_declarations import declare_tools, template_reads
from tunelab.serve.protocol import APIError, ChatMessage, Tool

_TOOL_TAG = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def _text(content: str | list[dict[str, Any]] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "only text content parts are supported", param=where)
        parts.append(part["text"])
    return "".join(parts)


def _arguments(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        raise APIError(400, f"{where}: arguments are not JSON", param=where) from None
    if not isinstance(value, dict):
        raise APIError(400, f"{where}: arguments must be a JSON object", param=where)
    return value


def call_text(name: str, arguments: dict[str, Any]) -> str:
    """A tool call as the plain-JSON form writes it (also what the grammar produces)."""
    return json.dumps({"name": name, "arguments": arguments})


def template_messages(template: str, messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """API messages as the chat template wants them (see the module doc)."""
    native = template_reads(template, "tool_calls")
    result: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        entry: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                                 "content": _text(message.content, f"{where}.content")}
        if message.name:
            entry["name"] = message.name
        if message.role == "tool" and message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            if message.role != "assistant":
                raise APIError(400, f"{where}.tool_calls: only assistant messages have tool calls", param=where)
            calls = [(c.function.name, _arguments(c.function.arguments, f"{where}.tool_calls"), c.id)
                     for c in message.tool_calls]
            if native:
                entry["tool_calls"] = [{"type": "function", "id": ident, "function": {"name": name, "arguments": args}}
                                       for name, args, ident in calls]
            else:
                written = "\n".join(call_text(name, args) for name, args, _ in calls)
                entry["content"] = f"{entry['content']}\n{written}" if entry["content"] else written
        result.append(entry)
    return result


def render_chat(tokenizer: PreTrainedTokenizerBase, template: str, messages: list[ChatMessage],
                tools: list[Tool] | None) -> str:
    """The prompt text for the next assistant turn.

    Raises:
        APIError: 400 when a message cannot be used or the template fails on the conversation.
    """
    rendered, extra = declare_tools(template, template_messages(template, messages),
                                    [tool.model_dump(exclude_none=True) for tool in tools or []])
    try:
        return tokenizer.apply_chat_template(rendered, chat_template=template, tokenize=False,
                                             add_generation_prompt=True, **extra)
    except TemplateError as exc:
        raise APIError(400, f"the chat template failed on these messages: {exc}", param="messages") from None


def tool_call_schema(tools: list[Tool]) -> dict[str, Any]:
    """The JSON schema of one call to any of ``tools`` (name first, then its arguments)."""
    options = []
    for tool in tools:
        parameters = tool.function.parameters or {"type": "object"}
        options.append({"type": "object", "properties": {"name": {"const": tool.function.name},
                                                         "arguments": parameters},
                        "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


@dataclass
class ParsedCall:
    """A tool call read from an answer."""

    name: str
    arguments: str  # JSON text
    id: str

    def as_api(self) -> dict[str, Any]:
        """The call in a response's ``tool_calls``."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _call(value: Any, names: set[str]) -> ParsedCall | None:
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], json.dumps(arguments), f"call_{uuid.uuid4().hex[:24]}")


def parse_tool_calls(text: str, tools: list[Tool]) -> tuple[str, list[ParsedCall]]:
    """Split an answer into its text and the tool calls it makes (none: the whole text, [])."""
    names = {tool.function.name for tool in tools}
    tagged = _TOOL_TAG.findall(text)
    if tagged:
        calls = []
        for block in tagged:
            try:
                call = _call(json.loads(block), names)
            except json.JSONDecodeError:
                return text, []
            if call is None:
                return text, []
            calls.append(call)
        return text[: text.index("<tool_call>")].strip(), calls
    stripped = text.strip()
    if not stripped.startswith(("{", "[")):
        return text, []
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError:
        return text, []
    values = value if isinstance(value, list) else [value]
    calls = [_call(v, names) for v in values]
    if not calls or any(c is None for c in calls):
        return text, []
    return "", calls  # type: ignore[return-value]


def may_become_call(text: str) -> bool:
    """True while the start of an answer could still turn out to be a tool call (streaming holds it back)."""
    stripped = text.lstrip()
    return not stripped or stripped.startswith(("{", "[")) or "<tool_call>".startswith(stripped[:11]) \
        or stripped.startswith("<tool_call>")
