"""Batched generation for the server: one worker thread, a bounded queue, request-level batching.

Requests wait in a bounded queue (full -> :class:`QueueFull`, answered 429). The worker takes the
oldest request, waits up to ``max_wait_ms`` for more with the same adapter (up to
``max_batch_size``), and decodes them together with a KV cache: one left-padded prefill, then one
token per step for every row. A row stops at a stop token, at its ``max_tokens``, at its deadline
(``timeout``) or when it is cancelled (client gone); the batch ends when every row has stopped.
Tokens are handed to the request as they come (streaming), with their log-probabilities.

:class:`ServingEngine` is what the HTTP app needs from an engine; this one and the vLLM engine
(:mod:`tunelab.serve.vllm_engine`) both satisfy it.
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from peft import PeftModel
from transformers import DynamicCache, PreTrainedTokenizerBase


class QueueFull(Exception):
    """The request queue is at its limit."""


@dataclass
class GenerationRequest:
    """One request's inputs and, as it runs, its outputs."""

    prompt_ids: list[int]
    max_tokens: int
    stop_ids: set[int]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    adapter: str | None = None
    timeout: float = 60.0
    on_token: Callable[[int], None] | None = None  # called from the worker thread
    on_done: Callable[[], None] | None = None
    # Filled in by the engine:
    submitted: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None  # stop | length | timeout | cancelled | error
    error: str | None = None
    cancelled: bool = False
    batch_size: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating for this request (client disconnected)."""
        self.cancelled = True

    def add_token(self, token: int, logprob: float | None) -> None:
        """Record one generated token and its log-probability (None: unknown), and pass it on (engine side)."""
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if self.on_token is not None:
            self.on_token(token)

    def finish(self, reason: str, error: str | None = None) -> None:
        """Record how generation ended and wake whoever waits for it (engine side; called once)."""
        self.finish_reason, self.error = reason, error
        self.finished_at = time.monotonic()
        self.done.set()
        if self.on_done is not None:
            self.on_done()


@dataclass
class EngineStats:
    """Counters the /metrics endpoint reports."""

    batches: int = 0
    requests: int = 0
    generated_tokens: int = 0
    max_batch_seen: int = 0


class ServingEngine(Protocol):
    """What the HTTP app (:mod:`tunelab.serve.app`) needs from a generation engine.

    ``submit`` returns at once (or raises :class:`QueueFull`); from then on the engine, from any
    thread, calls ``request.add_token`` for each token and ``request.finish`` exactly once with
    stop, length, timeout, cancelled or error. It stops soon after ``request.cancel()`` (client
    gone, stop string seen) and after ``request.timeout`` seconds from ``request.submitted``.
    """

    tokenizer: PreTrainedTokenizerBase
    stats: EngineStats

    @property
    def queued(self) -> int:
        """Requests accepted but not yet generating (what ``max_queue`` bounds)."""
        ...

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        """Accept a request (returns at once); raises :class:`QueueFull` when the queue is at its limit."""
        ...

    def close(self) -> None:
        """Stop generating and release the engine's threads and processes."""
        ...


class GenerationEngine:
    """A model (optionally with named LoRA adapters) behind a queue and a batching worker thread."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, max_batch_size: int = 8,
                 max_wait_ms: float = 10.0, max_queue: int = 64) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.queue: queue.Queue[GenerationRequest] = queue.Queue(maxsize=max_queue)
        self.pending: deque[GenerationRequest] = deque()  # taken from the queue but waiting for their adapter
        self.stats = EngineStats()
        forward = (model.get_base_model() if isinstance(model, PeftModel) else model).forward
        # transformers renamed past_key_values to cache in 5.x; accept both.
        self.cache_kwarg = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tunelab-generation", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Requests waiting to be generated."""
        return self.queue.qsize() + len(self.pending)

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        """Queue a request (returns at once).

        Raises:
            QueueFull: the queue is at ``max_queue``.
        """
        try:
            self.queue.put_nowait(request)
        except queue.Full:
            raise QueueFull from None
        return request

    def close(self) -> None:
        """Stop the worker thread."""
        self._stop.set()
        self._thread.join(timeout=10)

    # -- worker ---------------------------------------------------------------------------------

    def _next(self, timeout: float) -> GenerationRequest | None:
        if self.pending:
            return self.pending.popleft()
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _collect(self) -> list[GenerationRequest]:
        first = self._next(timeout=0.1)
        if first is None:
            return []
        batch, deferred = [first], []
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            request = self._next(timeout=max(remaining, 0.0)) if remaining > 0 or self.pending else None
            if request is None:
                break
            (batch if request.adapter == first.adapter else deferred).append(request)
        self.pending.extendleft(reversed(deferred))
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            live = [r for r in batch if not self._expired(r)]
            if live:
                try:
                    self._generate(live)
                except Exception as exc:  # a failed batch must not kill the server
                    for request in live:
                        if request.finish_reason is None:
                            request.finish("error", error=f"{type(exc).__name__}: {exc}")

    def _expired(self, request: GenerationRequest) -> bool:
        if request.cancelled or time.monotonic() - request.submitted > request.timeout:
            request.finish("cancelled" if request.cancelled else "timeout")
            return True
        return False

    def _adapter(self, name: str | None) -> AbstractContextManager:
        """Activate adapter ``name``; for None, the base model (adapters disabled) while in the context."""
        if not isinstance(self.model, PeftModel):
            return nullcontext()
        if name is None:
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return nullcontext()

    def _pick(self, logits: torch.Tensor, request: GenerationRequest, generator: torch.Generator | None) -> int:
        if request.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / request.temperature, dim=-1)
        if request.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < request.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=generator))

    @torch.no_grad()
    def _generate(self, batch: list[GenerationRequest]) -> None:
        with self._adapter(batch[0].adapter):
            self._decode(batch)

    def _decode(self, batch: list[GenerationRequest]) -> None:
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(batch))
        width = max(len(r.prompt_ids) for r in batch)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = [torch.Generator().manual_seed(r.seed) if r.seed is not None and r.temperature > 0 else None
                      for r in batch]
        model = self.model
        cache = DynamicCache()
        for request in batch:
            request.batch_size = len(batch)
        active = list(range(len(batch)))
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{self.cache_kwarg: cache}).logits[:, -1, :]
        while active:
            step_logits = logits.float().cpu()
            log_probs = torch.log_softmax(step_logits, dim=-1)
            next_ids = [pad] * len(batch)
            for row in list(active):
                request = batch[row]
                token = self._pick(step_logits[row], request, generators[row])
                request.add_token(token, float(log_probs[row, token]))
                self.stats.generated_tokens += 1
                next_ids[row] = token
                reason = (
                    "stop" if token in request.stop_ids
                    else "length" if len(request.tokens) >= request.max_tokens
                    else "cancelled" if request.cancelled
                    else "timeout" if time.monotonic() - request.submitted > request.timeout
                    else None
                )
                if reason is not None:
                    active.remove(row)
                    request.finish(reason)
            if not active:
                break
            mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=mask.dtype, device=self.device)], dim=1)
            positions = positions[:, -1:] + 1
            logits = model(input_ids=torch.tensor([next_ids], device=self.device).T, attention_mask=mask,
                           position_ids=positions, use_cache=True, **{self.cache_kwarg: cache}).logits[:, -1, :]
