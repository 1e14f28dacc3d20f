"""``tunelab runs list|show|diff|lineage``: the run registry from the command line.

Only argparse is imported at module level; the commands import what they need when they run.
"""

from __future__ import annotations

import argparse
import json


def _registry(args: argparse.Namespace):
    from tunelab.track.registry import Registry

    return Registry(args.registry)


def _cmd_list(args: argparse.Namespace) -> int:
    from tunelab.tables import print_table

    runs = _registry(args).list(args.kind, args.limit)
    fmt = "json" if args.json else args.format
    if not runs and fmt == "table":
        print(f"no runs in {_registry(args).path}")
        return 0
    rows = []
    for run in runs:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in (run.get("metrics") or {}).items()
                            if isinstance(v, int | float) and k != "step")
        rows.append([run["run_id"], run["kind"], run["status"], run["started_at"][:16].replace("T", " "),
                     run.get("parent") or "", run.get("path") or "", metrics])
    print_table(("id", "kind", "status", "started", "parent", "path", "metrics"), rows, fmt,
                title=f"runs in {_registry(args).path}", records=runs)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    import yaml

    registry = _registry(args)
    run = registry.get(args.id)
    if args.json:
        print(json.dumps(run, indent=2))
        return 0
    print(f"{run['kind']} run {run['run_id']} ({run['status']})")
    for key in ("started_at", "finished_at", "path", "parent", "base_model", "data_fingerprint", "git_commit",
                "mlflow_run_id"):
        if run.get(key):
            print(f"  {key:16s} {run[key]}")
    for role in ("inputs", "outputs"):
        print(f"{role}:")
        for artifact in run.get(role) or []:
            made_by = f" (from {artifact['run_id']})" if artifact.get("run_id") else ""
            print(f"  {artifact['kind']:10s} {artifact['path']}{made_by}")
    children = sorted({c["run_id"] for o in run.get("outputs") or [] for c in registry.consumers_of(o["path"])})
    if children:
        print(f"used by: {', '.join(children)}")
    if run.get("metrics"):
        print("metrics:")
        for key, value in run["metrics"].items():
            print(f"  {key}: {value}")
    versions = run.get("versions") or {}
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    if run.get("config"):
        print("config:")
        print("  " + yaml.safe_dump(run["config"], sort_keys=False).rstrip().replace("\n", "\n  "))
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    from tunelab.tables import print_table
    from tunelab.track.diff import diff_runs

    registry = _registry(args)
    a, b = registry.get(args.a), registry.get(args.b)
    rows = diff_runs(a, b)
    fmt = "json" if args.json else args.format
    if not rows and fmt == "table":
        print(f"{a['run_id']} and {b['run_id']} have the same config, data, versions and metrics")
        return 0
    cell = lambda v: "" if v is None else v if isinstance(v, str) else json.dumps(v, default=str)  # noqa: E731
    print_table(("key", a["run_id"], b["run_id"]), [(k, cell(x), cell(y)) for k, x, y in rows], fmt,
                title=f"{a['run_id']} vs {b['run_id']}", records=[{"key": k, "a": x, "b": y} for k, x, y in rows])
    return 0


def _cmd_lineage(args: argparse.Namespace) -> int:
    from tunelab.track.lineage import lineage_tree, render_tree

    tree = lineage_tree(_registry(args), args.id)
    print(json.dumps(tree.to_dict(), indent=2) if args.json else render_tree(tree))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``tunelab runs list|show|diff|lineage``."""
    from tunelab.tables import add_format_option

    runs = commands.add_parser("runs", help="the run registry: list, show, diff and lineage of runs")
    runs.add_argument("--registry", help="registry file (default $TUNELAB_REGISTRY or ~/.tunelab/runs.db)")
    actions = runs.add_subparsers(dest="runs_command", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="the newest runs")
    listing.add_argument("--kind", choices=["train", "eval", "merge", "export", "serve"])
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true", help="print the runs' records as JSON (= --format json)")
    add_format_option(listing)
    listing.set_defaults(func=_cmd_list)

    show = actions.add_parser("show", help="one run: inputs, outputs, metrics, versions, config")
    show.add_argument("id", help="run id (or a unique prefix)")
    show.add_argument("--json", action="store_true", help="print the run's record as JSON")
    show.set_defaults(func=_cmd_show)

    diff = actions.add_parser("diff", help="what differs between two runs (config, data, versions, metrics)")
    diff.add_argument("a", help="run id")
    diff.add_argument("b", help="run id")
    diff.add_argument("--json", action="store_true", help="= --format json")
    add_format_option(diff)
    diff.set_defaults(func=_cmd_diff)

    lineage = actions.add_parser("lineage", help="dataset → training run → adapter → merged model → export/serve")
    lineage.add_argument("id", help="run id (or a unique prefix)")
    lineage.add_argument("--json", action="store_true", help="print the tree as JSON")
    lineage.set_defaults(func=_cmd_lineage)
