"""Signs of life for long commands: a rich progress bar on a terminal, start and end lines in a log.

Every phase that can take more than a few seconds (loading a model, answering prompts, judging,
merging, exporting, verifying) runs inside :func:`progress_bar`. On a terminal it draws a bar
(or a spinner when the amount of work is unknown) on stderr and removes it when the phase ends;
when stderr is a file or a pipe (cron, CI) it prints one line when the phase starts and one
with its duration when it ends, so that a log shows where the time went.

Never open one while another live display draws (the training progress bar): evaluation during
training calls generation without one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(description: str, total: int | None = None, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """A progress display for one phase; yields ``advance(n=1)``.

    Args:
        description: what is being done ("answering 200 prompts").
        total: the units of work (None: a spinner with the elapsed time).
        enabled: False yields a no-op (for callers that may run inside another live display).
    """
    if not enabled:
        yield lambda n=1: None
        return
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        started = time.monotonic()
        print(f"{description} ...", file=sys.stderr, flush=True)
        yield lambda n=1: None
        print(f"{description}: done in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if total is not None:
        columns += [BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    else:
        columns += [TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
