"""The run registry: one SQLite file of every run's ``run.json`` and the artifacts it read and wrote.

A run has a kind (train, eval, merge, export, serve), inputs and outputs. An input is linked to
the run that produced it by its path: ``tunelab merge --adapter runs/x/final`` reads the
adapter that training run ``x`` wrote, so the training run is the merge's parent. That link is
found in the registry, or from the ``run.json`` written next to every output when the producer
was registered elsewhere. The default file is ``$TUNELAB_HOME/runs.db`` (``~/.tunelab``);
``TUNELAB_REGISTRY`` or ``track.registry`` choose another.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.track.provenance import tunelab_home

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL, created_at TEXT NOT NULL,
    finished_at TEXT, path TEXT, parent_id TEXT, info TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS artifacts (
    run_id TEXT NOT NULL, role TEXT NOT NULL, kind TEXT NOT NULL, path TEXT NOT NULL, fingerprint TEXT
);
CREATE INDEX IF NOT EXISTS artifacts_path ON artifacts (path, role);
CREATE INDEX IF NOT EXISTS artifacts_run ON artifacts (run_id);
"""


class TrackError(TunelabError):
    """The run registry cannot be used, or a run id is unknown."""


def registry_path(explicit: str | Path | None = None) -> Path:
    """The registry file: ``explicit``, else ``$TUNELAB_REGISTRY``, else ``$TUNELAB_HOME/runs.db``."""
    chosen = explicit or os.environ.get("TUNELAB_REGISTRY") or tunelab_home() / "runs.db"
    return Path(chosen).expanduser()


def normalize_path(path: str | Path) -> str:
    """The absolute form of a local path; a hub id (nothing on disk) stays as given."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else str(path)


def run_json_beside(path: str | Path) -> Path | None:
    """The ``run.json`` that describes an output: in its folder, beside a ``final/`` folder, or ``FILE.run.json``."""
    local = Path(path).expanduser()
    for candidate in (local / "run.json", local.parent / "run.json" if local.name == "final" else None,
                      local.with_name(local.name + ".run.json")):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def read_run_json(path: Path) -> dict[str, Any] | None:
    """A run.json's content, or None when it is unreadable or has no run id (written by an older tunelab)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("run_id") else None


class Registry:
    """The SQLite run registry (created when missing).

    Raises:
        TrackError: the file is corrupt, locked for more than 5 s, or not a tunelab registry.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = registry_path(path)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackError(f"run registry {self.path}: cannot create its folder ({exc.strerror})") from None
        conn = sqlite3.connect(self.path, timeout=5.0)
        try:
            conn.executescript(_SCHEMA)
            with conn:
                yield conn
        except sqlite3.Error as exc:
            text = str(exc).lower()
            if "locked" in text or "busy" in text:
                raise TrackError(f"run registry {self.path}: locked by another process ({exc}); try again") from None
            if "not a database" in text or "malformed" in text:
                raise TrackError(f"run registry {self.path}: corrupt ({exc}); move it aside and tunelab starts a new "
                                 "one (each run's run.json keeps its record)") from None
            raise TrackError(f"run registry {self.path}: {exc}") from None
        finally:
            conn.close()

    def add(self, info: dict[str, Any]) -> None:
        """Register a run (replacing an earlier record of the same id)."""
        with self._connect() as conn:
            conn.execute("DELETE FROM artifacts WHERE run_id = ?", (info["run_id"],))
            conn.execute(
                "INSERT OR REPLACE INTO runs (id, kind, status, created_at, finished_at, path, parent_id, info) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (info["run_id"], info["kind"], info["status"], info["started_at"], info.get("finished_at"),
                 info.get("path"), info.get("parent"), json.dumps(info)))
            conn.executemany(
                "INSERT INTO artifacts (run_id, role, kind, path, fingerprint) VALUES (?, ?, ?, ?, ?)",
                [(info["run_id"], role, a["kind"], a["path"], a.get("fingerprint"))
                 for role in ("input", "output") for a in info.get(f"{role}s", [])])

    def set_status(self, run_id: str, status: str, finished_at: str | None = None) -> None:
        """Update a run's status (a server that stopped, a run that failed)."""
        with self._connect() as conn:
            row = conn.execute("SELECT info FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                return
            info = json.loads(row[0]) | {"status": status, "finished_at": finished_at}
            conn.execute("UPDATE runs SET status = ?, finished_at = ?, info = ? WHERE id = ?",
                         (status, finished_at, json.dumps(info), run_id))

    def get(self, ref: str) -> dict[str, Any]:
        """A run by id or unique id prefix.

        Raises:
            TrackError: no run or several runs match.
        """
        with self._connect() as conn:
            exact = conn.execute("SELECT info FROM runs WHERE id = ?", (ref,)).fetchone()
            rows = [] if exact else conn.execute("SELECT info FROM runs WHERE substr(id, 1, ?) = ? ORDER BY id LIMIT 6",
                                                 (len(ref), ref)).fetchall()
        if exact:
            return json.loads(exact[0])
        if not rows:
            raise TrackError(f"no run {ref!r} in {self.path} (see tunelab runs list)")
        if len(rows) > 1:
            ids = ", ".join(json.loads(r[0])["run_id"] for r in rows[:5])
            raise TrackError(f"run id {ref!r} is ambiguous: {ids}; give more of it")
        return json.loads(rows[0][0])

    def list(self, kind: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The newest runs first (of one kind when given)."""
        sql = "SELECT info FROM runs" + (" WHERE kind = ?" if kind else "") + " ORDER BY created_at DESC, id DESC LIMIT ?"
        with self._connect() as conn:
            rows = conn.execute(sql, (kind, limit) if kind else (limit,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def producer_of(self, path: str) -> dict[str, Any] | None:
        """The newest run that wrote ``path`` (normalised), from this registry or a run.json beside it."""
        with self._connect() as conn:
            row = conn.execute("SELECT r.info FROM artifacts a JOIN runs r ON r.id = a.run_id WHERE a.path = ? AND "
                               "a.role = 'output' ORDER BY r.created_at DESC LIMIT 1", (path,)).fetchone()
        if row is not None:
            return json.loads(row[0])
        beside = run_json_beside(path)
        info = read_run_json(beside) if beside else None
        if info and any(a.get("path") == path for a in info.get("outputs", [])):
            return info
        return None

    def consumers_of(self, path: str) -> list[dict[str, Any]]:
        """Runs that read ``path``, oldest first."""
        with self._connect() as conn:
            rows = conn.execute("SELECT DISTINCT r.info, r.created_at FROM artifacts a JOIN runs r ON r.id = a.run_id "
                                "WHERE a.path = ? AND a.role = 'input' ORDER BY r.created_at", (path,)).fetchall()
        return [json.loads(r[0]) for r in rows]


def load_run_info(ref: str, registry: str | Path | None = None) -> dict[str, Any] | None:
    """A run's info from a run directory (its run.json) or an id in the registry; None when neither."""
    beside = run_json_beside(ref)
    if beside is not None:
        return read_run_json(beside)
    try:
        return Registry(registry).get(ref)
    except TrackError:
        return None
