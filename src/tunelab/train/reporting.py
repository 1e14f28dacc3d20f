"""What a run tells the user while it goes: progress bar, metrics.jsonl, optional TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tunelab.faults import crash_point, truncate_to
from tunelab.outputs import atomic_output, write_errors

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` file.

    A last line cut short (the run was killed while writing it) is left out; the rows before it are
    whole, since each row is appended at once.
    """
    rows, _ = read_metrics_report(path)
    return rows


def read_metrics_report(path: str | Path) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows of a ``metrics.jsonl`` file and the numbers (1-based) of the lines that are not whole JSON rows."""
    file = Path(path)
    if not file.is_file():
        return [], []
    rows, bad = [], []
    for number, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad.append(number)
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(number)
    return rows, bad


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


class Reporter:
    """Writes metric rows to ``metrics.jsonl`` (and TensorBoard) and drives the progress bar.

    On resume, rows after the resumed step (written by the interrupted run after its last
    checkpoint) are dropped, so the file reads as one uninterrupted run. In a distributed run only
    the main process (rank 0) reports; the others get a reporter that writes and shows nothing.
    """

    def __init__(self, output_dir: Path, total_steps: int, start_step: int, tensorboard: bool,
                 main_process: bool = True) -> None:
        self.path = output_dir / "metrics.jsonl"
        self.enabled = main_process
        if self.enabled:
            rows, bad = read_metrics_report(self.path)
            if bad:
                console.print(f"[yellow]{self.path}: dropped line(s) {', '.join(map(str, bad))}: not whole JSON rows "
                              "(cut short when the run was killed)", highlight=False)
            kept = [row for row in rows if row.get("step", 0) <= start_step]
            # Rewritten beside and renamed: a kill here leaves the old file, never a shorter one.
            with atomic_output(self.path, directory=False, what="metrics log") as tmp:
                tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
                crash_point("metrics.jsonl rewrite", truncate_to(tmp))
        self.writer = None
        if tensorboard and self.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                console.print("[yellow]train.tensorboard: install tensorboard (pip install 'tunelab[track]'); skipping")
            else:
                self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        self.interactive = console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not (self.interactive and self.enabled),
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")
        self.progress.start()

    def log(self, row: dict[str, Any]) -> None:
        """Append one metrics row and show it."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        line = json.dumps(clean) + "\n"
        with write_errors(self.path, "metrics row", kept="the rows before it and the checkpoints"):
            with self.path.open("a") as handle:
                crash_point(f"metrics row step {row.get('step')}", lambda fraction: (
                    handle.write(line[: int(len(line) * fraction)]), handle.flush()))
                handle.write(line)
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(key, value, row["step"])
        shown = "  ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k not in ("step", "epoch", "tokens", "elapsed_s"))
        if self.interactive:
            self.progress.update(self.task, status=shown)
        else:
            console.print(f"step {row['step']}: {shown}", highlight=False)

    def advance(self, step: int) -> None:
        """Move the bar to optimizer step ``step``."""
        self.progress.update(self.task, completed=step)

    def phase(self, text: str) -> None:
        """Show what the step is doing now (e.g. ``rollout``/``update`` in online RL) beside the bar."""
        if self.interactive:
            self.progress.update(self.task, status=text)

    def message(self, text: str) -> None:
        """Print a line above the progress bar."""
        self.progress.console.print(text, highlight=False)

    def close(self) -> None:
        """Stop the bar and flush TensorBoard."""
        self.progress.stop()
        if self.writer is not None:
            self.writer.close()
