"""The OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions, /v1/completions, /health, /metrics.

Prompts of chat requests are rendered with the chat template saved with the model (the one
training used), and generation stops at the same stop tokens. Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``: 400 for bad requests and limits, 401 for a
wrong key, 404 for an unknown model, 429 when the queue is full, 504 on a timeout.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.data.templates import render_prompt
from tunelab.errors import DataError
from tunelab.serve.engine import GenerationRequest, QueueFull, ServingEngine
from tunelab.serve.request_log import RecordSink, RequestRecord

logger = logging.getLogger("tunelab.serve")


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


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        """The JSON error response."""
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class ChatMessage(BaseModel):
    """A chat message; content may be text or a list of text parts."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class _Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    """Body of /v1/chat/completions (the fields tunelab uses; others are ignored)."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    """Body of /v1/completions."""

    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)


def _text_of(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "only text content parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


class ServerMetrics:
    """Counters and recent latencies for /metrics (Prometheus text format)."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.latencies: deque[float] = deque(maxlen=1000)
        self.ttfts: deque[float] = deque(maxlen=1000)

    def observe(self, record: RequestRecord) -> None:
        """Count one finished request."""
        self.requests[(record.endpoint, record.status)] += 1
        self.prompt_tokens += record.prompt_tokens
        self.completion_tokens += record.completion_tokens
        if record.status == 200:
            self.latencies.append(record.latency_s)
            if record.time_to_first_token_s is not None:
                self.ttfts.append(record.time_to_first_token_s)

    def render(self, engine: ServingEngine) -> str:
        """The metrics in Prometheus' text exposition format."""
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
        ]
        for name, values in (("tunelab_request_latency_seconds", self.latencies),
                             ("tunelab_time_to_first_token_seconds", self.ttfts)):
            ordered = sorted(values)
            lines.append(f"# TYPE {name} summary")
            for quantile in (0.5, 0.95, 0.99):
                value = ordered[min(len(ordered) - 1, int(quantile * len(ordered)))] if ordered else float("nan")
                lines.append(f'{name}{{quantile="{quantile}"}} {value}')
            lines += [f"{name}_sum {sum(values)}", f"{name}_count {len(values)}"]
        return "\n".join(lines) + "\n"


class _Run:
    """One generation request bridged from the worker thread into asyncio."""

    def __init__(self, app_state: _State, request: GenerationRequest, stops: list[str]) -> None:
        self.state, self.request, self.stop_strings = app_state, request, stops
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[int | None] = asyncio.Queue()
        self.text = ""
        self.stopped_by_string = False
        request.on_token = lambda token: self.loop.call_soon_threadsafe(self.events.put_nowait, token)
        request.on_done = lambda: self.loop.call_soon_threadsafe(self.events.put_nowait, None)

    def _decoded(self) -> str:
        return self.state.tokenizer.decode(self.request.tokens, skip_special_tokens=True)

    def new_text(self, final: bool = False) -> str:
        """Text decoded since the last call.

        Until ``final``, text is held back while a character is incomplete or a stop string may
        be starting; a stop string ends the text (and the generation) where it begins.
        """
        full = self._decoded()
        for stop in self.stop_strings:
            index = full.find(stop)
            if index >= 0:
                full, self.stopped_by_string = full[:index], True
                self.request.cancel()
        if not final and not self.stopped_by_string and (full.endswith("\ufffd") or any(
                full.endswith(stop[:k]) for stop in self.stop_strings for k in range(1, len(stop)))):
            return ""
        piece, self.text = full[len(self.text):], full
        return piece

    async def tokens(self) -> AsyncIterator[int]:
        """Generated tokens as they arrive; ends when the request is done."""
        while (token := await self.events.get()) is not None:
            yield token

    @property
    def finish_reason(self) -> str:
        """OpenAI's finish reason: stop or length."""
        return "stop" if self.stopped_by_string or self.request.finish_reason == "stop" else "length"


@dataclass
class _State:
    engine: ServingEngine
    tokenizer: Any
    template: str
    stop_ids: set[int]
    settings: ServeSettings
    metrics: ServerMetrics
    sinks: tuple[RecordSink, ...]


