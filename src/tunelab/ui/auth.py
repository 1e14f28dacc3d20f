"""The UI's front door (plain ASGI middleware): a token off loopback, and no cross-site writes.

* On a host other than loopback a token is required: given once as ``?token=...`` (the URL
  ``tunelab ui`` prints), it is kept in an HttpOnly cookie; API clients may send
  ``Authorization: Bearer TOKEN`` instead.
* Without a token (loopback), the ``Host`` header must name a loopback address, so a web page
  cannot reach the UI through DNS rebinding.
* Every request that changes something (POST, PUT, DELETE) must carry ``X-Tunelab-UI: 1``, a header
  a cross-site page cannot add without the browser asking first (which the UI never allows), so
  another site cannot launch or stop runs through the user's browser.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs

COOKIE = "tunelab_ui_token"
WRITE_HEADER = b"x-tunelab-ui"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")

Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name, no port) is this machine only."""
    return host in LOOPBACK_NAMES or host.startswith("127.")


def _host_name(value: str) -> str:
    if value.startswith("["):
        return value.split("]")[0] + "]"
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class UIGuard:
    """ASGI middleware in front of the UI app (see the module doc).

    Args:
        app: the ASGI app.
        token: required on every request (None: loopback only, checked by the Host header).
    """

    def __init__(self, app: Any, token: str | None) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        set_cookie = None
        if self.token is None:
            if not is_loopback(_host_name(headers.get("host", "127.0.0.1"))):
                await _refuse(send, 403, "this UI listens on loopback only; open it as http://127.0.0.1:PORT")
                return
        else:
            given = self._given_token(scope, headers)
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                await _refuse(send, 401, "this UI needs its token: open the URL tunelab ui printed (…?token=...)")
                return
            if COOKIE not in SimpleCookie(headers.get("cookie", "")):
                set_cookie = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and headers.get(WRITE_HEADER.decode()) != "1":
            await _refuse(send, 403, "requests that change something must come from the UI (X-Tunelab-UI header)")
            return
        if set_cookie is None:
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"set-cookie", set_cookie.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    def _given_token(self, scope: dict[str, Any], headers: dict[str, str]) -> str | None:
        auth = headers.get("authorization", "")
        if auth.startswith("Bearer "):
            return auth.removeprefix("Bearer ").strip()
        cookie = SimpleCookie(headers.get("cookie", ""))
        if COOKIE in cookie:
            return cookie[COOKIE].value
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        return query.get("token", [None])[0]


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
