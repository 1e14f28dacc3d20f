"""tunelab ui page loads with 500 runs in the registry (a benchmark, not a test).

    python benchmarks/ui_load.py [--runs 500] [--repeat 5] [--append benchmarks/RESULTS.md]

Fills a fresh registry with ``--runs`` training runs shaped like real ones (the full resolved
config, inputs, outputs, metrics; one run has a 2,000-step metrics.jsonl), starts the UI on it,
and times in headless Chromium (Debian's chromium through Playwright) from navigation until the
page has rendered (the runs table with every row; the run page with its curves). The baseline is
what a user runs instead: ``tunelab runs list --limit N`` in a terminal (a new process each time,
as typed). Prints a table (median of ``--repeat``) and appends it to RESULTS.md when asked.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def fill_registry(work: Path, count: int) -> tuple[Path, str]:
    """A registry of ``count`` train runs; returns its path and the id of the run with a long metrics file."""
    from tunelab.config import config_from_dict
    from tunelab.track.provenance import package_versions
    from tunelab.track.registry import Registry

    registry = Registry(work / "runs.db")
    versions = package_versions()
    start = datetime(2026, 11, 1, tzinfo=UTC)
    long_id = ""
    for k in range(count):
        out = work / "runs" / f"run-{k:04d}"
        config = config_from_dict({"model": {"path": f"/models/base-{k % 5}"}, "data": {"train": f"data/set-{k % 7}.jsonl"},
                                   "method": {"type": ("lora", "full", "qlora")[k % 3], "rank": 8 + k % 4},
                                   "train": {"lr": 1e-4 * (1 + k % 9), "objective": ("sft", "dpo")[k % 2]},
                                   "output_dir": str(out)})
        run_id = f"train-{(start + timedelta(minutes=k)).strftime('%Y%m%d-%H%M%S')}-{k:04x}"
        metrics = {"eval_loss": 2.0 - k / count, "eval_ppl": 7.4 - 3 * k / count}
        started = (start + timedelta(minutes=k)).isoformat(timespec="seconds")
        registry.add({"run_id": run_id, "kind": "train", "status": "finished", "started_at": started,
                      "finished_at": (start + timedelta(minutes=k, seconds=90)).isoformat(timespec="seconds"),
                      "path": str(out), "parent": None,
                      "inputs": [{"kind": "dataset", "path": f"/data/set-{k % 7}.jsonl", "fingerprint": f"{k:040x}",
                                  "run_id": None}, {"kind": "model", "path": f"/models/base-{k % 5}", "fingerprint": None,
                                                     "run_id": None}],
                      "outputs": [{"kind": "adapter", "path": str(out / "final"), "fingerprint": None}],
                      "git_commit": "0" * 40, "versions": versions, "base_model": f"/models/base-{k % 5}",
                      "method": config.method.type, "objective": config.train.objective, "steps": 2000,
                      "wall_seconds": 90.0, "metrics": metrics, "final_metrics": metrics,
                      "config": config.model_dump(mode="json"), "registry": str(registry.path)})
        if k == count - 1:
            out.mkdir(parents=True)
            rows = [{"step": s, "epoch": s / 2000, "loss": 3 / (1 + s / 100), "lr": 1e-4, "grad_norm": 1.0,
                     "tokens": 4096 * s, "tokens_per_s": 5000.0} for s in range(1, 2001)]
            rows += [{"step": s, "eval_loss": 3 / (1 + s / 90), "eval_ppl": 10.0} for s in range(100, 2001, 100)]
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (out / "config.yaml").write_text("output_dir: x\n")
            long_id = run_id
    return registry.path, long_id


def serve(registry: Path, work: Path) -> tuple[str, object]:
    """The UI in a thread on a free port."""
    from tunelab.serve.server import GracefulServer, server_config
    from tunelab.ui.app import create_ui_app
    from tunelab.ui.state import UISettings

    ready = threading.Event()
    urls: list[str] = []
    app = create_ui_app(UISettings(registry=registry, state_dir=work / "ui", workdir=work))
    server = GracefulServer(server_config(app, "127.0.0.1", 0), on_ready=lambda u: (urls.append(u), ready.set()))
    threading.Thread(target=server.run, daemon=True).start()
    ready.wait(60)
    return urls[0], server


def timed_page(page, url: str, ready: str) -> float:
    """Seconds from navigation to ``ready`` (a JS expression) being true."""
    page.goto("about:blank")
    started = time.perf_counter()
    page.goto(url)
    page.wait_for_function(ready, timeout=60_000, polling="raf")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--append", help="append the table to this Markdown file (benchmarks/RESULTS.md)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="tunelab-ui-load-"))
    registry, long_id = fill_registry(work, args.runs)
    url, server = serve(registry, work)
    import httpx

    results: dict[str, list[float]] = {"api": [], "runs page": [], "run page": [], "cli": []}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium")
        page = browser.new_page(viewport={"width": 1366, "height": 800})
        timed_page(page, f"{url}/#/runs", "document.querySelector('main[data-ready]')")  # warm the caches once
        for _ in range(args.repeat):
            started = time.perf_counter()
            assert len(httpx.get(f"{url}/api/runs", timeout=60).json()["runs"]) == args.runs
            results["api"].append(time.perf_counter() - started)
            results["runs page"].append(timed_page(
                page, f"{url}/#/runs", f"document.querySelectorAll('#runs-table tbody tr').length === {args.runs}"))
            results["run page"].append(timed_page(
                page, f"{url}/#/run/{long_id}",
                "(() => { const s = document.querySelector(\"figure[data-metric='loss'] svg\"); "
                "return s && Number(s.dataset.points) === 2020 && document.querySelector('main[data-ready]'); })()"))
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "tunelab", "runs", "--registry", str(registry), "list",
                                   "--limit", str(args.runs)], capture_output=True, text=True, cwd=REPO)
            assert done.returncode == 0, done.stderr
            results["cli"].append(time.perf_counter() - started)
        browser.close()
    server.should_exit = True
    median = {k: statistics.median(v) for k, v in results.items()}
    lines = [
        f"### tunelab ui page loads, {args.runs} runs in the registry ({datetime.now(UTC):%Y-%m-%d}, "
        f"{platform.machine()}, {platform.python_version()})",
        "",
        f"`python benchmarks/ui_load.py --runs {args.runs} --repeat {args.repeat}`: median of {args.repeat}, headless "
        "Chromium on the same machine, navigation until rendered. The machine is shared with other jobs: absolute "
        "times are noisy, the ratio to the CLI baseline in the same run less so.",
        "",
        "| what | median s | vs `tunelab runs list` |",
        "|---|---:|---:|",
        f"| `tunelab runs list --limit {args.runs}` (new process, the baseline) | {median['cli']:.3f} | 1.00 |",
        f"| GET /api/runs ({args.runs} rows as JSON) | {median['api']:.3f} | {median['api'] / median['cli']:.2f} |",
        f"| runs page: table with all {args.runs} rows rendered | {median['runs page']:.3f} | "
        f"{median['runs page'] / median['cli']:.2f} |",
        f"| run page: 2,000-step run, 5 charts drawn | {median['run page']:.3f} | {median['run page'] / median['cli']:.2f} |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.append:
        with open(args.append, "a", encoding="utf-8") as handle:
            handle.write("\n" + text)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
