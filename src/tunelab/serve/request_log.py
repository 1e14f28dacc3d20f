"""What the server records about every request, written off the request path.

:class:`RequestLog` takes :class:`RequestRecord` rows from request handlers (a non-blocking
put) and a background thread writes them in batches as JSON lines. The monitoring store
(:class:`tunelab.monitor.store.RequestStore`, SQLite) takes the same records; both are
:class:`RecordSink` objects the server hands every record to.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

logger = logging.getLogger("tunelab.serve")


@dataclass
class RequestRecord:
    """One served request."""

    time: float  # unix seconds when it arrived
    model: str
    endpoint: str
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    time_to_first_token_s: float | None = None
    mean_logprob: float | None = None  # of the generated tokens; exp(-x) is the output perplexity
    finish_reason: str | None = None
    batch_size: int = 0
    error: str | None = None
    prompt: str | None = None  # only when the server records text
    completion: str | None = None


class RecordSink(Protocol):
    """Anything that takes request records off the request path (``record`` must not block)."""

    def record(self, row: RequestRecord) -> None:
        """Take one record."""


class RequestLog:
    """Append-only JSONL log of :class:`RequestRecord`, flushed by a background thread."""

    def __init__(self, path: str | Path, flush_every: int = 64, flush_seconds: float = 1.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self.dropped = 0  # records that could not be written
        self._queue: queue.Queue[RequestRecord | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="tunelab-request-log", daemon=True)
        self._thread.start()

    def record(self, row: RequestRecord) -> None:
        """Queue a record (never blocks the caller)."""
        self._queue.put_nowait(row)

    def close(self) -> None:
        """Write what is queued and stop."""
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        pending: list[RequestRecord] = []
        stopping = False
        while not stopping:
            try:
                row = self._queue.get(timeout=self.flush_seconds)
                if row is None:
                    stopping = True
                else:
                    pending.append(row)
            except queue.Empty:
                pass
            if pending and (stopping or len(pending) >= self.flush_every or self._queue.empty()):
                self._append(pending)
                pending.clear()

    def _append(self, rows: list[RequestRecord]) -> None:
        """Append rows as JSON lines; a row or a write that fails is logged and counted, never fatal."""
        lines = []
        for row in rows:
            try:
                lines.append(json.dumps(asdict(row)) + "\n")  # ASCII-escaped: any text is writable
            except (TypeError, ValueError) as exc:
                self.dropped += 1
                logger.warning("request log %s: a record could not be written (%s)", self.path, exc)
        try:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.writelines(lines)
        except OSError as exc:
            self.dropped += len(lines)
            logger.warning("request log %s: %d records could not be written (%s)", self.path, len(lines), exc)
