"""Batched generation for the server: one worker thread, a bounded queue, request-level batching.

Requests wait in a bounded queue (full -> :class:`QueueFull`, answered 429). The worker takes the
oldest request, waits up to ``max_wait_ms`` for more with the same adapter (up to
``max_batch_size``), and decodes them together with a KV cache: one left-padded prefill, then one
token per step for every row. A row stops at a stop token, at its ``max_tokens``, at its deadline
(``timeout``) or when it is cancelled (client gone); the batch ends when every row has stopped.
Tokens are handed to the request as they come (streaming), with their log-probabilities.
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


@dataclass
class EngineStats:
    """Counters the /metrics endpoint reports."""

    batches: int = 0
    requests: int = 0
    generated_tokens: int = 0
    max_batch_seen: int = 0


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
                            self._finish(request, "error", error=f"{type(exc).__name__}: {exc}")

    def _expired(self, request: GenerationRequest) -> bool:
        if request.cancelled or time.monotonic() - request.submitted > request.timeout:
            self._finish(request, "cancelled" if request.cancelled else "timeout")
            return True
        return False

    def _finish(self, request: GenerationRequest, reason: str, error: str | None = None) -> None:
        request.finish_reason, request.error = reason, error
        request.finished_at = time.monotonic()
        request.done.set()
        if request.on_done is not None:
            request.on_done()

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
                request.tokens.append(token)
                request.logprobs.append(float(log_probs[row, token]))
                if request.first_token_at is None:
                    request.first_token_at = time.monotonic()
                self.stats.generated_tokens += 1
                if request.on_token is not None:
                    request.on_token(token)
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
                    self._finish(request, reason)
            if not active:
                break
            mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=mask.dtype, device=self.device)], dim=1)
            positions = positions[:, -1:] + 1
            logits = model(input_ids=torch.tensor([next_ids], device=self.device).T, attention_mask=mask,
                           position_ids=positions, use_cache=True, **{self.cache_kwarg: cache}).logits[:, -1, :]
