"""Chat templates and label masks.

A conversation is rendered to text with a Jinja chat template (the tokenizer's own, or a built-in
one), tokenized once as a whole (so training sees exactly the tokens inference sees), and each
token is marked trained or masked by the character span it came from. Every assistant turn ends
with a trained stop token: the template's end-of-turn token when it is a stop token, else EOS is
added. Masks come from token positions, never from token ids, so ``pad == eos`` cannot mask EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from tunelab.data.tool_declarations import declare_tools
from tunelab.errors import DataError

IGNORE_INDEX = -100

TemplateName = Literal["auto", "tokenizer", "chatml", "gemma", "llama3", "alpaca", "plain"]
TrainOn = Literal["assistant", "all", "last_assistant"]

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
    ),
    # Gemma's turn format (its instruct tokenizers' template, for string contents): a system message is
    # folded into the first user turn, the assistant's role is "model", contents are trimmed.
    "gemma": (
        "{{- bos_token -}}"
        "{%- set prefix = messages[0]['content'] + '\n\n' if messages and messages[0]['role'] == 'system' else '' -%}"
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
        "{{- (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
    ),
    "llama3": (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
    ),
    "alpaca": (
        "{%- if messages and messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + '\n\n' }}"
        "{%- else -%}{{ 'Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n' }}{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '### Response:\n' }}{%- endif -%}"
    ),
    "plain": (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}{{ message['content'] + eos_token + '\n' }}"
        "{%- else -%}{{ message['content'] + '\n' }}{%- endif -%}"
        "{%- endfor -%}"
    ),
}


NO_TEMPLATE = (
    "the tokenizer has no chat template (a base model?), so conversations cannot be rendered the way the model "
    "expects. Choose one: data.template: {names} to fine-tune it on conversations in that format, or "
    "train.objective: pretrain to train on plain text"
)


def resolve_template(tokenizer: PreTrainedTokenizerBase, name: TemplateName, fallback: str | None = None) -> str:
    """The Jinja template to use: the tokenizer's own for auto/tokenizer, else the named built-in.

    Args:
        tokenizer: the model's tokenizer.
        name: ``auto`` or ``tokenizer`` (the tokenizer's own), or a built-in template's name.
        fallback: the built-in that ``auto`` uses when the tokenizer has none (inference on a base
            model); None (training, evaluation) makes that an error that names the choices.

    Raises:
        DataError: the tokenizer has no chat template and none was named (or ``tokenizer`` was asked for).
    """
    own = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if name in ("auto", "tokenizer"):
        if own:
            return own
        if name == "auto" and fallback is not None:
            return BUILTIN_TEMPLATES[fallback]
        raise DataError(f"data.template: {name}, but " + NO_TEMPLATE.format(names="|".join(BUILTIN_TEMPLATES)))
    return BUILTIN_TEMPLATES[name]


@dataclass
class Rendered:
    """A tokenized conversation: ids, labels (IGNORE_INDEX where masked) and the text."""

    input_ids: list[int]
    labels: list[int]
    text: str


def _render(tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict], generation_prompt: bool,
            tools: list[dict] | None = None) -> str:
    messages, extra = declare_tools(template, messages, tools)
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt, **extra
    )


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict], tools: list[dict] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and find the character span of every assistant turn.

    A turn's span runs from the end of the generation prompt to the end of the turn, including
    its end-of-turn token and excluding whitespace the template puts after it. ``tools`` are
    declared as :func:`~tunelab.data.tool_declarations.declare_tools` does (as the server does).

    Returns:
        The full text and one ``(start, end)`` span per assistant message, in order.

    Raises:
        DataError: the template fails on these messages, or it renders a prefix of the
            conversation differently from the whole (so turns cannot be located).
    """
    try:
        full = _render(tokenizer, template, messages, generation_prompt=False, tools=tools)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = _render(tokenizer, template, messages[:i], generation_prompt=True, tools=tools) if i else ""
            through = _render(tokenizer, template, messages[: i + 1], generation_prompt=False, tools=tools)
            if not (through.startswith(before) and full.startswith(through)):
                raise DataError(
                    "the chat template renders the conversation differently when cut after a turn, "
                    "so assistant turns cannot be located; set data.template to a built-in template"
                )
            end = len(through.rstrip())
            spans.append((len(before), max(end, len(before))))
    except TemplateError as exc:
        raise DataError(f"the chat template failed on this conversation: {exc}") from None
    return full, spans


def render_conversation(
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    messages: list[dict],
    train_on: TrainOn,
    stop_ids: set[int],
    skip_assistant_turns: int = 0,
    tools: list[dict] | None = None,
) -> Rendered:
    """Tokenize a conversation and label the tokens that train.

    Args:
        tokenizer: a fast tokenizer (offsets are needed).
        template: Jinja chat template.
        messages: ``[{"role", "content"}]``.
        train_on: ``assistant`` (every assistant turn), ``last_assistant`` or ``all`` tokens.
        stop_ids: token ids that end a turn at inference (EOS and end-of-turn ids). Each trained
            assistant turn ends with one; EOS is inserted after a turn that does not.
        skip_assistant_turns: leave the first N assistant turns untrained (they belong to the
            prompt of a preference pair, and only the continuation is scored).
        tools: functions declared to the model (see :func:`assistant_spans`).

    Returns:
        ids and labels of equal length; the first label is always IGNORE_INDEX (nothing predicts it).
    """
    text, spans = assistant_spans(tokenizer, template, messages, tools)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoding["input_ids"])
    offsets: list[tuple[int, int]] = list(encoding["offset_mapping"])
    spans = spans[skip_assistant_turns:]
    trained_spans = spans[-1:] if train_on == "last_assistant" else spans

    # Token index range of each span: tokens overlapping its characters.
    token_ranges: list[tuple[int, int]] = []
    for start, end in trained_spans if train_on != "all" else spans:
        first = next((k for k, (s, e) in enumerate(offsets) if e > start), len(ids))
        last = next((k for k in range(len(offsets) - 1, -1, -1) if offsets[k][0] < end), -1)
        token_ranges.append((first, last + 1))

    eos = tokenizer.eos_token_id
    inserts: list[int] = []  # token positions after which EOS must be added
    for first, stop in token_ranges:
        if stop <= first or ids[stop - 1] not in stop_ids:
            if eos is None:
                raise DataError("the tokenizer has no EOS token, so assistant turns cannot be ended")
            inserts.append(stop)

    trained = [train_on == "all"] * len(ids)
    if train_on != "all":
        for first, stop in token_ranges:
            for k in range(first, stop):
                trained[k] = True
    for position in sorted(inserts, reverse=True):
        ids.insert(position, eos)
        trained.insert(position, True)
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids, trained)]
    if labels:
        labels[0] = IGNORE_INDEX
    return Rendered(input_ids=ids, labels=labels, text=text)


def render_prompt(tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict],
                  tools: list[dict] | None = None) -> str:
    """The text that asks the model for the next assistant turn (for generation), ``tools`` declared."""
    try:
        return _render(tokenizer, template, messages, generation_prompt=True, tools=tools)
    except TemplateError as exc:
        raise DataError(f"the chat template failed on this conversation: {exc}") from None
