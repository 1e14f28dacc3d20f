"""A request, before it reaches the engine: the prompt rendered and tokenized, its grammar compiled, its
token budget fixed. Runs in a worker thread (never on the event loop); every problem is a 400 that names
the field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.serve.grammar import GrammarError, TokenConstraint
from tunelab.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, NamedToolChoice, Tool
from tunelab.serve.state import ServeSettings, ServeState
from tunelab.serve.tools import render_chat, tool_call_schema


@dataclass
class Job:
    """What a request asks of the engine, prepared off the event loop."""

    prompt_ids: list[int]
    prompt_text: str
    constraint: TokenConstraint | None = None
    schema: dict[str, Any] | None = None  # the JSON schema ``constraint`` enforces
    tools: list[Tool] | None = None  # tools whose calls are read back from the answer
    forced_call: bool = False  # the grammar makes the answer a tool call


def check_ids(ids: list[int], vocab_size: int, param: str) -> None:
    """Refuse token ids outside the vocabulary (400 naming ``param``)."""
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise APIError(400, f"{param}: token id {bad} is outside this model's vocabulary (0-{vocab_size - 1})",
                       param=param)


def tokenize_prompt(state: ServeState, text: str, add_special_tokens: bool, param: str) -> list[int]:
    """Token ids of ``text``; a text too long to fit is refused before it is tokenized."""
    limit = state.settings.max_prompt_tokens
    if len(text) > limit * state.max_token_chars:
        raise APIError(400, f"the prompt has {len(text)} characters, more than the {limit} tokens this server "
                            f"accepts at most can hold", param=param)
    return list(state.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def prepare(state: ServeState, endpoint: str, body: ChatCompletionRequest | CompletionRequest) -> Job:
    """Render, tokenize and compile the grammar of a request (runs in a worker thread).

    Raises:
        APIError: a prompt or a schema that cannot be used.
    """
    tokenizer, settings = state.tokenizer, state.settings
    if isinstance(body, ChatCompletionRequest):
        tools = body.tools if body.tools and body.tool_choice != "none" else None
        text = render_chat(tokenizer, state.template, body.messages, tools)
        job = Job(tokenize_prompt(state, text, False, "messages"), text, tools=tools)
        choice = body.tool_choice or "auto"
        if tools and choice != "auto":
            chosen = tools
            if isinstance(choice, NamedToolChoice):
                chosen = [t for t in tools if t.function.name == choice.function.name]
                if not chosen:
                    raise APIError(400, f"tool_choice: no tool named {choice.function.name!r}", param="tool_choice")
            job.schema, job.forced_call = tool_call_schema(chosen), True
            job.constraint = compile_schema(state, job.schema, "tools")
        if body.response_format is not None and body.response_format.type != "text":
            job.schema = {"type": "object"} if body.response_format.type == "json_object" else \
                body.response_format.json_schema.schema_  # type: ignore[union-attr]
            job.constraint = compile_schema(state, job.schema, "response_format")
    else:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: {len(prompt)} prompts in one request; this server takes one prompt per "
                                    "request (send them as separate requests: they are batched)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            job = Job(tokenize_prompt(state, prompt, True, "prompt"), prompt)
        else:
            check_ids(prompt, state.engine.vocab_size, "prompt")
            job = Job(list(prompt), tokenizer.decode(prompt) if body.echo else "")
    count, param = len(job.prompt_ids), "messages" if endpoint == "chat" else "prompt"
    if count == 0:
        raise APIError(400, "the prompt is empty", param=param)
    if count > settings.max_prompt_tokens:
        raise APIError(400, f"the prompt has {count} tokens; this server accepts at most "
                            f"{settings.max_prompt_tokens}", param=param)
    return job


def compile_schema(state: ServeState, schema: Any, param: str) -> TokenConstraint:
    """The grammar of ``schema``; a schema llguidance cannot enforce is a 400 naming ``param``."""
    try:
        return state.grammar.json_schema(schema)
    except GrammarError as exc:
        raise APIError(400, f"{param}: the schema cannot be enforced: {exc}", param=param) from None


def max_tokens_for(settings: ServeSettings, body: ChatCompletionRequest | CompletionRequest, prompt_tokens: int) -> int:
    """The answer's token budget: asked for (checked against the limits) or the default, within the context."""
    if isinstance(body, ChatCompletionRequest):
        asked = body.max_completion_tokens or body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    else:
        asked, param = body.max_tokens, "max_tokens"  # 16 unless given (OpenAI's default); null: the server's
        if asked == 0 and not body.echo:
            raise APIError(400, "max_tokens: 0 is only allowed with echo (to score the prompt)", param=param)
    explicit = asked is not None
    asked = settings.default_max_tokens if asked is None else asked
    if asked > settings.max_tokens_limit:
        raise APIError(400, f"max_tokens {asked} is above this server's limit {settings.max_tokens_limit}", param=param)
    context = settings.context_length
    if context is not None and prompt_tokens + asked > context:
        room = context - prompt_tokens
        if explicit or room < 1:
            raise APIError(400, f"this model's context is {context} tokens; the prompt has {prompt_tokens} and "
                                f"{param} asks for {asked} more ({prompt_tokens + asked} in all)", param=param,
                           code="context_length_exceeded")
        asked = room
    return asked
