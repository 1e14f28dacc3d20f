"""Answers: a whole JSON response, or a stream of server-sent events, from a generation in progress."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tunelab.serve.engine import GenerationRequest
from tunelab.serve.logprobs import chat_logprobs, completion_logprobs
from tunelab.serve.prepare import Job
from tunelab.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from tunelab.serve.request_log import RequestRecord
from tunelab.serve.state import ServeState, finish_record
from tunelab.serve.text_stream import TextStream
from tunelab.serve.tools import may_become_call, parse_tool_calls


class JSONAnswer(JSONResponse):
    """JSON with non-ASCII escaped: any text a client sent (even a lone surrogate) can be echoed back."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class Run:
    """One generation request bridged from the engine's thread into asyncio."""

    def __init__(self, state: ServeState, request: GenerationRequest, stops: list[str], job: Job) -> None:
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

    async def tokens(self, incremental: bool = True) -> AsyncIterator[None]:
        """Yields whenever new text may be there; ends (with the text complete) when the request is done.

        ``incremental`` False decodes once at the end (a whole answer with no stop strings needs no
        text before then; the result is the same).
        """
        while await self.events.get():
            if incremental:
                self._take()
            yield
        self._take()
        self.stream.finish()

    @property
    def finish_reason(self) -> str:
        """OpenAI's finish reason: stop or length."""
        return "stop" if self.stream.stopped or self.request.finish_reason == "stop" else "length"


async def watch_disconnect(http: Request, run: Run) -> None:
    """Cancel the generation when the client goes away (the body is read: only a disconnect can come)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    run.client_gone = True
    run.request.cancel()


def failure_of(state: ServeState, run: Run) -> APIError | None:
    """The error a finished generation ends in (timeout, engine error), if any."""
    request = run.request
    if request.finish_reason == "timeout" and not run.stream.stopped:
        return APIError(504, f"generation timed out after {state.settings.timeout:.0f} s", kind="timeout")
    if request.finish_reason == "error":
        return APIError(500, f"generation of this request failed: {request.error}", kind="server_error")
    return None


def tool_answer(run: Run, body: ChatCompletionRequest, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The answer's content and tool calls (none unless tools are active and the answer is a call)."""
    if run.job.tools is None:
        return text, []
    content, calls = parse_tool_calls(text, run.job.tools)
    if body.parallel_tool_calls is False:
        calls = calls[:1]
    return (content or None, [c.as_api() for c in calls]) if calls else (text, [])


async def complete(state: ServeState, http: Request, run: Run, endpoint: str,
                   body: ChatCompletionRequest | CompletionRequest, record: RequestRecord, started: float) -> Response:
    """Wait for the whole answer and return it as one JSON response (499 recorded if the client left)."""
    watcher = asyncio.create_task(watch_disconnect(http, run))
    try:
        async for _ in run.tokens(incremental=bool(run.stream.automata)):
            pass
    finally:
        watcher.cancel()
    text, request = run.stream.text, run.request
    finish = run.finish_reason
    fill_record(record, run, text, finish if request.finish_reason in ("stop", "length") or run.stream.stopped
                 else None)
    if run.client_gone:
        record.status, record.error = 499, "client disconnected"
        finish_record(state, record, started)
        return Response(status_code=499)
    failure = failure_of(state, run)
    if failure is not None:
        record.status, record.error = failure.status, failure.message
        finish_record(state, record, started)
        raise failure
    usage = {"prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
             "total_tokens": record.prompt_tokens + record.completion_tokens}
    tokenizer = state.tokenizer
    if isinstance(body, ChatCompletionRequest):
        content, calls = tool_answer(run, body, text)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"], finish = calls, "tool_calls"
        choice = {"index": 0, "message": message, "finish_reason": finish,
                  "logprobs": chat_logprobs(tokenizer, request.tokens, request.logprobs,
                                            request.top if body.top_logprobs else None) if body.logprobs else None}
        record.finish_reason = finish
        finish_record(state, record, started)
        return JSONAnswer({"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                           "created": int(time.time()), "model": body.model, "choices": [choice], "usage": usage})
    finish_record(state, record, started)
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


async def stream_answer(state: ServeState, run: Run, endpoint: str, body: ChatCompletionRequest | CompletionRequest,
                        record: RequestRecord, started: float) -> AsyncIterator[str]:
    """The answer as server-sent events: text deltas, tool-call deltas, usage last when asked for."""
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
        failure = failure_of(state, run)
        finish = run.finish_reason
        if holding:
            held += piece
            text, calls = tool_answer(run, body, held)  # type: ignore[arg-type]
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
        fill_record(record, run, run.stream.text, finish=record.finish_reason)
        finish_record(state, record, started)


def fill_record(record: RequestRecord, run: Run, text: str, finish: str | None = None) -> None:
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
