"""``tunelab monitor drift|report|alerts``: checks and reports over a server's request store.

Only argparse is imported at module level; the commands import what they need when they run.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from tunelab.errors import TunelabError


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
    from tunelab.monitor.checks import DriftCheck, run_drift_check
    from tunelab.tables import print_table

    report, reference_label = run_drift_check(DriftCheck(
        db=args.db, reference=args.reference, since=args.since, model=args.model, tokenizer=args.tokenizer,
        alpha=args.alpha, psi_threshold=args.psi_threshold, min_samples=args.min_samples, features=args.features,
        embedding_model=args.embedding_model, json=args.json, save=not args.no_save, overwrite=args.overwrite,
    ))
    show = lambda v, f="{:.4g}": "" if v is None else f.format(v)  # noqa: E731
    rows = [[f.feature, f.n_reference, f.n_recent, show(f.reference_median), show(f.recent_median),
             show(f.ks_statistic, "{:.3f}"), show(f.ks_pvalue, "{:.2e}"), show(f.psi, "{:.3f}"),
             "DRIFT" if f.drift else (f.note or "no")] for f in report.features]
    if report.embedding:
        e = report.embedding
        rows.append(["prompt embedding centroid", e.n_reference, e.n_recent, "", "", f"dist {e.distance:.4f}",
                     f"{e.pvalue:.2e}", "", "DRIFT" if e.drift else "no"])
    print_table(("feature", "n ref", "n recent", "median ref", "median recent", "KS D", "KS p", "PSI", "drift"), rows,
                args.format, title=f"drift: {report.recent} vs {reference_label}", records=report.to_json(),
                row_styles=["bold red" if row[-1] == "DRIFT" else None for row in rows],
                right_align=("n ref", "n recent", "median ref", "median recent", "KS D", "KS p", "PSI"))
    drifted = [f.feature for f in report.features if f.drift] + (["embedding"] if report.embedding and
                                                                report.embedding.drift else [])
    print(f"drift in {', '.join(drifted)}" if drifted else "no drift",
          file=sys.stdout if args.format == "table" else sys.stderr)
    return 1 if report.drift else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from tunelab.monitor.checks import write_monitor_report

    path = write_monitor_report(args.db, args.out, since=args.since, bucket=args.bucket, model=args.model,
                                overwrite=args.overwrite)
    print(f"wrote {path} and {Path(args.out) / 'summary.json'}")
    return 0


def _cmd_alerts(args: argparse.Namespace) -> int:
    from tunelab.monitor.checks import run_alert_check

    rules, alerts = run_alert_check(args.db, args.rules, model=args.model, webhook=not args.no_webhook,
                                    json_out=args.json, overwrite=args.overwrite)
    for alert in alerts:
        print(alert.message)
    if not alerts:
        print(f"no alerts ({len(rules.rules)} rules checked)")
    return 1 if alerts else 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``tunelab monitor drift|report|alerts``."""
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
