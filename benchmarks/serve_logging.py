"""Serving latency with the SQLite request store on vs off (the store must cost nothing a client sees).

``tunelab serve`` in its own process, with ``--monitor-db`` (and ``--record-text``, the heaviest
setting) or with ``--no-monitor``, in alternating rounds (on, off, on, off, ...) so that a change
in the machine's load hits both alike. Each round sends the same chat requests from concurrent
``openai`` clients. Reports p50/p95 latency per round, the on/off difference of the median p50,
the spread of p50 between rounds of the same setting (the noise), and checks that every request
of the "on" rounds is in the store. Appends a section to benchmarks/RESULTS.md.

    python benchmarks/serve_logging.py [--rounds 3] [--requests 120] [--clients 8] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from serve_throughput import percentile, start_server  # noqa: E402


def run_round(model_dir: Path, db: Path | None, requests: int, clients: int, max_tokens: int) -> dict:
    """One round of load; the server is stopped (SIGINT, as Ctrl-C) so that the store flushes."""
    import openai

    monitor = ["--monitor-db", str(db), "--record-text"] if db else ["--no-monitor"]
    process, url = start_server(model_dir, "--max-batch-size", "8", *monitor)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one(k: int) -> None:
        start = time.perf_counter()
        try:
            client.chat.completions.create(model="bench", max_tokens=max_tokens, temperature=0,
                                           messages=[{"role": "user", "content": f"Request {k}: tell me a story."}])
            with lock:
                latencies.append(time.perf_counter() - start)
        except Exception as exc:  # counted and reported
            with lock:
                errors.append(repr(exc))

    try:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(8)))  # warm-up, not measured
        latencies.clear()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(requests)))
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    stored = None
    if db is not None:
        with sqlite3.connect(db) as conn:
            stored = conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
    return {"monitor": db is not None, "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
            "errors": len(errors), "sent": requests + 8, "stored": stored}


def main() -> None:
    """Build a model, run the alternating rounds, print and record the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per setting")
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    from tunelab.models.tiny import create_tiny_model

    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        model_dir = create_tiny_model(Path(work) / "model", hidden=128, layers=2, heads=4, vocab=1000)
        for index in range(args.rounds):
            for monitor in (True, False):
                db = Path(work) / f"round{index}.db" if monitor else None
                rows.append(run_round(model_dir, db, args.requests, args.clients, args.max_tokens) | {"round": index})
                print(rows[-1], flush=True)
    on = [r["p50_s"] for r in rows if r["monitor"]]
    off = [r["p50_s"] for r in rows if not r["monitor"]]
    difference = statistics.median(on) - statistics.median(off)
    noise = max(max(on) - min(on), max(off) - min(off))
    lost = sum(r["sent"] - r["stored"] for r in rows if r["monitor"])
    lines = ["| round | store | p50 latency ms | p95 latency ms | errors | requests sent | rows stored |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['round'] + 1} | {'on (+ text)' if row['monitor'] else 'off'} | {row['p50_s'] * 1000:.1f} | "
                     f"{row['p95_s'] * 1000:.1f} | {row['errors']} | {row['sent']} | "
                     f"{row['stored'] if row['stored'] is not None else '—'} |")
    verdict = "within noise" if abs(difference) <= noise else "NOT within noise"
    summary = (f"median p50 with the store {statistics.median(on) * 1000:.1f} ms, without "
               f"{statistics.median(off) * 1000:.1f} ms: difference {difference * 1000:+.1f} ms; spread of p50 "
               f"between rounds of one setting {noise * 1000:.1f} ms ({verdict}); requests missing from the store: "
               f"{lost}")
    table = "\n".join(lines)
    print(table)
    print(summary)
    if not args.no_write:
        cpu = subprocess.run(["sh", "-c", "lscpu | sed -n 's/^Model name: *//p'"], capture_output=True,
                             text=True).stdout.strip() or platform.processor()
        section = (
            f"\n## serve_logging — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
            f"- machine: {cpu}, {os.cpu_count()} cores; load average {load_before:.2f} before, "
            f"{os.getloadavg()[0]:.2f} after; command: `"
            f"{'OMP_NUM_THREADS=' + os.environ['OMP_NUM_THREADS'] + ' ' if 'OMP_NUM_THREADS' in os.environ else ''}"
            f"python benchmarks/serve_logging.py"
            f"{' --rounds ' + str(args.rounds) if args.rounds != 3 else ''}`\n"
            f"- model: random Llama (hidden 128, 2 layers, vocab 1000); per round {args.requests} chat requests "
            f"(after 8 warm-up) from {args.clients} concurrent `openai` clients, up to {args.max_tokens} tokens, "
            "greedy; `tunelab serve` in its own process with `--monitor-db DB --record-text` (on) or `--no-monitor` "
            "(off), rounds alternating\n\n" + table + f"\n\n{summary}.\n"
        )
        with (REPO / "benchmarks" / "RESULTS.md").open("a") as handle:
            handle.write(section)
        print("appended to benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
