"""The run's ``output_dir``: claimed, locked and prepared before anything slow happens.

- A path that is a file, or cannot be created or written, fails at once, naming it.
- One run at a time (:class:`~tunelab.train.run_lock.RunLock`).
- An earlier run there is never replaced silently: ``--resume`` continues it, ``--overwrite``
  deletes tunelab's own files of it (a user's other files in the directory are left alone), and
  without either the run is refused.
- ``--resume`` clears what a killed run left half-written, picks the newest checkpoint that
  verifies and sets newer broken ones aside as ``step-N.corrupt``, saying which and why.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from tunelab.config import TunelabConfig, dump_config
from tunelab.errors import TunelabError
from tunelab.outputs import atomic_output, write_errors
from tunelab.train.checkpoint import (
    find_resumable,
    list_checkpoints,
    prune_checkpoints,
    remove_unfinished,
    set_aside,
)
from tunelab.train.reporting import console
from tunelab.train.run_lock import RunLock

# What a run writes into output_dir; --overwrite deletes these and nothing else.
RUN_FILES = ("checkpoints", "final", "metrics.jsonl", "run.json", "config.yaml", "tensorboard", "pissa_init")
# The temporaries its writes leave when killed (``.final.tmp-PID``, ``.run.json.tmp`` ...).
LEFTOVER = re.compile(r"^\.(final|metrics\.jsonl|config\.yaml|run\.json)\.(tmp|old)(-\d+)?$")


def check_config_location(config_file: str | Path, output_dir: str | Path) -> None:
    """Refuse a config file that is ``output_dir/config.yaml``: the run writes its resolved config there."""
    if Path(config_file).resolve() == (Path(output_dir) / "config.yaml").resolve():
        raise TunelabError(f"{config_file}: the run writes its resolved config to output_dir/config.yaml, which would "
                           "replace this file; rename it (e.g. run.yaml) or choose another output_dir")


class RunDirectory:
    """Holds ``output_dir`` for one run: the lock, and where to resume from.

    Args:
        config: the run's config (``output_dir`` and the config.yaml written there).
        resume: continue from the newest checkpoint that verifies.
        overwrite: delete an earlier run's files instead of refusing to start.
        main: this process writes the run's files (rank 0); the others only read.
    """

    def __init__(self, config: TunelabConfig, resume: bool, overwrite: bool, main: bool = True) -> None:
        self.config, self.resume, self.overwrite, self.main = config, resume, overwrite, main
        self.path = Path(config.output_dir)
        self.lock = RunLock(self.path, notify=lambda text: console.print(f"[yellow]{text}", highlight=False))
        self._checkpoint: Path | None = None

    def open(self) -> None:
        """Claim, lock and clean ``output_dir`` (main process; the others do nothing)."""
        if not self.main:
            return
        out = self.path
        if out.exists() and not out.is_dir():
            raise TunelabError(f"output_dir {out} is a file, not a directory; choose a directory for the run")
        with write_errors(out, "run directory", kept="nothing was changed"):
            out.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
        try:
            self._prepare()
        except BaseException:
            self.lock.release()
            raise

    def _prepare(self) -> None:
        out = self.path
        for leftover in (p for p in out.iterdir() if LEFTOVER.match(p.name)):  # only a run's own temporaries
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            console.print(f"[dim]removed {leftover.name}, left half-written by an interrupted run[/dim]")
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found and not self.resume:
            if not self.overwrite:
                raise TunelabError(
                    f"output_dir {out} already holds a run ({', '.join(found)}); pass --resume to continue it or "
                    "--overwrite to replace it"
                )
            with write_errors(out, "run directory", kept="the earlier run's files that were not deleted yet"):
                for name in found:
                    path = out / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        if self.resume:
            for leftover in remove_unfinished(out):
                console.print(f"[dim]--resume: removed {leftover.name}, left half-written by the interrupted run[/dim]")
            self._checkpoint, skipped = find_resumable(out)
            for broken, reason in skipped:
                aside = set_aside(broken)
                console.print(f"[yellow]--resume: skipped {broken.name}: {reason}; kept it as {aside.name}",
                              highlight=False)
            # A run killed between writing a checkpoint and deleting the oldest one kept one too many.
            prune_checkpoints(out, self.config.train.keep_checkpoints)

    def write_config(self) -> None:
        """Write the resolved ``config.yaml`` (main process), once the run is about to train.

        Not earlier: a run that fails while reading its data or model leaves ``output_dir`` empty,
        so that running it again needs neither ``--resume`` nor ``--overwrite``.
        """
        if self.main:
            with atomic_output(self.path / "config.yaml", directory=False, what="resolved config") as tmp:
                tmp.write_text(dump_config(self.config))

    def checkpoint(self) -> Path | None:
        """The checkpoint to resume from (None: a fresh start); every process may call it once the main one opened.

        The main process verified it; by then it has set the broken newer ones aside, so the other
        processes take the newest ``step-N`` without hashing the checkpoint again.
        """
        if not self.resume:
            return None
        if self.main:
            return self._checkpoint
        steps = list_checkpoints(self.path)
        return steps[-1][1] if steps else None

    def close(self) -> None:
        """Release the lock."""
        self.lock.release()
