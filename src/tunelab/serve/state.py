"""What the server's parts share: its settings, its metrics, its state, and how an answered request is recorded."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tunelab.serve.engine import ServingEngine
from tunelab.serve.grammar import GrammarCompiler
from tunelab.serve.request_log import RecordSink, RequestRecord
from tunelab.serve.server import ConnectionStats

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
    context_length: int | None = None  # prompt + answer tokens the model can attend to (None: unknown)
    max_body_bytes: int = 4 * 1024 * 1024


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
class ServeState:
    """Everything the request handlers share (one per app)."""

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


def finish_record(state: ServeState, record: RequestRecord, started: float) -> None:
    """Count an answered request in /metrics and hand its record to every sink (never raises)."""
    record.latency_s = time.monotonic() - started
    state.metrics.observe(record)
    for sink in state.sinks:
        try:
            sink.record(record)
        except Exception:  # monitoring must never fail a request
            logger.exception("a request record could not be handed to %s", type(sink).__name__)
