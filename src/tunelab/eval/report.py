"""Reports for ``tunelab eval`` and ``tunelab compare``: report.md and a self-contained report.html.

Plots are small inline SVGs (no plotting dependency): metric bars with confidence intervals,
a histogram of answer lengths, win-rate bars with their bootstrap CIs.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunelab.eval.metrics import metric_scale

BAR_WIDTH = 420


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table with escaped cells."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def svg_bars(items: Sequence[tuple[str, float, float | None, float | None]], scale: float | None = None,
             reference_line: float | None = None) -> str:
    """Horizontal bars ``(label, value, ci_low, ci_high)``; the CI is drawn as a whisker.

    The axis runs from 0 to ``scale`` (default: the largest value) and is labelled at both ends.
    """
    finite = [v for _, v, lo, hi in items for v in (v, lo, hi) if v is not None and math.isfinite(v)]
    top = scale or max(finite + [1e-9])
    row, label_width = 26, 170
    bars_height = row * len(items) + 10
    height = bars_height + 16
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_width + BAR_WIDTH + 70}" height="{height}">']
    for k, (label, value, low, high) in enumerate(items):
        y = 5 + k * row
        width = max(0.0, (value or 0.0) / top * BAR_WIDTH)
        parts.append(f'<text x="0" y="{y + 15}" font-size="12">{html.escape(label[:26])}</text>')
        parts.append(f'<rect x="{label_width}" y="{y + 3}" width="{width:.1f}" height="16" fill="#4a7bd0"/>')
        if low is not None and high is not None:
            x1, x2 = label_width + low / top * BAR_WIDTH, label_width + high / top * BAR_WIDTH
            parts.append(f'<line x1="{x1:.1f}" x2="{x2:.1f}" y1="{y + 11}" y2="{y + 11}" stroke="black"/>')
            for x in (x1, x2):
                parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y + 6}" y2="{y + 16}" stroke="black"/>')
        parts.append(f'<text x="{label_width + BAR_WIDTH + 5}" y="{y + 15}" font-size="12">{_fmt(value)}</text>')
    if reference_line is not None:
        x = label_width + reference_line / top * BAR_WIDTH
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{bars_height}" stroke="#c33" stroke-dasharray="4"/>')
    parts.append(f'<line x1="{label_width}" x2="{label_width + BAR_WIDTH}" y1="{bars_height}" y2="{bars_height}" '
                 'stroke="#888"/>')
    for x, tick in ((label_width, 0), (label_width + BAR_WIDTH, top)):
        parts.append(f'<text x="{x}" y="{bars_height + 13}" font-size="11" text-anchor="middle" '
                     f'class="axis">{_fmt(tick)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_histogram(values: Sequence[float], bins: int = 20) -> str:
    """A histogram of ``values`` (e.g. answer lengths in words)."""
    if not values:
        return "<p>no values</p>"
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, int((value - low) / span * bins))] += 1
    width, height, bar = 440, 120, 440 / bins
    top = max(counts)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 20}">']
    for k, count in enumerate(counts):
        h = count / top * height
        parts.append(f'<rect x="{k * bar:.1f}" y="{height - h:.1f}" width="{bar - 1:.1f}" height="{h:.1f}" fill="#6a9"/>')
    parts.append(f'<text x="0" y="{height + 15}" font-size="11">{_fmt(low)}</text>')
    parts.append(f'<text x="{width - 40}" y="{height + 15}" font-size="11">{_fmt(high)}</text></svg>')
    return "".join(parts)


def _page(title: str, body: str) -> str:
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>" \
           f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"


def _accounting_rows(accounting: dict[str, Any]) -> list[list[Any]]:
    rows = [[key, value] for key, value in accounting.items() if not isinstance(value, dict)]
    for reason, count in accounting.get("skipped_records", {}).items():
        rows.append([f"skipped: {reason}", f"{count} (first at {accounting['skipped_first_at'].get(reason)})"])
    return rows


def _bar_groups(scored: list[tuple[str, float, float | None, float | None]]) -> list[tuple[str, list, float | None]]:
    """Metrics split by scale, each group on its own axis: fractions on 0-1, scores on 0-100, others alone."""
    groups: list[tuple[str, list, float | None]] = []
    for label, scale in (("Fractions (0–1)", 1.0), ("Scores (0–100)", 100.0)):
        group = [item for item in scored if metric_scale(item[0]) == scale]
        if group:
            groups.append((label, group, scale))
    groups += [(item[0], [item], None) for item in scored if metric_scale(item[0]) is None]
    return groups


def write_eval_report(out_dir: str | Path, results: dict[str, Any], predictions: Sequence[dict[str, Any]]) -> None:
    """Write report.md and report.html for ``tunelab eval`` results."""
    out = Path(out_dir)
    title = f"tunelab eval: {results.get('model', '')}" + (f" + {results['adapter']}" if results.get("adapter") else "")
    md, body = [f"# {title}", "", f"created {results['created_at']}", ""], []
    for entry in results["sets"]:
        cis = entry.get("ci", {})
        rows = [[name, value, *(cis.get(name) or (None, None))] for name, value in entry["metrics"].items()]
        md += [f"## {entry['name']} ({entry['file']})", "", markdown_table(["metric", "value", "ci_low", "ci_high"], rows),
               "", markdown_table(["accounting", "count"], _accounting_rows(entry["accounting"])), ""]
        scored = [(n, v, *(cis.get(n) or (None, None))) for n, v in entry["metrics"].items()
                  if isinstance(v, float) and n in cis]
        lengths = [len(p["prediction"].split()) for p in predictions if p.get("set") == entry["name"]]
        body.append(f"<h2>{html.escape(entry['name'])}</h2><p>{html.escape(entry['file'])}</p>")
        body.append(html_table(["metric", "value", "ci_low", "ci_high"], rows))
        for label, group, scale in _bar_groups(scored):
            body.append(f"<h3>{label}, with 95% bootstrap CIs</h3>" + svg_bars(group, scale=scale))
        body.append("<h3>Answer length (words)</h3>" + svg_histogram(lengths))
        body.append("<h3>Accounting</h3>" + html_table(["", "count"], _accounting_rows(entry["accounting"])))
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(_page(title, "".join(body)))


def write_compare_report(out_dir: str | Path, results: dict[str, Any]) -> None:
    """Write report.md and report.html for ``tunelab compare`` results."""
    out = Path(out_dir)
    title = f"tunelab compare ({results['judge']})"
    header = ["model A", "model B", "wins", "ties", "losses", "no verdict", "win rate", "ci_low", "ci_high", "p_value"]
    rows = [[p["model_a"], p["model_b"], p["wins"], p["ties"], p["losses"], p["no_verdict"], p["win_rate"],
             p["ci_low"], p["ci_high"], p["p_value"]] for p in results["pairs"]]
    md = [f"# {title}", "", f"created {results['created_at']}; models: {', '.join(results['models'])}; "
          f"{results['examples']} shared examples", "", markdown_table(header, rows), ""]
    bars = [(f"{p['model_a']} vs {p['model_b']}", p["win_rate"], p["ci_low"], p["ci_high"]) for p in results["pairs"]]
    body = [f"<p>{results['examples']} shared examples; judge {html.escape(results['judge'])}</p>",
            html_table(header, rows), "<h3>Win rate of A (ties count half), 95% bootstrap CI</h3>",
            svg_bars(bars, scale=1.0, reference_line=0.5)]
    if results.get("ratings"):
        rating_rows = [[r["model"], r["rating"], r["ci_low"], r["ci_high"]] for r in results["ratings"]]
        md += ["## Bradley–Terry ratings", "", markdown_table(["model", "rating", "ci_low", "ci_high"], rating_rows), ""]
        body.append("<h3>Bradley–Terry ratings</h3>" + html_table(["model", "rating", "ci_low", "ci_high"], rating_rows))
    accounting = [[k, v] for k, v in results.get("accounting", {}).items()]
    md += ["## Accounting", "", markdown_table(["", "count"], accounting), ""]
    body.append("<h3>Accounting</h3>" + html_table(["", "count"], accounting))
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(_page(title, "".join(body)))
