"""``tunelab ui``: the web app served under the serve stack's uvicorn server until Ctrl-C or SIGTERM."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

from tunelab.errors import TunelabError


class ListenError(TunelabError):
    """The UI's address cannot be listened on (in use, not allowed); exit code 1."""

    exit_code = 1


def serve_ui(host: str = "127.0.0.1", port: int = 7860, runs_db: str | None = None, token: str | None = None,
             state_dir: str | None = None, on_ready: Callable[[str, Path], None] | None = None) -> None:
    """Serve the UI on ``host:port`` over the run registry ``runs_db`` (default: the registry's default).

    A host that is not loopback gets a random token when none is given. ``on_ready`` is called with
    the address to open (``HOST`` for 0.0.0.0, the token in its query) and the registry's path.

    Raises:
        ListenError: the address cannot be listened on.
    """
    from tunelab.serve.server import GracefulServer, server_config
    from tunelab.track.registry import registry_path
    from tunelab.ui.app import create_ui_app
    from tunelab.ui.auth import is_loopback
    from tunelab.ui.state import UISettings

    registry = registry_path(runs_db).resolve()
    if not is_loopback(host) and not token:
        token = secrets.token_urlsafe(24)
    settings = UISettings(registry=registry, state_dir=Path(state_dir).resolve() if state_dir
                          else registry.parent / "ui", workdir=Path.cwd(), token=token)
    app = create_ui_app(settings)

    def ready(url: str) -> None:
        if on_ready is not None:
            on_ready(url.replace("0.0.0.0", "HOST") + (f"/?token={token}" if token else "/"), registry)

    config = server_config(app, host, port, read_timeout=30.0, keep_alive=5.0, max_connections=200,
                           graceful_timeout=5.0)
    try:
        GracefulServer(config, on_ready=ready).run()
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
