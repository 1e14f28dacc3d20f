"""The request bodies of the OpenAI API as tunelab serves them, field by field.

Every field OpenAI defines for /v1/chat/completions and /v1/completions is here: implemented,
accepted with no effect on the answer (``user``, ``metadata``, ``safety_identifier``,
``prompt_cache_key``: bookkeeping fields of OpenAI's own service), or refused with a 400 that
names it when set to anything but its default (:func:`refused_fields`). A field OpenAI does not
define is refused too ("Unrecognized request argument supplied", as OpenAI answers). Every
number is range-checked, so no value can fail a batch later.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from tunelab.serve.text_stream import MAX_STOP_CHARS, MAX_STOP_STRINGS

MAX_LOGPROBS = 20  # alternatives per token (OpenAI: 20 for chat, 5 for completions; vLLM: 20)
MAX_LOGIT_BIAS = 1024  # entries in logit_bias
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


class APIError(Exception):
    """An error answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class FunctionCall(_Strict):
    """A function call inside an assistant message's ``tool_calls``."""

    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    """One entry of an assistant message's ``tool_calls``."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    """A chat message; content may be text or a list of text parts."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: None = None  # OpenAI echoes these back as null; any other value is refused
    audio: None = None
    function_call: None = None
    annotations: list[Any] | None = None


class FunctionDefinition(_Strict):
    """A function the model may call."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    """An entry of ``tools``."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    """``tool_choice`` naming one function."""

    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    """``response_format.json_schema``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """``response_format``: text, json_object or json_schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Strict):
    """``stream_options``."""

    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # OpenAI pads chunks against side channels; nothing to pad here


class _Common(_Strict):
    model: str
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    n: int | None = Field(None, ge=1, le=128)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: str | None = None  # accepted; no effect on the answer

    def stops(self) -> list[str]:
        """The stop strings, checked against the limits.

        Raises:
            APIError: too many, or one too long.
        """
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", param="stop")
        for stop in stops:
            if len(stop) > MAX_STOP_CHARS:
                raise APIError(400, f"stop: a stop string may have at most {MAX_STOP_CHARS} characters, got "
                                    f"{len(stop)}", param="stop")
        return [s for s in stops if s]

    def bias(self, vocab_size: int) -> dict[int, float]:
        """``logit_bias`` with integer keys, checked against the vocabulary and OpenAI's -100..100.

        Raises:
            APIError: a key that is not a token id of this model, or a value out of range.
        """
        result = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise APIError(400, f"logit_bias: {key[:40]!r} is not a token id", param="logit_bias") from None
            if not 0 <= token < vocab_size:
                raise APIError(400, f"logit_bias: token id {token} is outside this model's vocabulary "
                                    f"(0-{vocab_size - 1})", param="logit_bias")
            if not -100 <= value <= 100:
                raise APIError(400, f"logit_bias: bias {value} for token {token} is outside -100..100",
                               param="logit_bias")
            result[token] = value
        return result


class ChatCompletionRequest(_Common):
    """Body of /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None  # accepted; no effect on the answer
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    store: bool | None = None
    service_tier: str | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None


class CompletionRequest(_Common):
    """Body of /v1/completions (the legacy API, what lm-evaluation-harness's ``local-completions`` sends)."""

    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


def refused_fields(body: ChatCompletionRequest | CompletionRequest) -> None:
    """Refuse fields tunelab does not implement when they ask for anything but the default.

    Raises:
        APIError: 400 naming the field.
    """
    def refuse(field: str, why: str) -> None:
        raise APIError(400, f"{field}: {why}", param=field)

    if body.n not in (None, 1):
        refuse("n", "only n=1 is supported; send several requests (they are batched)")
    if body.stream_options is not None and not body.stream:
        refuse("stream_options", "only allowed with stream: true")
    if isinstance(body, CompletionRequest):
        if body.best_of not in (None, 1):
            refuse("best_of", "only best_of=1 is supported")
        if body.suffix:
            refuse("suffix", "insertion (suffix) is not supported")
        return
    for field, why in (("audio", "audio output is not supported"), ("prediction", "predicted outputs are not supported"),
                       ("reasoning_effort", "not a reasoning model"), ("verbosity", "not supported"),
                       ("web_search_options", "web search is not supported"),
                       ("functions", "the deprecated functions API is not supported; use tools"),
                       ("function_call", "the deprecated functions API is not supported; use tool_choice")):
        if getattr(body, field) is not None:
            refuse(field, why)
    if body.modalities not in (None, ["text"]):
        refuse("modalities", "only text output is supported")
    if body.store:
        refuse("store", "completions are not stored for retrieval by this server")
    if body.service_tier not in (None, "auto", "default"):
        refuse("service_tier", "only the default service tier exists here")
    if body.tool_choice not in (None, "none") and not body.tools:
        refuse("tool_choice", "needs tools")
    if body.response_format is not None and body.response_format.type == "json_schema":
        if body.response_format.json_schema is None or body.response_format.json_schema.schema_ is None:
            refuse("response_format.json_schema", "json_schema needs a schema")
    if body.response_format is not None and body.response_format.type != "text" and body.tools \
            and body.tool_choice not in (None, "none", "auto"):
        refuse("response_format", "cannot be combined with a forced tool call (tool_choice)")
    if body.top_logprobs and not body.logprobs:
        refuse("top_logprobs", "needs logprobs: true")
