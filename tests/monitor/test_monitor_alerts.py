"""Alerts: robust z-scores over a rolling window, YAML rules, the webhook (on 127.0.0.1)."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tunelab.cli import main
from tunelab.errors import ConfigError
from tunelab.monitor.alerts import AlertMonitor, check_store, load_rules, robust_z, send_webhook
from tunelab.monitor.store import RequestStore, read_table
from tunelab.serve.request_log import RequestRecord

RULES = """
bucket: 1m
window: 60m
check_every: 1s
cooldown: 10m
rules:
  - name: latency-spike
    metric: latency_p95
    z: 4
    min_requests: 10
  - name: errors
    metric: error_rate
    z: 4
    above: 0.05
"""


class Webhook:
    """An HTTP server on 127.0.0.1 that keeps the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.received = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                outer.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()
                outer.received.set()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


def write_minutes(store: RequestStore, now: float, minutes: int, latency: float, error_share: float,
                  rng: np.random.Generator, per_minute: int = 30) -> None:
    """``per_minute`` requests in each of the ``minutes`` minutes ending at ``now``."""
    for minute in range(minutes):
        start = now - (minutes - minute) * 60
        for k in range(per_minute):
            failed = rng.random() < error_share
            store.record(RequestRecord(time=start + 60 * (k + 0.5) / per_minute, model="tiny", endpoint="chat",
                                       status=500 if failed else 200, prompt_tokens=20, completion_tokens=10,
                                       latency_s=float(latency * rng.lognormal(0, 0.1)), mean_logprob=-2.0))


def rules_file(tmp_path: Path, text: str = RULES, webhook: str | None = None) -> Path:
    path = tmp_path / "alerts.yaml"
    path.write_text(text + (f"webhook: {webhook}\n" if webhook else ""))
    return path


def test_robust_z_ignores_an_earlier_spike_in_the_history():
    history = np.array([0.10, 0.11, 0.09, 0.10, 0.12, 0.10, 0.11, 0.09, 0.10, 5.0])  # one old spike
    z, median = robust_z(history, 0.5, "latency_p95")
    assert median == pytest.approx(0.10) and z > 20
    z_calm, _ = robust_z(history, 0.11, "latency_p95")
    assert abs(z_calm) < 2
    standard = (0.5 - history.mean()) / history.std()  # what a plain z-score would say: nothing
    assert standard < 1
    assert robust_z(np.zeros(20), 0.004, "error_rate")[0] < 1  # the floor: a flat zero history is not hair-trigger


def test_latency_and_error_spikes_fire_and_calm_traffic_does_not(tmp_path):
    rules, rng, now = load_rules(rules_file(tmp_path)), np.random.default_rng(0), 1_800_000_000.0
    calm = RequestStore(tmp_path / "calm.db", flush_seconds=0.05)
    write_minutes(calm, now, 61, latency=0.1, error_share=0.01, rng=rng)
    calm.close()
    assert check_store(tmp_path / "calm.db", rules, now) == []

    spiky = RequestStore(tmp_path / "spiky.db", flush_seconds=0.05)
    write_minutes(spiky, now - 60, 60, latency=0.1, error_share=0.01, rng=rng)
    write_minutes(spiky, now, 1, latency=0.6, error_share=0.3, rng=rng)  # the newest minute
    spiky.close()
    alerts = {a.rule: a for a in check_store(tmp_path / "spiky.db", rules, now)}
    assert set(alerts) == {"latency-spike", "errors"}
    latency = alerts["latency-spike"]
    assert latency.value > 0.5 and latency.baseline == pytest.approx(0.1, rel=0.2) and latency.z > 4
    assert alerts["errors"].value > 0.05 and "errors: error_rate" in alerts["errors"].message
    assert latency.requests >= 10


def test_rule_files_are_validated_with_the_file_and_key_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rules:\n  - name: x\n    metric: latency_p95\n    zscore: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: rules.0.zscore: unknown key"):
        load_rules(path)
    path.write_text("rules:\n  - name: x\n    metric: latency_p99\n")
    with pytest.raises(ConfigError, match=r"rules.0.metric"):
        load_rules(path)
    path.write_text("rules:\n  - name: quiet\n    metric: error_rate\n")
    with pytest.raises(ConfigError, match="needs z, above or both"):
        load_rules(path)
    path.write_text("bucket: 5 minutes\nrules:\n  - {name: a, metric: error_rate, above: 0.1}\n")
    with pytest.raises(ConfigError, match="bucket"):
        load_rules(path)
    path.write_text("rules: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_rules(path)


def test_cli_check_posts_to_the_webhook_and_exits_1(tmp_path, webhook, capsys):
    rng, now = np.random.default_rng(1), time.time()
    store = RequestStore(tmp_path / "m.db", flush_seconds=0.05)
    write_minutes(store, now - 60, 60, latency=0.1, error_share=0.0, rng=rng)
    write_minutes(store, now, 1, latency=0.1, error_share=0.5, rng=rng)
    store.close()
    rules = rules_file(tmp_path, webhook=webhook.url)
    assert main(["monitor", "alerts", "--db", str(tmp_path / "m.db"), "--rules", str(rules)]) == 1
    assert "alert errors" in capsys.readouterr().out
    assert webhook.received.wait(10)
    body = webhook.bodies[0]
    assert body["rule"] == "errors" and body["metric"] == "error_rate" and body["value"] > 0.3
    assert body["source"] == "tunelab" and body["text"].startswith("alert errors")
    assert main(["monitor", "alerts", "--db", str(tmp_path / "m.db"), "--rules", str(rules_file(tmp_path)),
                 "--model", "other"]) == 0


def test_the_server_thread_dispatches_once_per_cooldown(tmp_path, webhook, caplog):
    rng, now = np.random.default_rng(2), time.time()
    store = RequestStore(tmp_path / "m.db", flush_seconds=0.05)
    write_minutes(store, now - 60, 60, latency=0.1, error_share=0.0, rng=rng)
    write_minutes(store, now, 1, latency=0.8, error_share=0.0, rng=rng)
    with caplog.at_level(logging.WARNING, logger="tunelab.monitor"):
        monitor = AlertMonitor(store, load_rules(rules_file(tmp_path, webhook=webhook.url)))
        assert webhook.received.wait(20)  # the background check found the spike
        assert monitor.check_now() == []  # within the cooldown: not repeated
        monitor.close()
    store.close()
    assert [b["rule"] for b in webhook.bodies] == ["latency-spike"]
    assert "alert latency-spike" in caplog.text
    saved = read_table(tmp_path / "m.db", "alerts")
    assert [a["rule"] for a in saved] == ["latency-spike"] and saved[0]["z"] > 4


def test_an_unreachable_webhook_is_a_warning(caplog):
    from tunelab.monitor.alerts import Alert

    alert = Alert("r", "error_rate", 0.0, 0.5, 0.0, 10.0, 20, "alert r")
    with caplog.at_level(logging.WARNING, logger="tunelab.monitor"):
        assert send_webhook("http://127.0.0.1:9/none", alert, timeout=2) is False
    assert "webhook" in caplog.text
