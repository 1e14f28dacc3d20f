"""The server's front door (plain ASGI middleware): API key, body size, and a word about every refusal.

It reads a POST body itself, up to ``max_body_bytes`` (413 past that, whether the client sent a
``Content-Length`` or chunks), and hands the app the whole body; nothing bigger is ever parsed or
tokenized. Every request it refuses (401, 413, 400 for a bad length) is reported to ``on_reject``
so the request store and /metrics count it like any other answer. Being plain ASGI (not
Starlette's BaseHTTPMiddleware) it leaves the app's ``receive`` intact, so handlers still hear
the client disconnect.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


def error_body(status: int, message: str, kind: str, code: str | None = None) -> bytes:
    """An OpenAI-shaped error as bytes (ASCII-escaped, so any text can be sent)."""
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


class RequestGuard:
    """ASGI middleware in front of the app (see the module doc).

    Args:
        app: the ASGI app.
        api_key: required as ``Authorization: Bearer KEY`` on every path but /health (None: open).
        max_body_bytes: the largest request body accepted.
        on_reject: called with (path, status, message) for every request refused here.
    """

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int,
                 on_reject: Callable[[str, int, str], None]) -> None:
        self.app, self.api_key, self.max_body_bytes, self.on_reject = app, api_key, max_body_bytes, on_reject

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        headers = {name.lower(): value for name, value in scope["headers"]}
        if self.api_key and path != "/health":
            given = headers.get(b"authorization", b"").decode("latin-1").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode("utf-8", "replace"), self.api_key.encode()):
                await self._refuse(send, path, 401, "invalid API key", "invalid_api_key", "invalid_api_key")
                return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await self._refuse(send, path, 400, "invalid Content-Length", "invalid_request_error")
                return
            if int(length) > self.max_body_bytes:
                await self._too_large(send, path)
                return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await self._too_large(send, path)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _too_large(self, send: Send, path: str) -> None:
        await self._refuse(send, path, 413, f"the request body is larger than this server's limit of "
                                            f"{self.max_body_bytes} bytes", "invalid_request_error", "body_too_large")

    async def _refuse(self, send: Send, path: str, status: int, message: str, kind: str,
                      code: str | None = None) -> None:
        self.on_reject(path, status, message)
        body = error_body(status, message, kind, code)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields the already-read body once, then the client's later messages (disconnect)."""
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
