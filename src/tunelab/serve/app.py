"""The OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions, /v1/completions, /health, /metrics,
and vLLM's /tokenizer_info, /tokenize and /detokenize (lm-evaluation-harness's remote tokenizer).

Prompts of chat requests are rendered with the chat template saved with the model (the one
training used), and generation stops at the same stop tokens. Every request field is implemented
or refused by name (:mod:`tunelab.serve.protocol`). A request fails alone: its values are
checked before it reaches the engine, and the engine catches errors per request. Rendering,
tokenizing and grammar compilation run off the event loop, bodies are size-limited and stop
strings are matched in linear time, so no request can stall the others or /health.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for bad
requests and limits, 401 for a wrong key, 404 for an unknown model, 413 for a body over the
limit, 429 when the queue is full, 500 when generation of this request failed, 504 on a
timeout. Every answer, refusals included, is counted in /metrics and recorded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.serve.engine import GenerationRequest, QueueFull, ServingEngine
from tunelab.serve.grammar import GrammarCompiler, GrammarError, TokenConstraint
from tunelab.serve.guard import RequestGuard
from tunelab.serve.logprobs import chat_logprobs, completion_logprobs
from tunelab.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    NamedToolChoice,
    Tool,
    refused_fields,
)
from tunelab.serve.request_log import RecordSink, RequestRecord
from tunelab.serve.server import ConnectionStats
from tunelab.serve.text_stream import TextStream
from tunelab.serve.tools import may_become_call, parse_tool_calls, render_chat, tool_call_schema

logger = logging.getLogger("tunelab.serve")

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models",
             "/tokenize": "tokenizer", "/detokenize": "tokenizer", "/tokenizer_info": "tokenizer",
             "/metrics": "metrics", "/health": "health"}


@dataclass
class ServeSettings:
    """Limits and options of the server."""

    model_name: str
    adapters: tuple[str, ...] = ()
    api_key: str | None = None
    max_prompt_tokens: int = 4096
    max_tokens_limit: int = 2048  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256
    timeout: float = 60.0
    record_text: bool = False
    context_length: int | None = None  # prompt + answer tokens the model can attend to (None: unknown)
    max_body_bytes: int = 4 * 1024 * 1024


class JSONAnswer(JSONResponse):
    """JSON with non-ASCII escaped: any text a client sent (even a lone surrogate) can be echoed back."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _error_response(error: APIError) -> JSONAnswer:
    return JSONAnswer(error.body(), status_code=error.status)


class ServerMetrics:
    """Counters and recent latencies for /metrics (Prometheus text format).

    ``loop_lags`` holds how late a 100 ms timer on the event loop fired, over the last minute: a
    blocked loop (which would stall /health and every stream) shows here first.
    """

    def __init__(self) -> None:
        self.loop_lags: deque[tuple[float, float]] = deque(maxlen=600)
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.latencies: deque[float] = deque(maxlen=1000)
        self.ttfts: deque[float] = deque(maxlen=1000)

    def observe(self, record: RequestRecord) -> None:
        """Count one answered request (refusals included)."""
        self.requests[(record.endpoint, record.status)] += 1
        self.prompt_tokens += record.prompt_tokens
        self.completion_tokens += record.completion_tokens
        if record.status == 200:
            self.latencies.append(record.latency_s)
            if record.time_to_first_token_s is not None:
                self.ttfts.append(record.time_to_first_token_s)

    async def watch_loop(self, period: float = 0.1) -> None:
        """Measure the event loop's lag forever (run as a task)."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + period
            await asyncio.sleep(period)
            self.loop_lags.append((time.monotonic(), max(0.0, loop.time() - due)))

    def recent_loop_lag(self, window_s: float = 60.0) -> float:
        """The largest event-loop lag of the last ``window_s`` seconds."""
        since = time.monotonic() - window_s
        return max((lag for at, lag in self.loop_lags if at >= since), default=0.0)

    def render(self, engine: ServingEngine, extra: dict[str, float]) -> str:
        """The metrics in Prometheus' text exposition format (``extra``: name -> counter value)."""
        lines = ["# TYPE tunelab_requests_total counter"]
        for (endpoint, status), count in sorted(self.requests.items()):
            lines.append(f'tunelab_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}')
        lines += [
            "# TYPE tunelab_prompt_tokens_total counter", f"tunelab_prompt_tokens_total {self.prompt_tokens}",
            "# TYPE tunelab_completion_tokens_total counter",
            f"tunelab_completion_tokens_total {self.completion_tokens}",
            "# TYPE tunelab_queue_depth gauge", f"tunelab_queue_depth {engine.queued}",
            "# TYPE tunelab_batches_total counter", f"tunelab_batches_total {engine.stats.batches}",
            "# TYPE tunelab_max_batch_size gauge", f"tunelab_max_batch_size {engine.stats.max_batch_seen}",
            "# TYPE tunelab_connection_read_timeouts_total counter",
            f"tunelab_connection_read_timeouts_total {ConnectionStats.read_timeouts}",
            "# TYPE tunelab_event_loop_lag_max_seconds gauge",
            f"tunelab_event_loop_lag_max_seconds {self.recent_loop_lag():.4f}",
        ]
        for name, value in sorted(extra.items()):
            lines += [f"# TYPE {name} counter", f"{name} {value}"]
        for name, values in (("tunelab_request_latency_seconds", self.latencies),
                             ("tunelab_time_to_first_token_seconds", self.ttfts)):
            ordered = sorted(values)
            lines.append(f"# TYPE {name} summary")
            for quantile in (0.5, 0.95, 0.99):
                value = ordered[min(len(ordered) - 1, int(quantile * len(ordered)))] if ordered else float("nan")
                lines.append(f'{name}{{quantile="{quantile}"}} {value}')
            lines += [f"{name}_sum {sum(values)}", f"{name}_count {len(values)}"]
        return "\n".join(lines) + "\n"


