"""``tunelab monitor drift|report|alerts`` as one call each: options checked, outputs claimed, the store read.

Outputs (``--json`` files, the report folder) are claimed before the store is read: an existing
one is kept without ``overwrite`` and an input is never replaced.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError


def _claim(outputs: list, overwrite: bool, flag: str, inputs: list[str]) -> None:
    from tunelab.outputs import claim_files

    claim_files(outputs, overwrite, flag, inputs)


def _write_json(path: str, rows: object, what: str) -> None:
    """Write ``rows`` as JSON to ``path``, beside and renamed into place."""
    from tunelab.outputs import write_text_output

    write_text_output(path, json.dumps(rows, indent=2), what)


@dataclass
class DriftCheck:
    """What ``tunelab monitor drift`` compares, and how (its options' defaults)."""

    db: str
    reference: str  # a data file, request log or store, a run, or window:DURATION
    since: str = "1h"
    model: str | None = None
    tokenizer: str | None = None
    alpha: float = 0.01
    psi_threshold: float = 0.1
    min_samples: int = 30
    features: str | None = None  # comma-separated subset of FEATURES (None: all)
    embedding_model: str | None = None
    json: str | None = None  # also write the results as JSON here
    save: bool = True  # save the results into the store
    overwrite: bool = False


def run_drift_check(check: DriftCheck) -> tuple[Any, str]:
    """Compare the store's recent requests with the reference; write ``--json`` and save into the store.

    Returns:
        The ``DriftReport`` (``report.drift``: whether anything drifted) and the reference's label.
    """
    from tunelab.monitor.drift import FEATURES, DriftReport, compare_samples, embedding_drift, load_reference, \
        sample_from_requests
    from tunelab.monitor.durations import parse_duration
    from tunelab.monitor.store import MonitorError, read_requests, write_drift_checks

    window_s = parse_duration(check.since, "--since")
    features = tuple(f.strip() for f in check.features.split(",")) if check.features else FEATURES
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise TunelabError(f"--features {check.features}: unknown {unknown}; choose from {', '.join(FEATURES)}")
    _claim([check.json] if check.json else [], check.overwrite, "--json", [check.db, check.reference])
    now = time.time()
    recent_requests = read_requests(check.db, since=now - window_s, until=now, model=check.model,
                                    with_text=bool(check.embedding_model))
    if not len(recent_requests):
        raise MonitorError(f"--db {check.db}: no requests{' for ' + check.model if check.model else ''} in the last "
                           f"{check.since}; nothing to compare (widen --since)")
    recent = sample_from_requests(recent_requests, f"the last {check.since}")
    reference = load_reference(check.reference, check.db, now - window_s, window_s, check.tokenizer, check.model)
    report = DriftReport(check.reference, recent.label,
                         compare_samples(reference, recent, check.alpha, check.psi_threshold, check.min_samples,
                                         features),
                         settings={"alpha": check.alpha, "psi_threshold": check.psi_threshold, "since": check.since,
                                   "min_samples": check.min_samples, "model": check.model})
    if not any(f.ks_pvalue is not None for f in report.features):
        notes = "; ".join(f"{f.feature}: {f.note}" for f in report.features)
        raise MonitorError(f"no feature could be compared ({notes})")
    if check.embedding_model:
        if not reference.texts or not recent.texts:
            missing = "the reference" if not reference.texts else "recent requests (serve with --record-text)"
            print(f"note: no embedding comparison: no prompt text in {missing}", file=sys.stderr)
        else:
            report.embedding = embedding_drift(reference.texts, recent.texts, check.embedding_model, check.alpha)
    if check.json:
        _write_json(check.json, report.to_json(), "drift results")
    if check.save:
        write_drift_checks(check.db, [
            {"time": now, "reference": check.reference, "window_s": window_s, "feature": f.feature,
             "n_reference": f.n_reference, "n_recent": f.n_recent, "ks_statistic": f.ks_statistic,
             "ks_pvalue": f.ks_pvalue, "psi": f.psi, "drift": int(f.drift)}
            for f in report.features if f.ks_pvalue is not None])
    return report, reference.label


def write_monitor_report(db: str, out: str, since: str | None = None, bucket: str | None = None,
                         model: str | None = None, overwrite: bool = False) -> Path:
    """``tunelab monitor report``: the HTML report and summary.json of the store in ``out``; returns report.html."""
    from tunelab.monitor.durations import parse_duration
    from tunelab.monitor.report import REPORT_FILES, build_report

    since_time = time.time() - parse_duration(since, "--since") if since else None
    bucket_s = parse_duration(bucket, "--bucket") if bucket else None
    _claim([Path(out) / name for name in REPORT_FILES], overwrite, "--out", [db])
    return build_report(db, out, since=since_time, bucket_s=bucket_s, model=model)


def run_alert_check(db: str, rules_path: str, model: str | None = None, webhook: bool = True,
                    json_out: str | None = None, overwrite: bool = False) -> tuple[Any, list[Any]]:
    """``tunelab monitor alerts``: check the rules once, call the webhook for each alert, write ``json_out``.

    Returns:
        The rules read and the alerts that fired.
    """
    from tunelab.monitor.alerts import alert_rows, check_store, load_rules, send_webhook

    rules = load_rules(rules_path)
    _claim([json_out] if json_out else [], overwrite, "--json", [db, rules_path])
    alerts = check_store(db, rules, model=model)
    if rules.webhook and webhook:
        for alert in alerts:
            send_webhook(rules.webhook, alert, rules.webhook_timeout)
    if json_out:
        _write_json(json_out, alert_rows(alerts), "alerts")
    return rules, alerts
