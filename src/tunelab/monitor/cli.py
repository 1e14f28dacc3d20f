"""``tunelab monitor drift|report|alerts``: checks and reports over a server's request store.

Only argparse is imported at module level; the commands import what they need when they run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from tunelab.errors import TunelabError


def _claim(args: argparse.Namespace, outputs: list, flag: str, inputs: list[str]) -> None:
    """Refuse outputs that exist (without --overwrite) or are inputs (ever), before the store is read."""
    from tunelab.outputs import claim_files

    claim_files(outputs, args.overwrite, flag, inputs)


def _write_json(path: str, rows: object, what: str) -> None:
    """Write ``rows`` as JSON to ``path``, beside and renamed into place."""
    from tunelab.outputs import write_text_output

    write_text_output(path, json.dumps(rows, indent=2), what)


def _cmd_drift(args: argparse.Namespace) -> int:
    try:
        return _drift(args)
    except TunelabError:
        raise
    except Exception:  # noqa: BLE001 - exit 1 means drift to cron and CI, so a crash must exit 2
        traceback.print_exc()
        print("error: the drift check failed (a bug in tunelab; the traceback is above)", file=sys.stderr)
        return 2


def _drift(args: argparse.Namespace) -> int:
    from tunelab.monitor.drift import FEATURES, DriftReport, compare_samples, embedding_drift, load_reference, \
        sample_from_requests
    from tunelab.monitor.durations import parse_duration
    from tunelab.monitor.store import MonitorError, read_requests, write_drift_checks
    from tunelab.tables import print_table

    window_s = parse_duration(args.since, "--since")
    features = tuple(f.strip() for f in args.features.split(",")) if args.features else FEATURES
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise TunelabError(f"--features {args.features}: unknown {unknown}; choose from {', '.join(FEATURES)}")
    _claim(args, [args.json] if args.json else [], "--json", [args.db, args.reference])
    now = time.time()
    recent_requests = read_requests(args.db, since=now - window_s, until=now, model=args.model,
                                    with_text=bool(args.embedding_model))
    if not len(recent_requests):
        raise MonitorError(f"--db {args.db}: no requests{' for ' + args.model if args.model else ''} in the last "
                           f"{args.since}; nothing to compare (widen --since)")
    recent = sample_from_requests(recent_requests, f"the last {args.since}")
    reference = load_reference(args.reference, args.db, now - window_s, window_s, args.tokenizer, args.model)
    report = DriftReport(args.reference, recent.label,
                         compare_samples(reference, recent, args.alpha, args.psi_threshold, args.min_samples, features),
                         settings={"alpha": args.alpha, "psi_threshold": args.psi_threshold, "since": args.since,
                                   "min_samples": args.min_samples, "model": args.model})
    if not any(f.ks_pvalue is not None for f in report.features):
        notes = "; ".join(f"{f.feature}: {f.note}" for f in report.features)
        raise MonitorError(f"no feature could be compared ({notes})")
    if args.embedding_model:
        if not reference.texts or not recent.texts:
            missing = "the reference" if not reference.texts else "recent requests (serve with --record-text)"
            print(f"note: no embedding comparison: no prompt text in {missing}", file=sys.stderr)
        else:
            report.embedding = embedding_drift(reference.texts, recent.texts, args.embedding_model, args.alpha)

    show = lambda v, f="{:.4g}": "" if v is None else f.format(v)  # noqa: E731
    rows = [[f.feature, f.n_reference, f.n_recent, show(f.reference_median), show(f.recent_median),
             show(f.ks_statistic, "{:.3f}"), show(f.ks_pvalue, "{:.2e}"), show(f.psi, "{:.3f}"),
             "DRIFT" if f.drift else (f.note or "no")] for f in report.features]
    if report.embedding:
        e = report.embedding
        rows.append(["prompt embedding centroid", e.n_reference, e.n_recent, "", "", f"dist {e.distance:.4f}",
                     f"{e.pvalue:.2e}", "", "DRIFT" if e.drift else "no"])
    print_table(("feature", "n ref", "n recent", "median ref", "median recent", "KS D", "KS p", "PSI", "drift"), rows,
                args.format, title=f"drift: {recent.label} vs {reference.label}", records=report.to_json(),
                row_styles=["bold red" if row[-1] == "DRIFT" else None for row in rows],
                right_align=("n ref", "n recent", "median ref", "median recent", "KS D", "KS p", "PSI"))
    drifted = [f.feature for f in report.features if f.drift] + (["embedding"] if report.embedding and
                                                                report.embedding.drift else [])
    print(f"drift in {', '.join(drifted)}" if drifted else "no drift",
          file=sys.stdout if args.format == "table" else sys.stderr)
    if args.json:
        _write_json(args.json, report.to_json(), "drift results")
    if not args.no_save:
        write_drift_checks(args.db, [
            {"time": now, "reference": args.reference, "window_s": window_s, "feature": f.feature,
             "n_reference": f.n_reference, "n_recent": f.n_recent, "ks_statistic": f.ks_statistic,
             "ks_pvalue": f.ks_pvalue, "psi": f.psi, "drift": int(f.drift)}
            for f in report.features if f.ks_pvalue is not None])
    return 1 if report.drift else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from tunelab.monitor.durations import parse_duration
    from tunelab.monitor.report import REPORT_FILES, build_report

    since = time.time() - parse_duration(args.since, "--since") if args.since else None
    bucket = parse_duration(args.bucket, "--bucket") if args.bucket else None
    _claim(args, [Path(args.out) / name for name in REPORT_FILES], "--out", [args.db])
    path = build_report(args.db, args.out, since=since, bucket_s=bucket, model=args.model)
    print(f"wrote {path} and {Path(args.out) / 'summary.json'}")
    return 0


def _cmd_alerts(args: argparse.Namespace) -> int:
    from tunelab.monitor.alerts import alert_rows, check_store, load_rules, send_webhook

    rules = load_rules(args.rules)
    _claim(args, [args.json] if args.json else [], "--json", [args.db, args.rules])
    alerts = check_store(args.db, rules, model=args.model)
    for alert in alerts:
        print(alert.message)
        if rules.webhook and not args.no_webhook:
            send_webhook(rules.webhook, alert, rules.webhook_timeout)
    if not alerts:
        print(f"no alerts ({len(rules.rules)} rules checked)")
    if args.json:
        _write_json(args.json, alert_rows(alerts), "alerts")
    return 1 if alerts else 0


def add_monitor_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``tunelab monitor ...`` on the top-level subcommands."""
    from tunelab.tables import add_format_option

    monitor = commands.add_parser("monitor", help="drift checks, alerts and reports over a server's request store")
    actions = monitor.add_subparsers(dest="monitor_command", metavar="ACTION", required=True)

    drift = actions.add_parser(
        "drift", help="compare recent traffic with a reference (exit 0: no drift, 1: drift, 2: error)",
        description="KS test and PSI of input length, output length, perplexity and latency of recent requests "
                    "against a reference. Exit code 0: no drift, 1: drift, 2: error.")
    drift.add_argument("--db", required=True, help="the monitoring store (tunelab serve --monitor-db)")
    drift.add_argument("--reference", required=True, metavar="FILE|RUN|window:DURATION",
                       help="a data file (eval set, training data), a request log (.jsonl) or store (.db), a run id "
                            "or directory (its data), or window:7d for the 7 days before the recent window")
    drift.add_argument("--since", "--window", dest="since", default="1h", metavar="DURATION",
                       help="the recent window: requests of the last DURATION (default 1h)")
    drift.add_argument("--model", help="only requests for this model/adapter name")
    drift.add_argument("--tokenizer", help="tokenizer for a data-file reference (default: the served model's)")
    drift.add_argument("--alpha", type=float, default=0.01, help="KS significance level (default 0.01)")
    drift.add_argument("--psi-threshold", type=float, default=0.1,
                       help="smallest PSI that counts as a shift (default 0.1; 0: the KS test alone decides)")
    drift.add_argument("--min-samples", type=int, default=30, help="values needed on each side to test a feature")
    drift.add_argument("--features", help="comma-separated subset of input_length,output_length,perplexity,latency")
    drift.add_argument("--embedding-model", metavar="DIR",
                       help="local sentence-embedding model: also test the prompt-embedding centroid distance")
    drift.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    add_format_option(drift)
    drift.add_argument("--no-save", action="store_true", help="do not save the results into the store")
    drift.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    drift.set_defaults(func=_cmd_drift)

    report = actions.add_parser("report", help="an HTML report with plots over time")
    report.add_argument("--db", required=True, help="the monitoring store")
    report.add_argument("--out", required=True, help="output folder (report.html, summary.json)")
    report.add_argument("--since", metavar="DURATION", help="only the last DURATION (default: everything stored)")
    report.add_argument("--bucket", metavar="DURATION", help="one point per DURATION (default: from the period)")
    report.add_argument("--model", help="only requests for this model/adapter name")
    report.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    report.set_defaults(func=_cmd_report)

    alerts = actions.add_parser("alerts", help="check alert rules once (exit 1 when one fires)")
    alerts.add_argument("--db", required=True, help="the monitoring store")
    alerts.add_argument("--rules", required=True, help="YAML alert rules (see docs/monitor.md)")
    alerts.add_argument("--model", help="only requests for this model/adapter name")
    alerts.add_argument("--no-webhook", action="store_true", help="print alerts without calling the webhook")
    alerts.add_argument("--json", metavar="FILE", help="also write the alerts as JSON")
    alerts.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    alerts.set_defaults(func=_cmd_alerts)
