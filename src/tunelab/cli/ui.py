"""``tunelab ui``: start the web app (the app is :mod:`tunelab.ui.app`, the server :mod:`tunelab.ui.run`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_ui(args: argparse.Namespace) -> int:
    from tunelab.ui.run import serve_ui

    def ready(address: str, registry: Path) -> None:
        print(f"tunelab ui: {address} (registry {registry}; Ctrl-C stops the UI, not the runs it launched)",
              flush=True)

    serve_ui(args.host, args.port, runs_db=args.runs_db, token=args.token, state_dir=args.state_dir, on_ready=ready)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``tunelab ui``."""
    ui = commands.add_parser("ui", help="a local web app: runs, live curves, launch, data, eval, playground, monitor")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--host", default="127.0.0.1", help="listen address (any but loopback needs a token)")
    ui.add_argument("--runs-db", help="run registry (default $TUNELAB_REGISTRY or ~/.tunelab/runs.db)")
    ui.add_argument("--token", help="token required by the UI (default: a random one when --host is not loopback)")
    ui.add_argument("--state-dir", help="the UI's own files: job logs, playground labels (default: beside the registry)")
    ui.set_defaults(func=_cmd_ui)
