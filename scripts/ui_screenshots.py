"""Screenshots of every tunelab ui page for docs/ui.md, from a registry made by real tiny runs.

    python scripts/ui_screenshots.py [--out docs/ui] [--work /tmp/tunelab-ui-shots]

Builds a tiny Llama model, trains two LoRA runs on the shipped arithmetic data (a few steps each),
evaluates and compares them, writes two hours of synthetic request records into a monitoring
store, then opens each page in headless Chromium (Debian's chromium, driven by Playwright) at
1366x900 and saves a PNG. Everything runs offline on a CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "examples" / "data" / "arithmetic_train.jsonl"
TEST = REPO / "examples" / "data" / "arithmetic_test.jsonl"


def build_world(work: Path) -> dict:
    """Two tiny runs, their evals and comparison, a monitoring store; registry at work/runs.db."""
    import yaml

    from tunelab.cli import main
    from tunelab.eval.compare import run_compare
    from tunelab.models.tiny import create_tiny_model
    from tunelab.monitor.store import RequestStore, write_drift_checks
    from tunelab.serve.request_log import RequestRecord

    os.environ["TUNELAB_REGISTRY"] = str(work / "runs.db")
    os.environ["TUNELAB_HOME"] = str(work / "home")
    model = create_tiny_model(work / "tiny", hidden=64, layers=2, heads=4, kv_heads=2)
    eval_file = work / "eval.jsonl"
    eval_file.write_text("".join(TEST.read_text().splitlines(keepends=True)[:24]))
    runs = {}
    for name, lr in (("lr-1e-3", 1e-3), ("lr-3e-3", 3e-3)):
        config = {"model": {"path": str(model)}, "method": {"type": "lora", "rank": 4},
                  "data": {"train": str(TRAIN), "eval": str(eval_file), "max_samples": 256, "max_length": 256},
                  "train": {"max_steps": 24, "lr": lr, "batch_tokens": 2048, "log_every": 1, "eval_every": 6,
                            "save_every": 12, "precision": "fp32", "seed": 0},
                  "output_dir": str(work / name)}
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        assert main(["train", str(path)]) == 0
        assert main(["eval", "--model", str(work / name / "final"), "--data", str(eval_file), "--out",
                     str(work / f"eval-{name}"), "--max-samples", "12", "--max-new-tokens", "12"]) == 0
        runs[name] = json.loads((work / name / "run.json").read_text())
    run_compare([f"{n}={work / f'eval-{n}' / 'predictions.jsonl'}" for n in runs], "metric:chrf", work / "compare",
                resamples=1000)
    db = work / "home" / "monitor" / "tiny.db"
    store = RequestStore(db)
    start = 1_760_000_000.0
    for k in range(480):
        store.record(RequestRecord(time=start + 15 * k, model="tiny", endpoint="chat", status=500 if k % 60 == 0 else 200,
                                   prompt_tokens=40 + k % 17 + (k // 240) * 30, completion_tokens=12 + k % 23,
                                   latency_s=0.2 + (k % 10) * 0.03 + (2.0 if k % 70 == 0 else 0.0),
                                   time_to_first_token_s=0.04 + (k % 5) * 0.01, mean_logprob=-1.2 - (k % 7) * 0.1))
    store.record_alert(start + 5400, "slow answers", "latency_p95", 2.1, 0.45, 6.3, "latency_p95 2.1 s is 6.3 MADs above 0.45 s")
    store.close()
    write_drift_checks(db, [{"time": start + 7000, "reference": str(eval_file), "window_s": 3600.0, "feature": f,
                             "n_reference": 200, "n_recent": 240, "ks_statistic": ks, "ks_pvalue": p, "psi": psi,
                             "drift": int(p < 0.01)}
                            for f, ks, p, psi in (("input_length", 0.41, 1e-6, 0.62), ("output_length", 0.05, 0.8, 0.01))])
    return {"model": model, "runs": runs, "db": db, "eval_file": eval_file}


def serve(settings):
    """Start the UI in a thread; returns (url, server)."""
    from tunelab.serve.server import GracefulServer, server_config
    from tunelab.ui.app import create_ui_app

    ready = threading.Event()
    urls: list[str] = []
    server = GracefulServer(server_config(create_ui_app(settings), "127.0.0.1", 0),
                            on_ready=lambda url: (urls.append(url), ready.set()))
    threading.Thread(target=server.run, daemon=True).start()
    ready.wait(60)
    return urls[0], server


def shoot(work: Path, out: Path, world: dict) -> list[Path]:
    """Open each page and save its screenshot; returns the files."""
    from playwright.sync_api import sync_playwright

    from tunelab.ui.state import UISettings

    settings = UISettings(registry=work / "runs.db", state_dir=work / "ui", workdir=work, poll_ms=500)
    url, server = serve(settings)
    a, b = (world["runs"][k] for k in ("lr-1e-3", "lr-3e-3"))
    eval_a = json.loads((work / "eval-lr-1e-3" / "run.json").read_text())["run_id"]
    out.mkdir(parents=True, exist_ok=True)
    files = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium")
        page = browser.new_page(viewport={"width": 1366, "height": 900})

        def shot(name: str, hash_: str, ready: str | None = None, act=None, full: bool = False) -> None:
            page.goto(f"{url}/{hash_}")
            page.wait_for_selector("main[data-ready]", timeout=120_000)
            if ready:
                page.wait_for_selector(ready, timeout=180_000)
            if act:
                act()
            path = out / f"{name}.png"
            page.screenshot(path=str(path), full_page=full)
            files.append(path)
            print(f"wrote {path}")

        shot("runs", "#/runs")

        def hover_loss() -> None:
            page.locator("figure[data-metric='loss'] svg").focus()
            for _ in range(8):
                page.keyboard.press("ArrowLeft")

        shot("run", f"#/run/{a['run_id']}", act=hover_loss, full=True)
        shot("overlay", f"#/overlay?ids={a['run_id']},{b['run_id']}", "#diff", full=True)

        def bad_form() -> None:
            page.click("#tab-form")
            page.fill("#f-model-path", str(world["model"]))
            page.fill("#f-data-train", str(TRAIN))
            page.fill("#f-output_dir", str(work / "new-run"))
            page.fill("#f-train-lr", "-1")
            page.fill("#overrides", "train.lrr=1e-3")
            page.wait_for_selector("[data-testid=config-errors]")
            page.locator(".field[data-key='train.lr']").scroll_into_view_if_needed()

        shot("launch", "#/launch", act=bad_form)
        shot("data", f"#/data?config={work / 'lr-1e-3.yaml'}", ".example", full=True)
        shot("evaluate", f"#/evaluate?eval={eval_a}", "[data-testid=prediction-count]", full=True)
        shot("compare", f"#/evaluate?compare={work / 'compare'}", "#pairs",
             act=lambda: page.locator("#detail").scroll_into_view_if_needed())

        def chat() -> None:
            page.fill("#max-tokens", "24")
            page.fill("#system", "Solve the problem. Show the calculation, then give the final answer as 'answer: N'.")
            page.fill("#prompt", "There are 4 crayons on a table. Hugo takes 2. How many crayons are still on the table?")
            page.click("#send")
            page.wait_for_selector("#judge-a", timeout=180_000)

        shot("playground", f"#/playground?model={work / 'lr-1e-3' / 'final'}&model_b={work / 'lr-3e-3' / 'final'}",
             act=chat)
        shot("monitor", f"#/monitor?db={world['db']}", "[data-testid=p99]", full=True)
        browser.close()
    server.should_exit = True
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "ui"))
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tunelab-ui-shots-"))
    work.mkdir(parents=True, exist_ok=True)
    world = build_world(work)
    shoot(work, Path(args.out), world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