def create_app(engine: ServingEngine, template: str, stop_ids: set[int], settings: ServeSettings,
               request_log: RecordSink | None = None, record_sinks: Sequence[RecordSink] = ()) -> FastAPI:
    """The FastAPI application serving ``engine``.

    Every finished request's :class:`RequestRecord` goes to ``request_log`` (a JSONL log) and to
    each of ``record_sinks`` (e.g. the SQLite monitoring store).
    """
    app = FastAPI(title="tunelab", docs_url=None, redoc_url=None)
    sinks = tuple(s for s in (request_log, *record_sinks) if s is not None)
    state = _State(engine, engine.tokenizer, template, stop_ids, settings, ServerMetrics(), sinks)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = "malformed JSON body" if first.get("type") == "json_invalid" else f"{where}: {first.get('msg')}"
        return APIError(400, message, param=where or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), kind="invalid_request_error").response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        key = settings.api_key
        if key and request.url.path != "/health":
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), key.encode()):
                return APIError(401, "invalid API key", kind="invalid_api_key", code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "queued": engine.queued}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = [settings.model_name, *settings.adapters]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "tunelab"}
                                           for n in names]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, http: Request):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text_of(m.content)}
                    for m in body.messages]
        if not messages:
            raise APIError(400, "messages must not be empty", param="messages")
        try:
            prompt = render_prompt(state.tokenizer, template, messages)
        except DataError as exc:
            raise APIError(400, str(exc), param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await _serve(state, http, "chat", body, prompt, max_tokens)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise APIError(400, "one prompt per request is supported", param="prompt")
            body.prompt = body.prompt[0]
        return await _serve(state, http, "completions", body, body.prompt, body.max_tokens)

    return app


def _adapter_for(settings: ServeSettings, model: str) -> str | None:
    if model == settings.model_name:
        return None
    if model in settings.adapters:
        return model
    raise APIError(404, f"model {model!r} not found; available: {', '.join([settings.model_name, *settings.adapters])}",
                   param="model", code="model_not_found")


async def _serve(state: _State, http: Request, endpoint: str, body: _Sampling, prompt: str, max_tokens: int | None):
    settings, started, arrived = state.settings, time.monotonic(), time.time()
    record = RequestRecord(time=arrived, model=body.model, endpoint=endpoint, status=200)
    try:
        adapter = _adapter_for(settings, body.model)
        if body.n != 1:
            raise APIError(400, "n must be 1", param="n")
        max_tokens = max_tokens or settings.default_max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} is above this server's limit {settings.max_tokens_limit}",
                           param="max_tokens")
        prompt_ids = state.tokenizer(prompt, add_special_tokens=endpoint == "completions")["input_ids"]
        record.prompt_tokens = len(prompt_ids)
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompt_ids) > settings.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this server accepts at most "
                                f"{settings.max_prompt_tokens}", param="messages")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        request = GenerationRequest(prompt_ids, max_tokens, state.stop_ids, body.temperature, body.top_p, body.seed,
                                    adapter, settings.timeout)
        run = _Run(state, request, stops)
        try:
            state.engine.submit(request)
        except QueueFull:
            raise APIError(429, "the server is busy (request queue full); retry later", kind="rate_limit_error",
                           code="queue_full") from None
        if settings.record_text:
            record.prompt = prompt
        if body.stream:
            return StreamingResponse(_stream(state, run, endpoint, body.model, record, started),
                                     media_type="text/event-stream")
        return await _complete(state, http, run, endpoint, body.model, record, started)
    except APIError as error:
        record.status, record.error = error.status, error.message
        _finish_record(state, record, started)
        raise


async def _complete(state: _State, http: Request, run: _Run, endpoint: str, model: str, record: RequestRecord,
                    started: float) -> JSONResponse:
    async def watch_disconnect() -> None:
        while not await http.is_disconnected():
            await asyncio.sleep(0.05)
        run.request.cancel()

    watcher = asyncio.create_task(watch_disconnect())
    try:
        async for _ in run.tokens():
            if run.stop_strings:  # decoding as we go is only needed to stop at a stop string
                run.new_text()
    finally:
        watcher.cancel()
    run.new_text(final=True)
    text, request = run.text, run.request
    _fill_record(record, run, text)
    if request.finish_reason == "timeout" and not run.stopped_by_string:
        record.status, record.error = 504, "timeout"
        _finish_record(state, record, started)
        raise APIError(504, f"generation timed out after {state.settings.timeout:.0f} s", kind="timeout")
    if request.finish_reason == "error":
        record.status, record.error = 500, request.error
        _finish_record(state, record, started)
        raise APIError(500, f"generation failed: {request.error}", kind="server_error")
    _finish_record(state, record, started)
    usage = {"prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
             "total_tokens": record.prompt_tokens + record.completion_tokens}
    if endpoint == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": run.finish_reason}
        return JSONResponse({"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                             "created": int(time.time()), "model": model, "choices": [choice], "usage": usage})
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": run.finish_reason}
    return JSONResponse({"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                         "model": model, "choices": [choice], "usage": usage})


async def _stream(state: _State, run: _Run, endpoint: str, model: str, record: RequestRecord,
                  started: float) -> AsyncIterator[str]:
    ident = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())

    def chunk(piece: str | None, finish: str | None = None, role: bool = False) -> str:
        if endpoint == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": piece} if piece else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return "data: " + json.dumps({"id": ident, "object": obj, "created": created, "model": model,
                                      "choices": [choice]}) + "\n\n"

    completed = False
    try:
        if endpoint == "chat":
            yield chunk(None, role=True)
        async for _ in run.tokens():
            piece = run.new_text()
            if piece:
                yield chunk(piece)
        tail = run.new_text(final=True)
        if tail:
            yield chunk(tail)
        yield chunk(None, finish=run.finish_reason)
        yield "data: [DONE]\n\n"
        completed = True
    finally:
        if not completed:  # the client went away: stop generating for it
            run.request.cancel()
            record.status, record.error = 499, "client disconnected"
        _fill_record(record, run, run.text)
        _finish_record(state, record, started)


def _fill_record(record: RequestRecord, run: _Run, text: str) -> None:
    request = run.request
    record.completion_tokens = len(request.tokens)
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
