"""A graceful stop: SIGTERM or SIGINT ends a one-process run after the current step, with a checkpoint.

The first signal sets a flag; the loop sees it after the optimizer step it is in, saves a
checkpoint of that step and raises :class:`TrainingStopped`, so ``tunelab train CONFIG --resume``
continues exactly where the run stopped (``tunelab ui``'s stop button sends SIGTERM). A second
signal stops at once the ordinary way (KeyboardInterrupt, or the default SIGTERM action).
Distributed runs keep the default behaviour: their processes could see the signal at different
steps, and a checkpoint needs all of them.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from tunelab.errors import TunelabError


class TrainingStopped(TunelabError):
    """The run was asked to stop (SIGTERM/SIGINT) and saved a checkpoint first."""

    exit_code = 130


class StopOnSignal:
    """SIGTERM/SIGINT handlers that ask the loop to stop; :meth:`restore` puts the previous ones back."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, enabled: bool = True) -> None:
        self.requested: str | None = None  # the signal's name once one came
        self._previous: dict[int, Any] = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, sig: int, frame: FrameType | None) -> None:
        if self.requested is not None:  # the second signal: stop now
            self.restore()
            signal.raise_signal(sig)
            return
        self.requested = signal.Signals(sig).name

    def restore(self) -> None:
        """Reinstall the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
