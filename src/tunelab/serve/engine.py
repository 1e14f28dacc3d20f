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
import json
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from peft import PeftModel
from transformers import DynamicCache, PreTrainedTokenizerBase

from tunelab.serve.grammar import TokenConstraint
from tunelab.serve.sampling import TokenChooser


def model_context_length(model_dir: str | Path) -> int | None:
    """The model's context in tokens (``max_position_embeddings`` of its config.json), None when unknown."""
    config_file = Path(model_dir) / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    limit = config.get("max_position_embeddings")
    return int(limit) if isinstance(limit, int) and limit > 0 else None


class QueueFull(Exception):
    """The request queue is at its limit."""


TopLogprobs = list[tuple[int, float]]  # (token id, log-probability), most likely first


@dataclass
class GenerationRequest:
    """One request's inputs and, as it runs, its outputs.

    Log-probabilities are those of the model's own distribution (before penalties, bias, grammar
    and temperature). ``top_logprobs`` asks for that many alternatives per generated token;
    ``prompt_logprobs`` (None: not wanted) for each prompt token's log-probability and that many
    alternatives (the first prompt token has none: nothing predicts it). ``max_tokens`` 0 scores
    the prompt without generating.
    """

    prompt_ids: list[int]
    max_tokens: int
    stop_ids: set[int]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    adapter: str | None = None
    timeout: float = 60.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    constraint: TokenConstraint | None = None
    json_schema: dict | None = None  # the schema ``constraint`` enforces (for engines that constrain themselves)
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    on_token: Callable[[int], None] | None = None  # called from the worker thread
    on_done: Callable[[], None] | None = None
    # Filled in by the engine:
    submitted: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[TopLogprobs] = field(default_factory=list)  # per generated token, when top_logprobs > 0
    prompt_token_logprobs: list[float | None] = field(default_factory=list)
    prompt_top: list[TopLogprobs | None] = field(default_factory=list)
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

    def add_token(self, token: int, logprob: float | None, top: TopLogprobs | None = None) -> None:
        """Record one generated token, its log-probability (None: unknown) and alternatives, and pass it on."""
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if top is not None:
            self.top.append(top)
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if self.on_token is not None:
            self.on_token(token)

    def finish(self, reason: str, error: str | None = None) -> None:
        """Record how generation ended and wake whoever waits for it (engine side; only the first call counts)."""
        if self.finish_reason is not None:
            return
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
    vocab_size: int  # width of the model's logits: token ids below it are valid

    @property
    def queued(self) -> int:
        """Requests accepted but not yet generating (what ``max_queue`` bounds)."""
        ...

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        """Accept a request (returns at once); raises :class:`QueueFull` when the queue is at its limit."""
        ...

    def unsupported(self, request: GenerationRequest) -> str | None:
        """The API field (e.g. ``response_format``) of ``request`` this engine cannot honour, or None."""
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
        parameters = inspect.signature(forward).parameters
        self.cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        self.keeps_last_logits = "logits_to_keep" in parameters  # prefill computes only the last position's logits
        self.vocab_size = int(model.config.vocab_size)
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

    def unsupported(self, request: GenerationRequest) -> str | None:
        """None: this engine implements every field the app passes on."""
        return None

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

    @torch.no_grad()
    def _generate(self, batch: list[GenerationRequest]) -> None:
        with self._adapter(batch[0].adapter):
            self._decode(batch)

    def _choosers(self, batch: list[GenerationRequest]) -> list[tuple[GenerationRequest, TokenChooser]]:
        """Each request with its sampling state; a request whose state cannot be built fails alone."""
        rows = []
        for request in batch:
            try:
                chooser = TokenChooser(self.vocab_size, request.temperature, request.top_p, request.seed,
                                       request.presence_penalty, request.frequency_penalty, request.logit_bias,
                                       request.constraint, request.stop_ids)
            except Exception as exc:  # e.g. a seed torch refuses: this request fails, not its batch
                request.finish("error", error=f"{type(exc).__name__}: {exc}")
                continue
            rows.append((request, chooser))
        return rows

    def _prefill(self, batch: list[GenerationRequest]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache]:
        """One left-padded forward pass over the prompts; returns last-position logits, mask, positions, cache.

        Requests that asked for prompt log-probabilities get them here.
        """
        width = max(len(r.prompt_ids) for r in batch)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        scoring = any(r.prompt_logprobs is not None for r in batch)
        extra = {} if scoring or not self.keeps_last_logits else {"logits_to_keep": 1}
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            **{self.cache_kwarg: cache}, **extra).logits
        if scoring:
            for row, request in enumerate(batch):
                if request.prompt_logprobs is not None:
                    self._score_prompt(request, logits[row, width - len(request.prompt_ids):])
        return logits[:, -1, :], mask, positions, cache

    @staticmethod
    def _score_prompt(request: GenerationRequest, logits: torch.Tensor) -> None:
        """Fill ``request.prompt_token_logprobs`` (and alternatives) from the logits over its prompt."""
        log_probs = torch.log_softmax(logits[:-1].float(), dim=-1)
        targets = torch.tensor(request.prompt_ids[1:], device=log_probs.device)
        chosen = log_probs.gather(1, targets[:, None])[:, 0].cpu().tolist()
        request.prompt_token_logprobs = [None, *chosen]
        request.prompt_top = [None] * len(request.prompt_ids)
        if request.prompt_logprobs:
            values, indices = torch.topk(log_probs, min(request.prompt_logprobs, log_probs.shape[-1]), dim=-1)
            request.prompt_top = [None, *[list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]]

    def _decode(self, batch: list[GenerationRequest]) -> None:
        rows = self._choosers(batch)
        if not rows:
            return
        batch = [request for request, _ in rows]
        try:
            logits, mask, positions, cache = self._prefill(batch)
        except Exception:
            if len(batch) == 1:
                raise
            for request in batch:  # one request may be at fault: give each its own try
                try:
                    self._decode([request])
                except Exception as exc:
                    request.finish("error", error=f"{type(exc).__name__}: {exc}")
            return
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(batch))
        for request in batch:
            request.batch_size = len(batch)
        active = [row for row, request in enumerate(batch) if not self._scored_only(request)]
        pad = self.tokenizer.pad_token_id or 0
        while active:
            step_logits = logits.float().cpu()
            log_probs = torch.log_softmax(step_logits, dim=-1)
            next_ids = [pad] * len(batch)
            for row in list(active):
                request, chooser = rows[row]
                try:
                    token = chooser.choose(step_logits[row])
                    chooser.taken(token)
                except Exception as exc:  # this request fails; the others in the batch go on
                    active.remove(row)
                    request.finish("error", error=f"{type(exc).__name__}: {exc}")
                    continue
                top = None
                if request.top_logprobs:
                    values, indices = torch.topk(log_probs[row], request.top_logprobs)
                    top = list(zip(indices.tolist(), values.tolist()))
                request.add_token(token, float(log_probs[row, token]), top)
                self.stats.generated_tokens += 1
                next_ids[row] = token
                reason = (
                    "stop" if token in request.stop_ids or chooser.complete
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
            logits = self.model(input_ids=torch.tensor([next_ids], device=self.device).T, attention_mask=mask,
                                position_ids=positions, use_cache=True, **{self.cache_kwarg: cache}).logits[:, -1, :]

    @staticmethod
    def _scored_only(request: GenerationRequest) -> bool:
        """Finish a request that only wanted its prompt scored (max_tokens 0)."""
        if request.max_tokens > 0:
            return False
        request.finish("length")
        return True
