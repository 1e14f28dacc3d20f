"""Running the app under uvicorn: connection timeouts, a connection limit, a graceful stop on SIGTERM.

* A client must send a whole request (headers and body) within ``read_timeout`` seconds of
  starting it, else its connection is closed: half-sent headers or a stalled body cannot hold a
  connection (and a file descriptor) forever. Idle keep-alive connections close after
  ``keep_alive`` seconds (uvicorn's own timer).
* At most ``max_connections`` connections and requests at once; beyond that uvicorn answers 503.
  The process's open-file limit is raised to its hard limit at start.
* SIGTERM (systemd, Docker, Kubernetes) and SIGINT stop accepting, let the requests in flight
  finish (up to ``graceful_timeout`` seconds) and return normally, so the caller can flush the
  request records and close the serve run. (uvicorn's own handler re-raises the signal after
  shutting down, which kills the process before any clean-up runs.)
"""

from __future__ import annotations

import asyncio
import resource
import socket
from collections.abc import Callable
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class ConnectionStats:
    """Connections closed by the server's own timeouts (reported in /metrics)."""

    read_timeouts: int = 0


def guarded_protocol(read_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for reading each request."""

    class GuardedH11Protocol(H11Protocol):
        _read_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
                self._disarm()  # the request is read: generation time is the request timeout's business
            elif self._read_deadline is None:
                self._arm()  # the next request on a kept-alive connection has begun

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._read_deadline = self.loop.call_later(read_timeout, self._read_timed_out)

        def _disarm(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def _read_timed_out(self) -> None:
            self._read_deadline = None
            if self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED) and not self.transport.is_closing():
                ConnectionStats.read_timeouts += 1
                self.transport.close()

    return GuardedH11Protocol


class GracefulServer(uvicorn.Server):
    """A uvicorn server that returns after SIGTERM/SIGINT (a second signal forces the exit)."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[str], None] | None = None) -> None:
        super().__init__(config)
        self.on_ready = on_ready

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Stop gracefully (without uvicorn re-raising the signal afterwards)."""
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start, then tell ``on_ready`` the URL (with the real port when port 0 was asked for)."""
        await super().startup(sockets)
        if self.started and self.on_ready is not None:
            self.on_ready(self.url)

    @property
    def url(self) -> str:
        """The base URL the server listens on."""
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
        except (ValueError, OSError):
            return soft
    return soft


def server_config(app: Any, host: str, port: int, read_timeout: float = 10.0, keep_alive: float = 5.0,
                  max_connections: int = 1000, graceful_timeout: float = 60.0) -> uvicorn.Config:
    """The uvicorn configuration tunelab serves with (see the module doc)."""
    return uvicorn.Config(app, host=host, port=port, log_level="warning", http=guarded_protocol(read_timeout),
                          timeout_keep_alive=max(1, round(keep_alive)), limit_concurrency=max_connections,
                          timeout_graceful_shutdown=max(1, round(graceful_timeout)))
