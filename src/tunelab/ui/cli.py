"""``tunelab ui``: start the web app (argument parsing and the server; the app is :mod:`tunelab.ui.app`)."""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path


def _cmd_ui(args: argparse.Namespace) -> int:
    from tunelab.serve.server import GracefulServer, server_config
    from tunelab.track.registry import registry_path
    from tunelab.ui.app import create_ui_app
    from tunelab.ui.auth import is_loopback
    from tunelab.ui.state import UISettings

    registry = registry_path(args.runs_db).resolve()
    token = args.token
    if not is_loopback(args.host) and not token:
        token = secrets.token_urlsafe(24)
    settings = UISettings(registry=registry, state_dir=Path(args.state_dir).resolve() if args.state_dir
                          else registry.parent / "ui", workdir=Path.cwd(), token=token)
    app = create_ui_app(settings)

    def ready(url: str) -> None:
        shown = url.replace("0.0.0.0", "HOST") + (f"/?token={token}" if token else "/")
        print(f"tunelab ui: {shown} (registry {registry}; Ctrl-C stops the UI, not the runs it launched)",
              flush=True)

    config = server_config(app, args.host, args.port, read_timeout=30.0, keep_alive=5.0, max_connections=200,
                           graceful_timeout=5.0)
    try:
        GracefulServer(config, on_ready=ready).run()
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


def add_ui_command(commands: argparse._SubParsersAction) -> None:
    """Register ``tunelab ui`` on the top-level subcommands."""
    ui = commands.add_parser("ui", help="a local web app: runs, live curves, launch, data, eval, playground, monitor")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--host", default="127.0.0.1", help="listen address (any but loopback needs a token)")
    ui.add_argument("--runs-db", help="run registry (default $TUNELAB_REGISTRY or ~/.tunelab/runs.db)")
    ui.add_argument("--token", help="token required by the UI (default: a random one when --host is not loopback)")
    ui.add_argument("--state-dir", help="the UI's own files: job logs, playground labels (default: beside the registry)")
    ui.set_defaults(func=_cmd_ui)
