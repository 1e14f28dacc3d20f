"""Serving load test: batched vs one-request-at-a-time generation behind the same HTTP API.

200 chat requests from 16 concurrent clients (the real ``openai`` client) against ``tunelab``'s
server on 127.0.0.1, twice on the same model: with request batching (``--max-batch-size 16``) and
without (``1``). Reports errors, p50/p95 latency, time to first token and generated tokens/s, and
the ratio; appends a section to benchmarks/RESULTS.md.

    python benchmarks/serve_throughput.py [--requests 200] [--clients 16] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model_dir: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """``tunelab serve`` in its own process (as in production) with extra ``options``; returns it and its base URL."""
    import httpx

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "serve", "--model", str(model_dir), "--port", str(port), "--name", "bench",
         "--max-queue", "256", "--timeout", "600", *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start in 120 s")


def run_load(model_dir: Path, batch_size: int, requests: int, clients: int, max_tokens: int) -> dict:
    """Send ``requests`` chat requests from ``clients`` threads to a server batching up to ``batch_size``."""
    import httpx
    import openai

    process, url = start_server(model_dir, "--max-batch-size", str(batch_size), "--max-tokens-limit", str(max_tokens),
                                "--request-log", str(model_dir / f"requests-{batch_size}.jsonl"))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    latencies: list[float] = []
    completion_tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one(k: int) -> None:
        start = time.perf_counter()
        try:
            reply = client.chat.completions.create(
                model="bench", max_tokens=max_tokens, temperature=0,
                messages=[{"role": "user", "content": f"Request {k}: write about the sea and the sky."}])
            with lock:
                latencies.append(time.perf_counter() - start)
                completion_tokens.append(reply.usage.completion_tokens)
        except Exception as exc:  # counted and reported
            with lock:
                errors.append(repr(exc))

    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(requests)))
        wall = time.perf_counter() - started
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        largest = int(float(re.search(r"^tunelab_max_batch_size (\S+)$", metrics, re.M).group(1)))
    finally:
        process.terminate()
        process.wait(timeout=30)
    return {"batch_size": batch_size, "wall_s": wall, "errors": len(errors), "error_examples": errors[:3],
            "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
            "tokens_per_s": sum(completion_tokens) / wall, "generated_tokens": sum(completion_tokens),
            "requests": requests, "largest_batch": largest}


def main() -> None:
    """Build a model, run the load twice, print and record the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    from tunelab.models.tiny import create_tiny_model

    with tempfile.TemporaryDirectory() as work:
        model_dir = create_tiny_model(Path(work) / "model", hidden=args.hidden, layers=args.layers, heads=4,
                                      vocab=2000)
        rows = [run_load(model_dir, size, args.requests, args.clients, args.max_tokens) for size in (16, 1)]
    ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    lines = ["| engine | requests | errors | p50 latency s | p95 latency s | generated tokens | generated tok/s | "
             "largest batch |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        label = "batched (max 16)" if row["batch_size"] > 1 else "one request at a time"
        lines.append(f"| {label} | {row['requests']} | {row['errors']} | {row['p50_s']:.2f} | {row['p95_s']:.2f} | "
                     f"{row['generated_tokens']:,} | {row['tokens_per_s']:,.0f} | {row['largest_batch']} |")
    table = "\n".join(lines)
    print(table)
    print(f"batched / one-at-a-time tokens/s: {ratio:.2f}x (goal >= 3x: {'met' if ratio >= 3 else 'NOT met'})")
    if not args.no_write:
        cpu = subprocess.run(["sh", "-c", "lscpu | sed -n 's/^Model name: *//p'"], capture_output=True,
                             text=True).stdout.strip() or platform.processor()
        section = (
            f"\n## serve_throughput — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
            f"- machine: {cpu}, {os.cpu_count()} cores; command: `python benchmarks/serve_throughput.py`\n"
            f"- model: random Llama (hidden {args.hidden}, {args.layers} layers, vocab 2000); {args.requests} "
            f"chat requests from {args.clients} concurrent `openai` clients, up to {args.max_tokens} tokens each, "
            "greedy; the server is `tunelab serve` in its own process\n\n" + table +
            f"\n\nBatched serving gives {ratio:.2f}x the generated tokens/s of one-request-at-a-time serving.\n"
        )
        with (REPO / "benchmarks" / "RESULTS.md").open("a") as handle:
            handle.write(section)
        print("appended to benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
