"""Alerts on latency and error-rate spikes: robust z-scores over a rolling window, rules in YAML.

Traffic is cut into buckets (one minute by default). For each rule, the newest complete bucket's
value of a metric is compared with the buckets of the preceding window by a robust z-score,
``(value - median) / (1.4826 * MAD)``, which one earlier spike cannot inflate the way it would a
standard deviation. A spread floor (5% of the median; one percentage point for error rates) keeps
a perfectly flat history from turning any wobble into an alert. Fired alerts go to the log, to
the store (for the report) and, when the rules name one, to a webhook as JSON.

A rules file::

    bucket: 1m          # the unit of traffic compared
    window: 60m         # history the baseline comes from
    webhook: http://127.0.0.1:9000/hooks/tunelab   # optional
    rules:
      - name: latency-spike
        metric: latency_p95
        z: 4            # fire above this robust z-score
        min_requests: 20
      - name: errors
        metric: error_rate
        z: 4
        above: 0.05     # and only when more than 5% of requests fail
"""

from __future__ import annotations

import json
import logging
import threading
import time
import typing
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.errors import ConfigError, TunelabError, read_user_text
from tunelab.monitor.durations import parse_duration
from tunelab.monitor.store import Requests, RequestStore, read_requests

logger = logging.getLogger("tunelab.monitor")

Metric = Literal["latency_p50", "latency_p95", "ttft_p50", "error_rate", "requests_per_min", "perplexity_median"]
METRICS: tuple[str, ...] = typing.get_args(Metric)


class AlertRule(BaseModel):
    """One rule: a metric, and the z-score and/or absolute level above which it fires."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Name shown in the alert.")
    metric: Metric = Field(description="What is watched.")
    z: float | None = Field(None, gt=0, description="Fire when the robust z-score of the newest bucket is above this.")
    above: float | None = Field(None, description="Fire only when the value itself is above this.")
    min_requests: int = Field(10, ge=1, description="Requests the newest bucket needs before the rule is checked.")

    @model_validator(mode="after")
    def _has_a_condition(self) -> AlertRule:
        if self.z is None and self.above is None:
            raise ValueError(f"rule {self.name!r} needs z, above or both")
        return self


class AlertRules(BaseModel):
    """A rules file."""

    model_config = ConfigDict(extra="forbid")

    bucket: str = Field("1m", description="Bucket length (traffic unit compared).")
    window: str = Field("60m", description="History before the newest bucket that the baseline comes from.")
    min_history: int = Field(10, ge=3, description="History buckets with a value needed for a z-score.")
    check_every: str = Field("30s", description="How often a running server checks the rules.")
    cooldown: str = Field("10m", description="A rule that fired stays quiet this long.")
    webhook: str | None = Field(None, description="URL that receives each alert as a JSON POST.")
    webhook_timeout: float = Field(5.0, gt=0, description="Seconds to wait for the webhook.")
    rules: list[AlertRule] = Field(min_length=1)

    @field_validator("bucket", "window", "check_every", "cooldown")
    @classmethod
    def _duration(cls, value: str) -> str:
        try:
            parse_duration(value)
        except TunelabError as exc:
            raise ValueError(str(exc).removeprefix("duration ")) from None
        return value

    @field_validator("webhook")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    def seconds(self, name: str) -> float:
        """A duration field in seconds."""
        return parse_duration(getattr(self, name), name)


def load_rules(path: str | Path) -> AlertRules:
    """Read and validate a YAML rules file.

    Raises:
        ConfigError: naming the file and the key of each problem.
    """
    text = read_user_text(path, "alert rules file", ConfigError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML: "
                          f"{getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'rules' list (see docs/monitor.md)")
    try:
        return AlertRules.model_validate(data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            key = ".".join(str(p) for p in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown key"
            lines.append(f"{path}: {key or 'rules'}: {message}")
        raise ConfigError("\n".join(lines)) from None


@dataclass
class Alert:
    """A rule that fired."""

    rule: str
    metric: str
    time: float  # end of the bucket that fired
    value: float
    baseline: float | None
    z: float | None
    requests: int
    message: str


def bucket_value(requests: Requests, metric: str, bucket_s: float) -> tuple[float, int]:
    """A metric over one bucket's requests, and the number of requests it saw."""
    if metric == "requests_per_min":
        return len(requests) * 60.0 / bucket_s, len(requests)
    if metric == "error_rate":
        return (float(requests.failed.mean()) if len(requests) else float("nan")), len(requests)
    ok = requests.select(requests.succeeded)
    column = {"latency_p50": ok.latency_s, "latency_p95": ok.latency_s, "latency_p99": ok.latency_s,
              "ttft_p50": ok.time_to_first_token_s,
              "perplexity_median": ok.perplexity}[metric]
    column = column[np.isfinite(column)]
    if not len(column):
        return float("nan"), 0
    return float(np.quantile(column, {"latency_p95": 0.95, "latency_p99": 0.99}.get(metric, 0.5))), len(column)