@dataclass
class _Job:
    """What a request asks of the engine, prepared off the event loop."""

    prompt_ids: list[int]
    prompt_text: str
    constraint: TokenConstraint | None = None
    schema: dict[str, Any] | None = None  # the JSON schema ``constraint`` enforces
    tools: list[Tool] | None = None  # tools whose calls are read back from the answer
    forced_call: bool = False  # the grammar makes the answer a tool call


class _Run:
    """One generation request bridged from the engine's thread into asyncio."""

    def __init__(self, state: _State, request: GenerationRequest, stops: list[str], job: _Job) -> None:
        self.state, self.request, self.job = state, request, job
        self.stream = TextStream(state.tokenizer, stops)
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[bool] = asyncio.Queue()
        self.seen = 0  # tokens handed to the text stream
        self.reported = 0  # tokens whose log-probs went out in a stream chunk
        self.client_gone = False
        request.on_token = lambda _token: self.loop.call_soon_threadsafe(self.events.put_nowait, True)
        request.on_done = lambda: self.loop.call_soon_threadsafe(self.events.put_nowait, False)

    def _take(self) -> None:
        new = self.request.tokens[self.seen:]
        self.seen += len(new)
        self.stream.add(new)
        if self.stream.stopped:
            self.request.cancel()  # a stop string ended the answer

    async def tokens(self) -> AsyncIterator[None]:
        """Yields whenever new text may be there; ends (with the text complete) when the request is done."""
        while await self.events.get():
            self._take()
            yield
        self._take()
        self.stream.finish()

    @property
    def finish_reason(self) -> str:
        """OpenAI's finish reason: stop or length."""
        return "stop" if self.stream.stopped or self.request.finish_reason == "stop" else "length"


@dataclass
class _State:
    engine: ServingEngine
    tokenizer: Any
    template: str
    stop_ids: set[int]
    settings: ServeSettings
    metrics: ServerMetrics
    sinks: tuple[RecordSink, ...]
    grammar: GrammarCompiler
    executor: ThreadPoolExecutor
    max_token_chars: int
    extra_metrics: Callable[[], dict[str, float]]


