"""A tunelab app served by uvicorn on 127.0.0.1 in a thread, as ``tunelab serve`` runs it, and what its tests send it.

Used by the server's tests (tests/serve/), the monitoring of a served model (tests/monitor/) and the
tool-calling round trip (tests/data/test_tool_declarations.py).
"""

from __future__ import annotations

import threading
import time

import httpx

from tunelab.serve.server import GracefulServer, server_config

KEY = "secret-test-key"
QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]


class LiveServer:
    """uvicorn, configured as ``tunelab serve`` runs it, serving a tunelab app in a thread on a free port."""

    def __init__(self, app, **options) -> None:
        self.server = GracefulServer(server_config(app, "127.0.0.1", 0, **options))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        """Ask the server to exit and wait for its thread."""
        self.server.should_exit = True
        self.thread.join(timeout=10)


def error_of(response: httpx.Response) -> dict:
    """The ``error`` object of an error response, checked to have OpenAI's four fields."""
    body = response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    return body["error"]


def stream_and_hang_up(url: str) -> None:
    """Ask for a 64-token streamed chat answer and disconnect after its first token."""
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 64, "stream": True, "temperature": 1.0, "seed": 3}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        for line in response.iter_lines():
            if line.startswith("data:") and "content" in line:
                break
