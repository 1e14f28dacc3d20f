"""tunelab monitor report: an HTML page with plots over time and the numbers behind them."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tunelab.cli import main
from tunelab.monitor.report import build_report, choose_bucket, line_chart
from tunelab.monitor.store import MonitorError, RequestStore, write_drift_checks
from tunelab.serve.request_log import RequestRecord

START = 3600 * 494_000.0  # a whole hour in May 2026, in the past


@pytest.fixture()
def two_hours(tmp_path):
    """Two hours of traffic: 10 requests/min, then 20/min with 3x latency in the second hour."""
    rng = np.random.default_rng(0)
    db = tmp_path / "m.db"
    store = RequestStore(db, flush_seconds=0.05)
    for minute in range(120):
        per_minute = 10 if minute < 60 else 20
        for k in range(per_minute):
            store.record(RequestRecord(
                time=START + minute * 60 + k * 60 / per_minute, model="tiny", endpoint="chat",
                status=500 if (minute == 90 and k < 10) else 200, prompt_tokens=int(rng.integers(20, 40)),
                completion_tokens=int(rng.integers(5, 15)), latency_s=(0.1 if minute < 60 else 0.3) * (1 + 0.1 * k / 20),
                time_to_first_token_s=0.02, mean_logprob=-2.0, finish_reason="stop"))
    store.record_alert(START + 91 * 60, "errors", "error_rate", 0.5, 0.0, 50.0, "alert errors: error_rate = 0.5")
    store.close()
    write_drift_checks(db, [{"time": START + 100 * 60, "reference": "window:1h", "window_s": 3600.0,
                             "feature": "latency", "n_reference": 600, "n_recent": 1200, "ks_statistic": 1.0,
                             "ks_pvalue": 1e-30, "psi": 9.5, "drift": 1}])
    return db


def test_report_plots_traffic_latency_perplexity_and_drift(two_hours, tmp_path):
    page = build_report(two_hours, tmp_path / "report", since=START, until=START + 7200).read_text()
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["requests"] == 1800 and summary["failed"] == 10 and summary["bucket_s"] == 60
    series = summary["series"]
    assert len(series["requests_per_min"]) == 120
    assert series["requests_per_min"][0] == 10 and series["requests_per_min"][100] == 20
    assert series["latency_p50"][10] == pytest.approx(0.105, abs=0.01)
    assert series["latency_p50"][100] == pytest.approx(0.315, abs=0.02)
    assert series["error_rate"][90] == 0.5 and series["error_rate"][89] == 0.0
    assert series["perplexity_median"][0] == pytest.approx(np.exp(2.0))
    assert all(v is None for v in series["psi_latency"])  # 10-20 requests a minute: too few for a PSI
    coarse_page = build_report(two_hours, tmp_path / "coarse", since=START, until=START + 7200, bucket_s=600)
    coarse = json.loads((coarse_page.parent / "summary.json").read_text())["series"]["psi_latency"]
    assert max(coarse[:6]) < 0.1 and min(coarse[6:]) > 1.0  # the latency shift of the second hour, bucket by bucket
    assert 'aria-label="PSI against the first quarter' in coarse_page.read_text()
    for title in ("requests per minute", "latency (s)", "output perplexity", "PSI of tunelab monitor drift checks",
                  "error rate"):
        assert f'aria-label="{title}' in page, title
    assert page.count("<svg") == 7 and "no data" in page  # the per-minute PSI has too few values
    assert "alert errors: error_rate = 0.5" in page and "window:1h" in page
    assert len(re.findall(r"<polyline", page)) == 9  # one line per series with more than one point


def test_report_cli_and_its_errors(two_hours, tmp_path, capsys):
    assert main(["monitor", "report", "--db", str(two_hours), "--out", str(tmp_path / "r"), "--bucket", "15m"]) == 0
    assert (tmp_path / "r" / "report.html").is_file()
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["bucket_s"] == 900
    assert main(["monitor", "report", "--db", str(two_hours), "--out", str(tmp_path / "r2"), "--since", "1h"]) == 2
    assert "no requests" in capsys.readouterr().err  # the fixture's traffic is in the past
    with pytest.raises(MonitorError, match="no monitoring database"):
        build_report(tmp_path / "missing.db", tmp_path / "x")


def test_buckets_and_empty_charts():
    assert choose_bucket(3600) == 60 and choose_bucket(86400) == 900 and choose_bucket(30 * 86400) == 21600
    assert "no data" in line_chart("t", np.array([1.0]), {"a": np.array([np.nan])})
    svg = line_chart("t", np.array([0.0, 60.0, 120.0]), {"a": np.array([1.0, np.nan, 2.0])})
    assert svg.count("<circle") == 2 and "<polyline" not in svg  # a gap splits the line
