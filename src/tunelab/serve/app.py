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
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.serve.engine import GenerationRequest, QueueFull, ServingEngine
from tunelab.serve.grammar import GrammarCompiler
from tunelab.serve.guard import RequestGuard
from tunelab.serve.prepare import check_ids, max_tokens_for, prepare, tokenize_prompt
from tunelab.serve.protocol import APIError, ChatCompletionRequest, ChatMessage, CompletionRequest, refused_fields
from tunelab.serve.request_log import RecordSink, RequestRecord
from tunelab.serve.respond import JSONAnswer, Run, complete, stream_answer
from tunelab.serve.state import ServerMetrics, ServeSettings, ServeState, finish_record
from tunelab.serve.tools import render_chat

__all__ = ["ServeSettings", "create_app"]

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models",
             "/tokenize": "tokenizer", "/detokenize": "tokenizer", "/tokenizer_info": "tokenizer",
             "/metrics": "metrics", "/health": "health"}


def error_response(error: APIError) -> JSONAnswer:
    return JSONAnswer(error.body(), status_code=error.status)


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
    state = ServeState(engine, tokenizer, template, stop_ids, settings, ServerMetrics(), sinks,
                   GrammarCompiler(tokenizer, engine.vocab_size, stop_ids),
                   ThreadPoolExecutor(max_workers=2, thread_name_prefix="tunelab-prepare"), max(longest, 1),
                   extra_metrics or dict)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONAnswer:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONAnswer:
        error = _validation_api_error(exc)
        _record_refusal(state, request.url.path, error.status, error.message)
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONAnswer:
        _record_refusal(state, request.url.path, exc.status_code, str(exc.detail))
        return error_response(APIError(exc.status_code, str(exc.detail)))

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
                return tokenize_prompt(state, render_chat(tokenizer, template, body.messages, None), False, "messages")
            return tokenize_prompt(state, body.prompt or "", body.add_special_tokens, "prompt")

        ids = await asyncio.get_running_loop().run_in_executor(state.executor, work)
        return JSONAnswer({"count": len(ids), "max_model_len": settings.context_length, "tokens": ids})

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONAnswer:
        check_ids(body.tokens, engine.vocab_size, "tokens")
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


def _record_refusal(state: ServeState, path: str, status: int, message: str) -> None:
    """Count and record a request refused before it reached an endpoint's own checks."""
    record = RequestRecord(time=time.time(), model="", endpoint=_endpoint_of(path), status=status, error=message)
    finish_record(state, record, time.monotonic())


def _adapter_for(settings: ServeSettings, model: str) -> str | None:
    if model == settings.model_name:
        return None
    if model in settings.adapters:
        return model
    raise APIError(404, f"model {model[:200]!r} not found; available: "
                        f"{', '.join([settings.model_name, *settings.adapters])}", param="model", code="model_not_found")


async def _serve(state: ServeState, http: Request, endpoint: str,
                 body: ChatCompletionRequest | CompletionRequest) -> Response:
    settings, started = state.settings, time.monotonic()
    record = RequestRecord(time=time.time(), model=body.model, endpoint=endpoint, status=200)
    try:
        adapter = _adapter_for(settings, body.model)
        refused_fields(body)
        stops = body.stops()
        bias = body.bias(state.engine.vocab_size)
        job = await asyncio.get_running_loop().run_in_executor(state.executor, prepare, state, endpoint, body)
        record.prompt_tokens = len(job.prompt_ids)
        max_tokens = max_tokens_for(settings, body, len(job.prompt_ids))
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
        run = Run(state, request, stops, job)
        try:
            state.engine.submit(request)
        except QueueFull:
            raise APIError(429, "the server is busy (request queue full); retry later", kind="rate_limit_error",
                           code="queue_full") from None
        if settings.record_text:
            record.prompt = job.prompt_text
        if body.stream:
            return StreamingResponse(stream_answer(state, run, endpoint, body, record, started),
                                     media_type="text/event-stream")
        return await complete(state, http, run, endpoint, body, record, started)
    except APIError as error:
        record.status, record.error = error.status, error.message
        finish_record(state, record, started)
        raise
