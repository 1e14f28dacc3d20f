"""Monitor: a request store's traffic, latency, errors, tokens, drift and alerts.

The numbers are :func:`tunelab.monitor.report.report_summary`'s, the function behind
``tunelab monitor report``'s ``summary.json``, with the same ``--since``/``--bucket``/``--model``.
Stores are found in the registry (the ``monitor-db`` output of every ``tunelab serve`` run) and in
``$TUNELAB_HOME/monitor/``; any other path can be opened.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends

from tunelab.errors import TunelabError
from tunelab.ui.state import UIState, ui_state

router = APIRouter(prefix="/api/monitor")


@router.get("/stores")
def list_stores(state: UIState = Depends(ui_state)) -> dict[str, Any]:
    """Request stores: from serve runs in the registry and the default monitoring folder."""
    from tunelab.track.provenance import tunelab_home

    stores: dict[str, dict[str, Any]] = {}
    if state.settings.registry.is_file():
        for info in state.registry().list("serve", limit=2000):
            for output in info.get("outputs") or []:
                if output["kind"] == "monitor-db" and output["path"] not in stores:
                    stores[output["path"]] = {"path": output["path"], "serve_run": info["run_id"],
                                              "exists": Path(output["path"]).is_file()}
    folder = tunelab_home() / "monitor"
    for path in sorted(folder.glob("*.db")) if folder.is_dir() else []:
        stores.setdefault(str(path), {"path": str(path), "serve_run": None, "exists": True})
    return {"stores": list(stores.values())}


@router.get("/summary")
def summary(db: str, since: str | None = None, bucket: str | None = None, model: str | None = None) -> dict[str, Any]:
    """``tunelab monitor report``'s numbers for one store (``since``/``bucket``: durations such as 1h)."""
    from tunelab.monitor.durations import parse_duration
    from tunelab.monitor.report import report_summary

    if not Path(db).expanduser().is_file():
        raise TunelabError(f"{db}: no request store there")
    start = time.time() - parse_duration(since, "since") if since else None
    bucket_s = parse_duration(bucket, "bucket") if bucket else None
    return report_summary(Path(db).expanduser(), since=start, bucket_s=bucket_s, model=model or None)