class TokenizeRequest(BaseModel):
    """Body of /tokenize (vLLM's shape): a prompt, or chat messages."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    """Body of /detokenize (vLLM's shape)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[StrictInt] = Field(max_length=1_000_000)


def create_app(engine: ServingEngine, template: str, stop_ids: set[int], settings: ServeSettings,
               request_log: RecordSink | None = None, record_sinks: Sequence[RecordSink] = (),
               extra_metrics: Callable[[], dict[str, float]] | None = None) -> Any:
    """The ASGI application serving ``engine`` (FastAPI behind :class:`~tunelab.serve.guard.RequestGuard`).

    Every answered request's :class:`RequestRecord` goes to ``request_log`` (a JSONL log) and to
    each of ``record_sinks`` (e.g. the SQLite monitoring store); ``extra_metrics`` adds counters
    to /metrics (the store's health).
    """
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        watch = asyncio.create_task(state.metrics.watch_loop())
        yield
        watch.cancel()

    app = FastAPI(title="tunelab", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    sinks = tuple(s for s in (request_log, *record_sinks) if s is not None)
    tokenizer = engine.tokenizer
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    state = _State(engine, tokenizer, template, stop_ids, settings, ServerMetrics(), sinks,
                   GrammarCompiler(tokenizer, engine.vocab_size, stop_ids),
                   ThreadPoolExecutor(max_workers=2, thread_name_prefix="tunelab-prepare"), max(longest, 1),
                   extra_metrics or dict)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONAnswer:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONAnswer:
        error = _validation_api_error(exc)
        _record_refusal(state, request.url.path, error.status, error.message)
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONAnswer:
        _record_refusal(state, request.url.path, exc.status_code, str(exc.detail))
        return _error_response(APIError(exc.status_code, str(exc.detail)))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "queued": engine.queued}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(engine, state.extra_metrics()),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> JSONAnswer:
        names = [settings.model_name, *settings.adapters]
        return JSONAnswer({"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "tunelab",
                                                       "max_model_len": settings.context_length} for n in names]})

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, http: Request) -> Response:
        return await _serve(state, http, "chat", body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request) -> Response:
        return await _serve(state, http, "completions", body)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> JSONAnswer:
        return JSONAnswer({"tokenizer_class": type(tokenizer).__name__, "eos_token": tokenizer.eos_token,
                           "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token,
                           "chat_template": template, "model_max_length": settings.context_length})

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> JSONAnswer:
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")

        def work() -> list[int]:
            if body.messages is not None:
                return _tokenize(state, render_chat(tokenizer, template, body.messages, None), False, "messages")
            return _tokenize(state, body.prompt or "", body.add_special_tokens, "prompt")

        ids = await asyncio.get_running_loop().run_in_executor(state.executor, work)
        return JSONAnswer({"count": len(ids), "max_model_len": settings.context_length, "tokens": ids})

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONAnswer:
        _check_ids(body.tokens, engine.vocab_size, "tokens")
        text = await asyncio.get_running_loop().run_in_executor(state.executor, tokenizer.decode, body.tokens)
        return JSONAnswer({"prompt": text})

    def on_reject(path: str, status: int, message: str) -> None:
        _record_refusal(state, path, status, message)

    return RequestGuard(app, settings.api_key, settings.max_body_bytes, on_reject)


def _validation_api_error(exc: RequestValidationError) -> APIError:
    """The 400 for a body that does not parse or validate, naming the field."""
    first = exc.errors()[0] if exc.errors() else {}
    location = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON")
    if first.get("type") == "missing" and not location:
        return APIError(400, "the request needs a JSON body")
    where = ".".join(p for p in location if not p.startswith(("function-", "list[", "str", "int", "literal")))
    if location[:1] == ["prompt"] and first.get("type") != "extra_forbidden":
        return APIError(400, "prompt: expected a string, a list of token ids (integers), or a list holding one "
                             "string or one list of token ids", param="prompt")
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {where}", param=where)
    return APIError(400, f"{where}: {first.get('msg')}", param=where or None)


def _endpoint_of(path: str) -> str:
    return ENDPOINTS.get(path, "other")


def _record_refusal(state: _State, path: str, status: int, message: str) -> None:
    """Count and record a request refused before it reached an endpoint's own checks."""
    record = RequestRecord(time=time.time(), model="", endpoint=_endpoint_of(path), status=status, error=message)
    _finish_record(state, record, time.monotonic())


def _adapter_for(settings: ServeSettings, model: str) -> str | None:
    if model == settings.model_name:
        return None
    if model in settings.adapters:
        return model
    raise APIError(404, f"model {model[:200]!r} not found; available: "
                        f"{', '.join([settings.model_name, *settings.adapters])}", param="model", code="model_not_found")


def _check_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise APIError(400, f"{param}: token id {bad} is outside this model's vocabulary (0-{vocab_size - 1})",
                       param=param)


