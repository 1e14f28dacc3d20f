"""``tunelab monitor report``: one self-contained HTML page of a store's traffic over time.

Plots (inline SVG, no JavaScript, no extra dependency): requests per minute and error rate,
latency p50/p95 and time to first token, output perplexity, input/output lengths, and drift
statistics — the PSI of each bucket against the first quarter of the period, and the results
of ``tunelab monitor drift`` runs saved in the store. Tables list the alerts that fired. The
numbers behind every plot are written to ``summary.json`` next to ``report.html``.
"""

from __future__ import annotations

import html
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.monitor.alerts import bucket_value
from tunelab.monitor.drift import FEATURES, psi, sample_from_requests
from tunelab.monitor.durations import format_duration
from tunelab.monitor.store import MonitorError, Requests, read_meta, read_requests, read_table
from tunelab.outputs import write_text_output

BUCKETS = (60, 300, 900, 3600, 6 * 3600, 86400)  # chosen so that a plot has at most MAX_POINTS points
MAX_POINTS = 120
REPORT_FILES = ("report.html", "summary.json")  # what build_report writes into its folder
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def choose_bucket(span_s: float) -> float:
    """The smallest standard bucket giving at most :data:`MAX_POINTS` points over ``span_s``."""
    return next((b for b in BUCKETS if span_s / b <= MAX_POINTS), BUCKETS[-1])


def _time_label(seconds: float, span_s: float) -> str:
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%H:%M" if span_s <= 86400 else "%m-%d %H:%M")


