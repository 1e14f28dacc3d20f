"""Preference and feedback records for the reward model, the DPO family and KTO.

Readers (``format: auto`` picks one per file from the first record's keys):

- ``preference``: ``prompt`` + ``chosen`` + ``rejected``, each either text or a list of
  messages (the canonical JSONL form tunelab writes); LLaMA-Factory's sharegpt style
  (``conversations`` + ``chosen``/``rejected`` turns of from/value); full conversations in
  ``chosen_messages``/``rejected_messages`` or ``chosen``/``rejected`` with no ``prompt``, split
  at their common prefix; HH-RLHF transcripts (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``).
- ``feedback`` (KTO): ``messages`` (or ``prompt`` + ``completion``) and a boolean ``label``.

A pair whose ``rejected`` is empty or equal to ``chosen`` teaches nothing and is a
:class:`DataError`, so ``data.on_error: skip`` counts it instead of training on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from tunelab.data.files import Row
from tunelab.data.records import ROLES, SHAREGPT_ROLES, _text_field, check_roles
from tunelab.errors import DataError

Messages = list[dict[str, str]]
PreferenceFormat = Literal["preference", "feedback"]
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


@dataclass
class Preference:
    """A prompt (messages ending with a user turn) and a chosen and a rejected continuation."""

    prompt: Messages
    chosen: Messages
    rejected: Messages
    source: str = ""


@dataclass
class Feedback:
    """A prompt, one completion and whether it is desirable (KTO)."""

    prompt: Messages
    completion: Messages
    label: bool
    source: str = ""


def _message(raw: Any, name: str) -> dict[str, str]:
    """One {role, content} or {from, value} message."""
    if not isinstance(raw, dict):
        raise DataError(f"'{name}' must hold messages (objects with role and content), got {type(raw).__name__}")
    speaker = raw.get("role", raw.get("from"))
    role = speaker if speaker in ROLES else SHAREGPT_ROLES.get(str(speaker).lower())
    if role is None:
        raise DataError(f"'{name}': unknown role {speaker!r}")
    return {"role": role, "content": _text_field(raw.get("content", raw.get("value")), name)}


def _messages(value: Any, name: str, default_role: str) -> Messages:
    """Text (one message of ``default_role``), one message object, or a list of messages."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):
        return [_message(value, name)]
    if isinstance(value, list):
        return [_message(item, name) for item in value]
    if value is None:
        raise DataError(f"record has no '{name}' field")
    raise DataError(f"'{name}' must be text or a list of messages, got {type(value).__name__}")


