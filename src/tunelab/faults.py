"""Crash points: where a test may kill tunelab on purpose, to prove that a crash loses nothing.

Off unless the environment variable ``TUNELAB_CRASH_AT`` is set (one dictionary lookup per point
otherwise). Values:

- ``N``: at the N-th crash point this process reaches, send itself SIGKILL (like ``kill -9``).
- ``N:F`` (F between 0 and 1): the same, but first leave the write in progress cut at fraction F
  (the file being written truncated to F of its size, or F of a metrics row appended), as a kill in
  the middle of that write would leave it.
- ``count``: only count.

With ``TUNELAB_CRASH_LOG=FILE`` every point reached is appended to FILE as ``N NAME`` (and a write
cut short as ``N cut at F: NAME``); the kill-fuzz test reads it to pick where to strike and to say
where it struck.

The points sit between and inside the writes that matter: every optimizer step, every file of a
checkpoint, the manifest, the rename, the pruning of old checkpoints, each metrics row, the rewrite
of ``metrics.jsonl`` on resume, ``final/`` and ``run.json``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

ENV = "TUNELAB_CRASH_AT"
LOG_ENV = "TUNELAB_CRASH_LOG"

_hits = 0


def reset() -> None:
    """Start counting crash points from zero (a forked test process calls this)."""
    global _hits
    _hits = 0


def enabled() -> bool:
    """Whether crash points are armed in this process (lets callers skip work done only for them)."""
    return bool(os.environ.get(ENV))


def truncate_to(path: Path) -> Callable[[float], None]:
    """A partial action: cut ``path`` to a fraction of its size."""
    def cut(fraction: float) -> None:
        if path.is_file():
            os.truncate(path, int(path.stat().st_size * fraction))
    return cut


def crash_point(name: str, partial: Callable[[float], None] | None = None) -> None:
    """Die here if ``TUNELAB_CRASH_AT`` says so (see the module docstring); otherwise return at once.

    Args:
        name: what is happening here, for the log (e.g. ``checkpoint step-4 optimizer.pt``).
        partial: leaves the write in progress half done, given the fraction to keep.
    """
    spec = os.environ.get(ENV)
    if not spec:
        return
    global _hits
    _hits += 1
    log = os.environ.get(LOG_ENV)
    if log:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"{_hits} {name}\n")
    target, _, fraction = spec.partition(":")
    if target == "count" or int(target) != _hits:
        return
    if fraction and partial is not None:
        partial(float(fraction))
        if log:
            with open(log, "a", encoding="utf-8") as handle:
                handle.write(f"{_hits} cut at {fraction}: {name}\n")
    os.kill(os.getpid(), signal.SIGKILL)