def bucket_series(requests: Requests, metric: str, start: float, bucket_s: float, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Values and request counts of ``count`` buckets from ``start`` (``requests`` sorted by time)."""
    bounds = np.searchsorted(requests.time, start + bucket_s * np.arange(count + 1), side="left")
    values, sizes = np.full(count, np.nan), np.zeros(count, dtype=np.int64)
    for k in range(count):
        values[k], sizes[k] = bucket_value(requests.rows(bounds[k], bounds[k + 1]), metric, bucket_s)
    return values, sizes


def robust_z(history: np.ndarray, value: float, metric: str) -> tuple[float, float]:
    """The robust z-score of ``value`` against ``history``, and the history's median."""
    median = float(np.median(history))
    mad = float(np.median(np.abs(history - median))) * 1.4826
    floor = 0.01 if metric == "error_rate" else max(0.05 * abs(median), 1e-9)
    return (value - median) / max(mad, floor), median


def evaluate_rules(requests: Requests, rules: AlertRules, now: float) -> list[Alert]:
    """The rules that fire on the newest complete bucket ending at ``now``.

    ``requests`` must cover at least ``window + bucket`` before ``now``.
    """
    bucket_s, window_s = rules.seconds("bucket"), rules.seconds("window")
    history_buckets = max(1, int(round(window_s / bucket_s)))
    start = now - (history_buckets + 1) * bucket_s
    fired = []
    for rule in rules.rules:
        values, sizes = bucket_series(requests, rule.metric, start, bucket_s, history_buckets + 1)
        value, size = values[-1], sizes[-1]
        if not np.isfinite(value) or size < rule.min_requests:
            continue
        history = values[:-1][np.isfinite(values[:-1]) & (sizes[:-1] > 0)]
        z, baseline = (robust_z(history, value, rule.metric) if len(history) >= rules.min_history
                       else (None, None))
        if rule.z is not None and (z is None or z <= rule.z):
            continue
        if rule.above is not None and value <= rule.above:
            continue
        detail = f"{rule.metric} = {value:.4g}"
        if z is not None:
            detail += f", baseline median {baseline:.4g}, robust z {z:.1f}"
        fired.append(Alert(rule.name, rule.metric, now, value, baseline, z, int(size),
                           f"alert {rule.name}: {detail} over the last {rules.bucket} ({size} requests)"))
    return fired


def send_webhook(url: str, alert: Alert, timeout: float = 5.0) -> bool:
    """POST an alert as JSON (with a ``text`` field, which chat webhooks display); False on failure."""
    body = json.dumps({"source": "tunelab", "text": alert.message, **asdict(alert)}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError) as exc:
        logger.warning("alert webhook %s failed: %s", url, exc)
        return False


def check_store(db: str | Path, rules: AlertRules, now: float | None = None,
                model: str | None = None) -> list[Alert]:
    """Evaluate the rules on a store's traffic up to ``now`` (default: the current time)."""
    now = time.time() if now is None else now
    span = rules.seconds("window") + rules.seconds("bucket")
    return evaluate_rules(read_requests(db, since=now - span, until=now, model=model), rules, now)


class AlertMonitor:
    """A server-side thread that checks the rules every ``check_every`` and dispatches alerts.

    Each alert is logged, saved in the store and sent to the webhook; a rule that fired stays
    quiet for ``cooldown``. Failures of the check or the webhook are logged, never raised.
    """

    def __init__(self, store: RequestStore, rules: AlertRules) -> None:
        self.store, self.rules = store, rules
        self.sent: list[Alert] = []
        self._last_fired: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tunelab-alerts", daemon=True)
        self._thread.start()

    def check_now(self, now: float | None = None) -> list[Alert]:
        """Run one check and dispatch what fires (outside the cooldown); returns those alerts."""
        now = time.time() if now is None else now
        self.store.flush()
        dispatched = []
        for alert in check_store(self.store.path, self.rules, now):
            if now - self._last_fired.get(alert.rule, -float("inf")) < self.rules.seconds("cooldown"):
                continue
            self._last_fired[alert.rule] = now
            logger.warning(alert.message)
            self.store.record_alert(alert.time, alert.rule, alert.metric, alert.value, alert.baseline, alert.z,
                                    alert.message)
            if self.rules.webhook:
                send_webhook(self.rules.webhook, alert, self.rules.webhook_timeout)
            self.sent.append(alert)
            dispatched.append(alert)
        return dispatched

    def close(self) -> None:
        """Stop checking."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.rules.seconds("check_every")):
            try:
                self.check_now()
            except Exception as exc:  # noqa: BLE001 - a failed check must not stop the server's checks
                logger.warning("alert check failed: %s", exc)


def alert_rows(alerts: list[Alert]) -> list[dict[str, Any]]:
    """Alerts as dicts (for JSON output)."""
    return [asdict(a) for a in alerts]