def parse_hh_transcript(text: str) -> Messages:
    """Split an HH-RLHF transcript (``\\n\\nHuman: ...\\n\\nAssistant: ...``) into messages."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError("text is not an HH-RLHF transcript ('\\n\\nHuman: ... \\n\\nAssistant: ...')")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": content} for speaker, content in zip(parts[1::2], parts[2::2])]


def _split_common_prefix(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """Full conversations -> (shared prompt, chosen continuation, rejected continuation).

    The prompt ends at the last shared message before the first difference that is not an
    assistant message, so continuations start with the assistant turn that differs.
    """
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and chosen[shared - 1]["role"] == "assistant":
        shared -= 1  # keep the prompt ending on a user/tool turn
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _check_prompt(prompt: Messages) -> None:
    if not prompt or prompt[-1]["role"] not in ("user", "tool"):
        raise DataError("the prompt must end with a user (or tool) message")


def _check_continuation(messages: Messages, name: str) -> None:
    if not messages or messages[0]["role"] != "assistant":
        raise DataError(f"'{name}' must start with an assistant message")
    if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
        raise DataError(f"'{name}' is empty")


def _preference_parts(data: dict[str, Any]) -> tuple[Messages, Messages, Messages]:
    if "chosen_messages" in data or "rejected_messages" in data:
        chosen = _messages(data.get("chosen_messages"), "chosen_messages", "assistant")
        rejected = _messages(data.get("rejected_messages"), "rejected_messages", "assistant")
        return _split_common_prefix(chosen, rejected)
    if "conversations" in data:  # LLaMA-Factory sharegpt preference
        prompt = _messages(data["conversations"], "conversations", "user")
        if data.get("system"):
            prompt.insert(0, {"role": "system", "content": _text_field(data["system"], "system")})
        return (prompt, _messages(data.get("chosen"), "chosen", "assistant"),
                _messages(data.get("rejected"), "rejected", "assistant"))
    chosen_raw, rejected_raw = data.get("chosen"), data.get("rejected")
    if "prompt" in data:
        return (_messages(data["prompt"], "prompt", "user"), _messages(chosen_raw, "chosen", "assistant"),
                _messages(rejected_raw, "rejected", "assistant"))
    if isinstance(chosen_raw, str) and _HH_TURN.match(chosen_raw):
        if not isinstance(rejected_raw, str):
            raise DataError("'rejected' must be an HH-RLHF transcript like 'chosen'")
        return _split_common_prefix(parse_hh_transcript(chosen_raw), parse_hh_transcript(rejected_raw))
    return _split_common_prefix(_messages(chosen_raw, "chosen", "assistant"),
                                _messages(rejected_raw, "rejected", "assistant"))


def to_preference(row: Row, system_prompt: str | None = None) -> Preference:
    """Convert one raw row into a :class:`Preference`.

    Raises:
        DataError: the row is not a usable pair (missing or empty side, identical sides, no
            prompt); the message starts with its source.
    """
    try:
        if not isinstance(row.data, dict):
            raise DataError(f"expected an object, got {type(row.data).__name__}")
        prompt, chosen, rejected = _preference_parts(row.data)
        _check_prompt(prompt)
        _check_continuation(chosen, "chosen")
        _check_continuation(rejected, "rejected")
        check_roles(prompt + chosen)
        check_roles(prompt + rejected)
        if chosen == rejected:
            raise DataError("'chosen' and 'rejected' are identical")
        if system_prompt and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": system_prompt})
    except DataError as exc:
        raise DataError(f"{row.source}: {exc}") from None
    return Preference(prompt, chosen, rejected, row.source)


def to_feedback(row: Row, system_prompt: str | None = None) -> Feedback:
    """Convert one raw row into a KTO :class:`Feedback` record.

    Raises:
        DataError: no boolean label, or the conversation does not end with an assistant answer.
    """
    try:
        data = row.data
        if not isinstance(data, dict):
            raise DataError(f"expected an object, got {type(data).__name__}")
        label = data.get("label")
        if not isinstance(label, bool):
            raise DataError(f"'label' must be true or false, got {label!r}")
        if "messages" in data:
            messages = _messages(data["messages"], "messages", "user")
            end = len(messages)
            while end > 0 and messages[end - 1]["role"] == "assistant":
                end -= 1
            prompt, completion = messages[:end], messages[end:]
        else:
            prompt = _messages(data.get("prompt"), "prompt", "user")
            completion = _messages(data.get("completion"), "completion", "assistant")
        _check_prompt(prompt)
        _check_continuation(completion, "completion")
        check_roles(prompt + completion)
        if system_prompt and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": system_prompt})
    except DataError as exc:
        raise DataError(f"{row.source}: {exc}") from None
    return Feedback(prompt, completion, label, row.source)


def preference_to_json(record: Preference) -> dict[str, Any]:
    """The canonical JSONL object of a pair (``prompt``/``chosen``/``rejected`` message lists)."""
    return {"prompt": record.prompt, "chosen": record.chosen, "rejected": record.rejected}


def feedback_to_json(record: Feedback) -> dict[str, Any]:
    """The canonical JSONL object of a KTO record (``messages`` and ``label``)."""
    return {"messages": record.prompt + record.completion, "label": record.label}
