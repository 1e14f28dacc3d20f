"""A scripted OpenAI-compatible chat server on 127.0.0.1 for tests (no network).

``ScriptedServer`` answers ``POST /v1/chat/completions`` with ``script(body) -> (status, content)``:
a ``str`` content is wrapped in a chat completion (or an error object for a non-200 status), a
:class:`Raw` content is sent as it is (a server that returns garbage). The script runs in the
request's handler thread, so it may block (on a ``threading.Event``) to make the client time out.
Every request body and its headers are recorded, in arrival order.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Raw:
    """A response body sent verbatim (with this content type) instead of a chat completion."""

    body: bytes
    content_type: str = "application/json"


Script = Callable[[dict], tuple[int, "str | Raw"]]


class ScriptedServer:
    """A threading HTTP server whose replies come from ``self.script``; records requests.

    Args:
        backend_class: the OpenAI-compatible backend class :meth:`backend` builds (the judge's or
            the generic one).
        model: the model name :meth:`backend` asks for.
    """

    def __init__(self, backend_class: type | None = None, model: str = "scripted-model") -> None:
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.script: Script = lambda body: (200, "[[C]]")
        self.backend_class = backend_class
        self.model = model
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer._lock:
                    outer.requests.append(body)
                    outer.headers.append(dict(self.headers))
                if self.path != "/v1/chat/completions":
                    status, content = 404, f"no route {self.path}"
                else:
                    status, content = outer.script(body)
                if isinstance(content, Raw):
                    data, content_type = content.body, content.content_type
                else:
                    data, content_type = json.dumps(_payload(body, status, content)).encode(), "application/json"
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (a timeout test)

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 64  # concurrent clients must not overflow the listen backlog

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def backend(self, **options: Any):
        """A backend of ``backend_class`` (default: the generic OpenAI-compatible one) pointed here, no backoff."""
        if self.backend_class is None:
            from tunelab.generation.backends import OpenAIBackend

            cls = OpenAIBackend
        else:
            cls = self.backend_class
        options.setdefault("backoff", 0)
        return cls(self.url, self.model, **options)

    def close(self) -> None:
        """Stop serving and free the port."""
        self.httpd.shutdown()
        self.httpd.server_close()


def _payload(body: dict, status: int, content: str) -> dict:
    if status != 200:
        return {"error": {"message": content, "type": "server_error"}}
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": body.get("model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    }


def user_text(body: dict) -> str:
    """The last message's content of a request body."""
    return body["messages"][-1]["content"]
