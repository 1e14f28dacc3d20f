"""``tunelab serve`` in the foreground: run uvicorn and say where and when the server is ready.

uvicorn at log level "warning" prints nothing when it starts; a user (or a script waiting for
the server) needs the URL and a "ready" line once the socket listens.
"""

from __future__ import annotations

import sys
import threading
import time

import uvicorn


def server_url(host: str, port: int) -> str:
    """``http://HOST:PORT/v1`` (IPv6 hosts in brackets)."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"


def ready_line(host: str, port: int, models: list[str]) -> str:
    """What ``tunelab serve`` prints once it listens."""
    return (f"ready: {server_url(host, port)} (OpenAI-compatible: /chat/completions, /completions, /models; "
            f"models: {', '.join(models)}); Ctrl+C stops")


def serve_until_stopped(app, host: str, port: int, models: list[str]) -> None:
    """Serve ``app`` until Ctrl+C; print :func:`ready_line` (with the bound port) once it listens."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))

    def announce() -> None:
        while not server.should_exit:
            if server.started:
                sockets = [s for srv in server.servers for s in srv.sockets]
                bound = sockets[0].getsockname()[1] if sockets else port
                print(ready_line(host, bound, models), flush=True)
                return
            time.sleep(0.05)

    threading.Thread(target=announce, name="serve-ready", daemon=True).start()
    print(f"starting the server on {server_url(host, port)} ...", file=sys.stderr, flush=True)
    server.run()
