"""Monitoring for ``tunelab serve``: the request store, the alert thread and the serve run's record."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.monitor.alerts import AlertMonitor, load_rules
from tunelab.monitor.durations import parse_duration
from tunelab.monitor.store import RequestStore
from tunelab.serve.request_log import RecordSink
from tunelab.track.provenance import tunelab_home

logger = logging.getLogger("tunelab.monitor")


def default_monitor_db(name: str) -> Path:
    """``$TUNELAB_HOME/monitor/NAME.db`` (``~/.tunelab/monitor/NAME.db``)."""
    return tunelab_home() / "monitor" / f"{name}.db"


@dataclass
class ServeMonitoring:
    """What a running server records into; :meth:`close` flushes and stops it all."""

    store: RequestStore | None = None
    alerts: AlertMonitor | None = None
    run_id: str | None = None
    sinks: list[RecordSink] = field(default_factory=list)

    def register(self, model_dir: str, adapters: dict[str, str], settings: dict[str, object]) -> str:
        """Register the server as a ``serve`` run whose inputs are the model and adapters it serves."""
        from tunelab.track.record import Artifact, model_artifact, record_run

        inputs = [model_artifact(model_dir)] + [Artifact("adapter", path) for path in adapters.values()]
        outputs = [Artifact("monitor-db", str(self.store.path))] if self.store else []
        info = record_run("serve", None, inputs=inputs, outputs=outputs, config=settings, status="running",
                          details={"base_model": model_dir})
        self.run_id = info["run_id"]
        if self.store is not None:
            self.store.set_meta("serve_run_id", self.run_id)
        return self.run_id

    def metrics(self) -> dict[str, float]:
        """The store's health for /metrics: rows written and dropped, writer restarts."""
        if self.store is None:
            return {}
        stats = self.store.stats
        return {"tunelab_monitor_rows_written_total": stats.written, "tunelab_monitor_rows_dropped_total": stats.dropped,
                "tunelab_monitor_writer_restarts_total": stats.restarts}

    def close(self) -> None:
        """Stop the alert thread, write what is queued, mark the serve run stopped."""
        from tunelab.track.record import mark_finished

        if self.alerts is not None:
            self.alerts.close()
        if self.store is not None:
            self.store.close()
            if self.store.stats.dropped:
                logger.warning("monitoring store %s: %d records were dropped", self.store.path,
                               self.store.stats.dropped)
        if self.run_id is not None:
            mark_finished(self.run_id, "stopped")


def start_serve_monitoring(model_dir: str, name: str, db: str | None = None, enabled: bool = True,
                           max_age: str | None = "30d", max_rows: int | None = None,
                           alert_rules: str | None = None) -> ServeMonitoring:
    """Open the request store (and the alert thread) for a server, before its model loads.

    Args:
        model_dir: the served model (recorded in the store for drift checks).
        name: the model's name in the API (the default store is named after it).
        db: store path (default :func:`default_monitor_db`).
        enabled: False for no store (``--no-monitor``).
        max_age: retention by age (a duration such as 30d; None keeps everything).
        max_rows: retention by count (None: no limit).
        alert_rules: YAML rules file; checked by a background thread.

    Raises:
        MonitorError, ConfigError: an unusable store path or rules file (before the model loads).
    """
    if not enabled:
        if alert_rules:
            logger.warning("--alert-rules is ignored with --no-monitor: alerts read the request store")
        return ServeMonitoring()
    rules = load_rules(alert_rules) if alert_rules else None
    store = RequestStore(db or default_monitor_db(name),
                         max_age_s=parse_duration(max_age, "--monitor-max-age") if max_age else None,
                         max_rows=max_rows)
    store.set_meta("model_path", str(Path(model_dir).expanduser().resolve()))
    store.set_meta("model_name", name)
    alerts = AlertMonitor(store, rules) if rules else None
    return ServeMonitoring(store=store, alerts=alerts, sinks=[store])
