"""One run at a time per ``output_dir``: a lock file that names its owner.

``output_dir/.tunelab.lock`` is held with ``flock`` for the whole run and holds the owner's pid,
host, command and start time. A second run on the same directory is refused with those details.
``flock`` is released by the kernel when a process dies, even by ``kill -9``; the file left behind
then names a dead process, and the next run takes the lock over and says so. A lock written on
another host cannot be checked from here: it is refused, with how to remove it if that run is over.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

LOCK_FILE = ".tunelab.lock"


class RunLockedError(TunelabError):
    """Another run holds the lock on this output directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def _describe(owner: dict[str, Any]) -> str:
    started = owner.get("started")
    since = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, int | float) else ""
    command = f" ({owner['command']})" if owner.get("command") else ""
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}{since}{command}"


class RunLock:
    """The lock of one output directory; use as a context manager or call :meth:`acquire`/:meth:`release`.

    Args:
        output_dir: the run's directory (created if needed).
        notify: called with a line to show the user (a stale lock taken over).
    """

    def __init__(self, output_dir: str | Path, notify=None) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.notify = notify or (lambda text: print(text, file=sys.stderr))
        self._fd: int | None = None

    def _read_owner(self) -> dict[str, Any]:
        try:
            owner = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunLockedError` naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                owner = self._read_owner()
                raise RunLockedError(
                    f"output_dir {self.path.parent} is in use by another run: {_describe(owner)}. Wait for it to "
                    f"finish, or use another output_dir."
                ) from None
            # The file may have been removed (by its owner finishing) between open and flock: try again.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = self._read_owner()
        if previous.get("host") not in (None, host):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise RunLockedError(
                f"output_dir {self.path.parent} is locked by {_describe(previous)}; a run on another host cannot "
                f"be checked from here. If that run is over, delete {self.path} and start again."
            )
        if previous.get("pid") not in (None, os.getpid()):
            state = "no longer running" if not _pid_alive(int(previous["pid"])) else "it no longer holds the lock"
            self.notify(f"took over the lock of {_describe(previous)}: {state}")
        owner = {"pid": os.getpid(), "host": host, "started": int(time.time()),
                 "command": ("tunelab " + " ".join(sys.argv[1:]))[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and release the lock (nothing when not held)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