def _tokenize(state: _State, text: str, add_special_tokens: bool, param: str) -> list[int]:
    """Token ids of ``text``; a text too long to fit is refused before it is tokenized."""
    limit = state.settings.max_prompt_tokens
    if len(text) > limit * state.max_token_chars:
        raise APIError(400, f"the prompt has {len(text)} characters, more than the {limit} tokens this server "
                            f"accepts at most can hold", param=param)
    return list(state.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _prepare(state: _State, endpoint: str, body: ChatCompletionRequest | CompletionRequest) -> _Job:
    """Render, tokenize and compile the grammar of a request (runs in a worker thread).

    Raises:
        APIError: a prompt or a schema that cannot be used.
    """
    tokenizer, settings = state.tokenizer, state.settings
    if isinstance(body, ChatCompletionRequest):
        tools = body.tools if body.tools and body.tool_choice != "none" else None
        text = render_chat(tokenizer, state.template, body.messages, tools)
        job = _Job(_tokenize(state, text, False, "messages"), text, tools=tools)
        choice = body.tool_choice or "auto"
        if tools and choice != "auto":
            chosen = tools
            if isinstance(choice, NamedToolChoice):
                chosen = [t for t in tools if t.function.name == choice.function.name]
                if not chosen:
                    raise APIError(400, f"tool_choice: no tool named {choice.function.name!r}", param="tool_choice")
            job.schema, job.forced_call = tool_call_schema(chosen), True
            job.constraint = _compile(state, job.schema, "tools")
        if body.response_format is not None and body.response_format.type != "text":
            job.schema = {"type": "object"} if body.response_format.type == "json_object" else \
                body.response_format.json_schema.schema_  # type: ignore[union-attr]
            job.constraint = _compile(state, job.schema, "response_format")
    else:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: {len(prompt)} prompts in one request; this server takes one prompt per "
                                    "request (send them as separate requests: they are batched)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            job = _Job(_tokenize(state, prompt, True, "prompt"), prompt)
        else:
            _check_ids(prompt, state.engine.vocab_size, "prompt")
            job = _Job(list(prompt), tokenizer.decode(prompt) if body.echo else "")
    count, param = len(job.prompt_ids), "messages" if endpoint == "chat" else "prompt"
    if count == 0:
        raise APIError(400, "the prompt is empty", param=param)
    if count > settings.max_prompt_tokens:
        raise APIError(400, f"the prompt has {count} tokens; this server accepts at most "
                            f"{settings.max_prompt_tokens}", param=param)
    return job


def _compile(state: _State, schema: Any, param: str) -> TokenConstraint:
    try:
        return state.grammar.json_schema(schema)
    except GrammarError as exc:
        raise APIError(400, f"{param}: the schema cannot be enforced: {exc}", param=param) from None


def _max_tokens(settings: ServeSettings, body: ChatCompletionRequest | CompletionRequest, prompt_tokens: int) -> int:
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


async def _serve(state: _State, http: Request, endpoint: str,
                 body: ChatCompletionRequest | CompletionRequest) -> Response:
    settings, started = state.settings, time.monotonic()
    record = RequestRecord(time=time.time(), model=body.model, endpoint=endpoint, status=200)
    try:
        adapter = _adapter_for(settings, body.model)
        refused_fields(body)
        stops = body.stops()
        bias = body.bias(state.engine.vocab_size)
        job = await asyncio.get_running_loop().run_in_executor(state.executor, _prepare, state, endpoint, body)
        record.prompt_tokens = len(job.prompt_ids)
        max_tokens = _max_tokens(settings, body, len(job.prompt_ids))
        if isinstance(body, ChatCompletionRequest):
            top, prompt_logprobs = (body.top_logprobs or 0) if body.logprobs else 0, None
        else:
            top = body.logprobs or 0
            prompt_logprobs = top if body.echo and body.logprobs is not None else None
        request = GenerationRequest(
            job.prompt_ids, max_tokens, state.stop_ids, 1.0 if body.temperature is None else body.temperature,
            1.0 if body.top_p is None else body.top_p, body.seed, adapter, settings.timeout,
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=bias, constraint=job.constraint, json_schema=job.schema, top_logprobs=top,
            prompt_logprobs=prompt_logprobs)
        unsupported = state.engine.unsupported(request)
        if unsupported == "response_format" and job.forced_call:
            unsupported = "tool_choice"  # the grammar came from the forced tool call
        if unsupported is not None:
            raise APIError(400, f"{unsupported}: not supported by this server's engine", param=unsupported)
        run = _Run(state, request, stops, job)
        try:
            state.engine.submit(request)
        except QueueFull:
            raise APIError(429, "the server is busy (request queue full); retry later", kind="rate_limit_error",
                           code="queue_full") from None
        if settings.record_text:
            record.prompt = job.prompt_text
        if body.stream:
            return StreamingResponse(_stream(state, run, endpoint, body, record, started),
                                     media_type="text/event-stream")
        return await _complete(state, http, run, endpoint, body, record, started)
    except APIError as error:
        record.status, record.error = error.status, error.message
        _finish_record(state, record, started)
        raise


async def _watch_disconnect(http: Request, run: _Run) -> None:
    """Cancel the generation when the client goes away (the body is read: only a disconnect can come)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    run.client_gone = True
    run.request.cancel()


def _failure(state: _State, run: _Run) -> APIError | None:
    """The error a finished generation ends in (timeout, engine error), if any."""
    request = run.request
    if request.finish_reason == "timeout" and not run.stream.stopped:
        return APIError(504, f"generation timed out after {state.settings.timeout:.0f} s", kind="timeout")
    if request.finish_reason == "error":
        return APIError(500, f"generation of this request failed: {request.error}", kind="server_error")
    return None


def _tool_answer(run: _Run, body: ChatCompletionRequest, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The answer's content and tool calls (none unless tools are active and the answer is a call)."""
    if run.job.tools is None:
        return text, []
    content, calls = parse_tool_calls(text, run.job.tools)
    if body.parallel_tool_calls is False:
        calls = calls[:1]
    return (content or None, [c.as_api() for c in calls]) if calls else (text, [])


async def _complete(state: _State, http: Request, run: _Run, endpoint: str,
                    body: ChatCompletionRequest | CompletionRequest, record: RequestRecord, started: float) -> Response:
    watcher = asyncio.create_task(_watch_disconnect(http, run))
    try:
        async for _ in run.tokens():
            pass
    finally:
        watcher.cancel()
    text, request = run.stream.text, run.request
    finish = run.finish_reason
    _fill_record(record, run, text, finish if request.finish_reason in ("stop", "length") or run.stream.stopped
                 else None)
    if run.client_gone:
        record.status, record.error = 499, "client disconnected"
        _finish_record(state, record, started)
        return Response(status_code=499)
    failure = _failure(state, run)
    if failure is not None:
        record.status, record.error = failure.status, failure.message
        _finish_record(state, record, started)
        raise failure
    usage = {"prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
             "total_tokens": record.prompt_tokens + record.completion_tokens}
    tokenizer = state.tokenizer
    if isinstance(body, ChatCompletionRequest):
        content, calls = _tool_answer(run, body, text)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"], finish = calls, "tool_calls"
        choice = {"index": 0, "message": message, "finish_reason": finish,
                  "logprobs": chat_logprobs(tokenizer, request.tokens, request.logprobs,
                                            request.top if body.top_logprobs else None) if body.logprobs else None}
        record.finish_reason = finish
        _finish_record(state, record, started)
        return JSONAnswer({"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                           "created": int(time.time()), "model": body.model, "choices": [choice], "usage": usage})
    _finish_record(state, record, started)
    echoed = run.job.prompt_text if body.echo else ""
    logprobs = None
    if body.logprobs is not None:
        ids, values, tops = list(request.tokens), list(request.logprobs), list(request.top) or [None] * len(request.tokens)
        if body.echo:
            ids, values, tops = run.job.prompt_ids + ids, request.prompt_token_logprobs + values, request.prompt_top + tops
        logprobs = completion_logprobs(tokenizer, ids, values, tops)
    choice = {"index": 0, "text": echoed + text, "logprobs": logprobs, "finish_reason": finish}
    return JSONAnswer({"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                       "model": body.model, "choices": [choice], "usage": usage})


async def _stream(state: _State, run: _Run, endpoint: str, body: ChatCompletionRequest | CompletionRequest,
                  record: RequestRecord, started: float) -> AsyncIterator[str]:
    ident = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    created, tokenizer, request = int(time.time()), state.tokenizer, run.request
    usage_wanted = bool(body.stream_options and body.stream_options.include_usage)
    chat = isinstance(body, ChatCompletionRequest)
    sent_chars = 0

    def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        obj = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
               "model": body.model, "choices": choices}
        if usage_wanted:
            obj["usage"] = usage
        return "data: " + json.dumps(obj) + "\n\n"

    def new_logprobs() -> Any:
        """Log-probs of the tokens not reported yet (None when not asked for)."""
        start, end = run.reported, len(request.tokens)
        run.reported = end
        if chat and body.logprobs:
            return chat_logprobs(tokenizer, request.tokens[start:end], request.logprobs[start:end],
                                 request.top[start:end] if body.top_logprobs else None)
        if not chat and body.logprobs is not None:
            tops = request.top[start:end] or [None] * (end - start)
            return completion_logprobs(tokenizer, request.tokens[start:end], request.logprobs[start:end], tops,
                                       sent_chars)
        return None

    def content(piece: str, finish: str | None = None) -> str:
        nonlocal sent_chars
        logprobs = new_logprobs()
        sent_chars += len(piece)
        if chat:
            delta = {"content": piece} if piece else {}
            return event([{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
        return event([{"index": 0, "text": piece, "logprobs": logprobs, "finish_reason": finish}])

    def echo() -> str:
        nonlocal sent_chars
        logprobs = None
        if not chat and body.logprobs is not None and request.prompt_token_logprobs:
            logprobs = completion_logprobs(tokenizer, run.job.prompt_ids, request.prompt_token_logprobs,
                                           request.prompt_top)
        sent_chars = len(run.job.prompt_text)
        return event([{"index": 0, "text": run.job.prompt_text, "logprobs": logprobs, "finish_reason": None}])

    holding = chat and run.job.tools is not None  # an answer that may be a tool call is held back until it is known
    held = ""
    completed = False
    try:
        if chat:
            yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        echo_pending = not chat and bool(body.echo)  # sent once the prompt is scored (with the first token)
        async for _ in run.tokens():
            if echo_pending:
                echo_pending = False
                yield echo()
            piece = run.stream.pending()
            if holding:
                held += piece
                if not run.job.forced_call and not may_become_call(held):
                    holding, piece, held = False, held, ""
            if piece and not holding:
                yield content(piece)
        if echo_pending:
            yield echo()
        piece = run.stream.pending(final=True)
        failure = _failure(state, run)
        finish = run.finish_reason
        if holding:
            held += piece
            text, calls = _tool_answer(run, body, held)  # type: ignore[arg-type]
            if calls:
                if text:
                    yield content(text)
                for index, call in enumerate(calls):
                    head = {"index": index, "id": call["id"], "type": "function",
                            "function": {"name": call["function"]["name"], "arguments": ""}}
                    yield event([{"index": 0, "delta": {"tool_calls": [head]}, "logprobs": None, "finish_reason": None}])
                    yield event([{"index": 0, "delta": {"tool_calls": [{"index": index, "function": {
                        "arguments": call["function"]["arguments"]}}]}, "logprobs": None, "finish_reason": None}])
                piece, finish = "", "tool_calls"
            else:
                piece = held
        if piece:
            yield content(piece)
        if failure is not None:
            record.status, record.error = failure.status, failure.message
            yield "data: " + json.dumps(failure.body()) + "\n\n"
        else:
            record.finish_reason = finish
            yield content("", finish=finish)
        if usage_wanted:
            tokens = len(request.tokens)
            yield event([], {"prompt_tokens": record.prompt_tokens, "completion_tokens": tokens,
                             "total_tokens": record.prompt_tokens + tokens})
        yield "data: [DONE]\n\n"
        completed = True
    finally:
        if not completed:  # the client went away: stop generating for it
            request.cancel()
            record.status, record.error = 499, "client disconnected"
        _fill_record(record, run, run.stream.text, finish=record.finish_reason)
        _finish_record(state, record, started)


def _fill_record(record: RequestRecord, run: _Run, text: str, finish: str | None = None) -> None:
    """Copy what the generation did into the record; ``finish``: the answer's finish reason when known."""
    request = run.request
    record.completion_tokens = len(request.tokens)
    if finish is not None:
        record.finish_reason = finish
    elif request.finish_reason == "cancelled" and run.stream.stopped:
        record.finish_reason = "stop"  # the server cancelled it at a stop string
    else:
        record.finish_reason = request.finish_reason
    record.batch_size = request.batch_size
    if request.first_token_at is not None:
        record.time_to_first_token_s = request.first_token_at - request.submitted
    if request.logprobs:
        record.mean_logprob = sum(request.logprobs) / len(request.logprobs)
    if run.state.settings.record_text:
        record.completion = text


def _finish_record(state: _State, record: RequestRecord, started: float) -> None:
    record.latency_s = time.monotonic() - started
    state.metrics.observe(record)
    for sink in state.sinks:
        try:
            sink.record(record)
        except Exception:  # monitoring must never fail a request
            logger.exception("a request record could not be handed to %s", type(sink).__name__)