def line_chart(title: str, times: np.ndarray, series: dict[str, np.ndarray], unit: str = "",
               width: int = 760, height: int = 230, x_range: tuple[float, float] | None = None) -> str:
    """An inline SVG line chart; NaN values leave gaps; ``x_range`` fixes the time axis (default: the data's)."""
    left, right, top, bottom = 64, 30, 28, 34
    finite = [v[np.isfinite(v)] for v in series.values()]
    finite = np.concatenate(finite) if finite else np.array([])
    if not len(times) or not len(finite):
        return f'<figure><figcaption>{html.escape(title)}</figcaption><p class="empty">no data</p></figure>'
    y_low, y_high = min(0.0, float(finite.min())), float(finite.max())
    y_high = y_high if y_high > y_low else y_low + 1.0
    x_low, x_high = x_range or (float(times[0]), float(times[-1]))
    x_high = x_high if x_high > x_low else x_low + 1.0
    sx = lambda x: left + (x - x_low) / (x_high - x_low) * (width - left - right)  # noqa: E731
    sy = lambda y: top + (1 - (y - y_low) / (y_high - y_low)) * (height - top - bottom)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{html.escape(title)}">',
             f'<text x="{left}" y="16" class="title">{html.escape(title)}</text>']
    for k in range(5):
        value = y_low + (y_high - y_low) * k / 4
        y = sy(value)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{value:.3g}{unit}</text>')
    span = x_high - x_low
    for k in range(5):
        x_value = x_low + span * k / 4
        parts.append(f'<text x="{sx(x_value):.1f}" y="{height - 12}" text-anchor="middle">'
                     f'{_time_label(x_value, span)}</text>')
    for (label, values), color in zip(series.items(), COLORS):
        runs, current = [], []
        for x, y in zip(times, values):
            if np.isfinite(y):
                current.append(f"{sx(float(x)):.1f},{sy(float(y)):.1f}")
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
        for run in runs:
            if len(run) == 1:
                cx, cy = run[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{color}"/>')
            else:
                parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{" ".join(run)}"/>')
    legend_x = left + 16 + 8 * len(title)  # on the title line, clear of the plot
    for (label, _), color in zip(series.items(), COLORS):
        parts.append(f'<rect x="{legend_x}" y="7" width="10" height="10" fill="{color}"/>'
                     f'<text x="{legend_x + 14}" y="16">{html.escape(label)}</text>')
        legend_x += 24 + 7 * len(label)
    parts.append("</svg>")
    return "<figure>" + "".join(parts) + "</figure>"


def _series(requests: Requests, start: float, bucket_s: float, count: int) -> dict[str, list[float | None]]:
    bounds = np.searchsorted(requests.time, start + bucket_s * np.arange(count + 1), side="left")
    metrics = ("requests_per_min", "error_rate", "latency_p50", "latency_p95", "latency_p99", "ttft_p50",
               "perplexity_median")
    out: dict[str, list[float]] = {name: [] for name in metrics}
    out |= {"input_length_median": [], "output_length_median": []}
    out |= {f"psi_{feature}": [] for feature in FEATURES}
    reference = sample_from_requests(requests.rows(0, max(1, len(requests) // 4)), "first quarter")
    for k in range(count):
        rows = requests.rows(bounds[k], bounds[k + 1])
        for name in metrics:
            out[name].append(bucket_value(rows, name, bucket_s)[0] if len(rows) else
                             (0.0 if name == "requests_per_min" else math.nan))
        sample = sample_from_requests(rows, "bucket")
        for feature in ("input_length", "output_length"):
            values = sample.values[feature]
            out[f"{feature}_median"].append(float(np.median(values)) if len(values) else math.nan)
        for feature in FEATURES:
            ref, new = reference.values[feature], sample.values[feature]
            # Few values per bucket: fewer bins, or PSI's sampling noise (about bins/n) hides real shifts.
            bins = min(10, len(new) // 20)
            out[f"psi_{feature}"].append(psi(ref, new, bins) if len(ref) >= 20 and bins >= 2 else math.nan)
    return {name: [None if not math.isfinite(v) else round(v, 6) for v in values] for name, values in out.items()}


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1600px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
.grid2 { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; border: 1px solid #ddd; border-radius: 4px; padding: 4px; }
svg text { font-size: 11px; fill: #444; } svg .title { font-size: 13px; font-weight: 600; fill: #222; }
svg .grid { stroke: #eee; } .empty { color: #888; width: 760px; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
.note { color: #666; font-size: 0.9em; }
"""


def report_summary(db: str | Path, since: float | None = None, until: float | None = None,
                   bucket_s: float | None = None, model: str | None = None) -> dict[str, Any]:
    """The numbers of a report (``summary.json``; ``tunelab ui`` shows the same): totals, latency
    quantiles, per-bucket series, alerts and saved drift checks of a store between ``since`` and ``until``.

    Raises:
        MonitorError: the store cannot be read or holds no requests in the period.
    """
    requests = read_requests(db, since=since, until=until, model=model)
    if not len(requests):
        raise MonitorError(f"--db {db}: no requests{' for ' + model if model else ''} in the chosen period; "
                           "widen --since or check that the server records into this file")
    meta = read_meta(db)
    start = float(requests.time[0]) if since is None else since
    end = max(float(requests.time[-1]) + 1e-6, until if until is not None else 0.0)
    bucket_s = bucket_s or choose_bucket(end - start)
    start = math.floor(start / bucket_s) * bucket_s
    count = max(1, math.ceil((end - start) / bucket_s))
    ok = requests.select(requests.succeeded)

    def quantile(q: float) -> float | None:
        return float(np.quantile(ok.latency_s, q)) if len(ok) else None

    return {
        "db": str(db), "model": model, "from": _when(start), "to": _when(end), "bucket_s": bucket_s,
        "requests": len(requests), "succeeded": len(ok), "failed": int(requests.failed.sum()),
        "latency_p50_s": quantile(0.5), "latency_p95_s": quantile(0.95), "latency_p99_s": quantile(0.99),
        "prompt_tokens": int(requests.prompt_tokens.sum()), "completion_tokens": int(requests.completion_tokens.sum()),
        "served_model": meta.get("model_path"), "serve_run": meta.get("serve_run_id"),
        "bucket_start": [float(t) for t in start + bucket_s * np.arange(count)],
        "series": _series(requests, start, bucket_s, count),
        "alerts": read_table(db, "alerts", since=start), "drift_checks": read_table(db, "drift_checks", since=start),
    }


def build_report(db: str | Path, out_dir: str | Path, since: float | None = None, until: float | None = None,
                 bucket_s: float | None = None, model: str | None = None) -> Path:
    """Write ``report.html`` and ``summary.json`` for a store's requests between ``since`` and ``until``.

    Args:
        db: the monitoring store.
        out_dir: output folder (created).
        since: first arrival time (unix seconds); None: the oldest request.
        until: end of the period; None: now.
        bucket_s: plot resolution in seconds; None: chosen from the period's length.
        model: only requests for this model/adapter name.

    Returns:
        The path of ``report.html``.

    Raises:
        MonitorError: the store cannot be read or holds no requests in the period.
    """
    summary = report_summary(db, since, until, bucket_s, model)
    bucket_s, series = summary["bucket_s"], summary["series"]
    start, count = summary["bucket_start"][0], len(summary["bucket_start"])
    times = start + bucket_s * (np.arange(count) + 0.5)
    alerts, checks = summary["alerts"], summary["drift_checks"]

    def plot(title: str, names: dict[str, str], unit: str = "") -> str:
        return line_chart(title, times, {label: np.array([math.nan if v is None else v for v in series[name]])
                                         for label, name in names.items()}, unit, x_range=(start, start + count * bucket_s))

    overview = [["requests", summary["requests"]], ["answered 200", summary["succeeded"]],
                ["failed (5xx, 429)", summary["failed"]], ["latency p50 s", summary["latency_p50_s"]],
                ["latency p95 s", summary["latency_p95_s"]], ["latency p99 s", summary["latency_p99_s"]],
                ["prompt tokens", summary["prompt_tokens"]], ["completion tokens", summary["completion_tokens"]],
                ["model", summary["served_model"] or ""], ["serve run", summary["serve_run"] or ""]]
    sections = [
        f"<h1>tunelab monitoring report</h1><p>{html.escape(str(db))}{' · model ' + html.escape(model) if model else ''}"
        f" · {summary['from']} to {summary['to']} · one point per {format_duration(bucket_s)}</p>",
        _table(["", "value"], overview),
        "<h2>Traffic and latency</h2><div class='grid2'>",
        plot("requests per minute", {"requests/min": "requests_per_min"}),
        plot("error rate (5xx and 429)", {"error rate": "error_rate"}),
        plot("latency (s)", {"p50": "latency_p50", "p95": "latency_p95", "p99": "latency_p99"}),
        plot("time to first token p50 (s)", {"ttft p50": "ttft_p50"}),
        "</div><h2>Outputs and inputs</h2><div class='grid2'>",
        plot("output perplexity (median)", {"perplexity": "perplexity_median"}),
        plot("tokens per request (median)", {"input": "input_length_median", "output": "output_length_median"}),
        "</div><h2>Drift</h2><p class='note'>PSI of each bucket against the first quarter of the period "
        "(above 0.1: moderate shift, above 0.25: large shift).</p><div class='grid2'>",
        plot("PSI against the first quarter", {f: f"psi_{f}" for f in FEATURES}),
    ]
    if checks:
        check_times = np.array([c["time"] for c in checks])
        by_feature = {f: np.array([c["psi"] if c["feature"] == f and c["psi"] is not None else math.nan
                                   for c in checks]) for f in FEATURES}
        sections.append(line_chart("PSI of tunelab monitor drift checks", check_times,
                                   {f: v for f, v in by_feature.items() if np.isfinite(v).any()}))
        sections.append("</div>")
        sections.append(_table(["time", "reference", "feature", "n ref", "n recent", "KS", "KS p", "PSI", "drift"],
                               [[_when(c["time"]), c["reference"], c["feature"], c["n_reference"], c["n_recent"],
                                 c["ks_statistic"], c["ks_pvalue"], c["psi"], "yes" if c["drift"] else "no"]
                                for c in checks[-50:]]))
    else:
        sections.append("</div><p class='note'>No saved drift checks in this period (tunelab monitor drift saves "
                        "its results here).</p>")
    sections.append("<h2>Alerts</h2>")
    sections.append(_table(["time", "rule", "metric", "value", "baseline", "z", "message"],
                           [[_when(a["time"]), a["rule"], a["metric"], a["value"], a["baseline"], a["z"], a["message"]]
                            for a in alerts]) if alerts else "<p class='note'>No alerts fired in this period.</p>")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>tunelab monitoring</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(sections)}</body></html>")
    write_text_output(out / "summary.json", json.dumps(summary, indent=1), "monitoring summary")
    write_text_output(out / "report.html", page, "monitoring report")
    return out / "report.html"
