"""The monitoring store: one SQLite row per served request, written in batches off the request path.

The server hands every :class:`~tunelab.serve.request_log.RequestRecord` to
:meth:`RequestStore.record`, which only puts it on an in-memory queue. A background thread writes
the queue in batches (one transaction per batch), applies retention (by age and by row count) and
copes with a bad database file without ever failing a request:

* a corrupt file (not SQLite, or a malformed image) is moved aside to ``PATH.corrupt-TIMESTAMP``
  and a fresh store is started, with a warning;
* a locked file (another process holds a write lock) keeps the rows in memory, up to
  ``max_pending``, and retries at the next flush; rows beyond that are dropped and counted.

Readers (``tunelab monitor drift|report|alerts``) open the file with :func:`connect_for_reading`,
which turns every problem into a :class:`MonitorError` that names the file and the fix.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import TunelabError
from tunelab.serve.request_log import RequestRecord

logger = logging.getLogger("tunelab.monitor")

SCHEMA_VERSION = 1
REQUEST_COLUMNS = (
    "time", "model", "endpoint", "status", "prompt_tokens", "completion_tokens", "latency_s",
    "time_to_first_token_s", "mean_logprob", "finish_reason", "batch_size", "error", "prompt", "completion",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    status INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_s REAL NOT NULL,
    time_to_first_token_s REAL,
    mean_logprob REAL,
    finish_reason TEXT,
    batch_size INTEGER,
    error TEXT,
    prompt TEXT,
    completion TEXT
);
CREATE INDEX IF NOT EXISTS requests_time ON requests (time);
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, rule TEXT NOT NULL, metric TEXT NOT NULL,
    value REAL, baseline REAL, z REAL, message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS drift_checks (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, reference TEXT NOT NULL, window_s REAL NOT NULL,
    feature TEXT NOT NULL, n_reference INTEGER, n_recent INTEGER, ks_statistic REAL, ks_pvalue REAL,
    psi REAL, drift INTEGER NOT NULL
);
"""
_INSERT_REQUEST = f"INSERT INTO requests ({', '.join(REQUEST_COLUMNS)}) VALUES ({', '.join('?' * len(REQUEST_COLUMNS))})"


class MonitorError(TunelabError):
    """A monitoring database, reference or rule file cannot be used."""


def _is_locked(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _is_corrupt(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    # "file is not a database" and "malformed" are plain DatabaseErrors; OperationalError covers
    # locks, permissions and missing tables, which are not corruption.
    return "not a database" in text or "malformed" in text or (
        isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError))


def _open_writable(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """Open (creating if needed) a store and check its schema; sqlite3 errors propagate."""
    conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        conn.execute("PRAGMA synchronous=NORMAL")
        if _has_table(conn, "requests"):
            _check_schema(conn, path)
        conn.executescript(_SCHEMA)
        conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    except BaseException:
        conn.close()
        raise
    return conn


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def _check_schema(conn: sqlite3.Connection, path: Path) -> None:
    columns = {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
    if not columns:
        raise MonitorError(f"{path}: not a tunelab monitoring database (no requests table); "
                           "point --db/--monitor-db at the file tunelab serve writes")
    missing = [c for c in REQUEST_COLUMNS if c not in columns]
    if missing:
        raise MonitorError(f"{path}: a 'requests' table without the columns {missing}: this is not a tunelab "
                           "monitoring database; choose another path with --monitor-db")
    version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() \
        if _has_table(conn, "meta") else None
    if version is not None and int(version[0]) > SCHEMA_VERSION:
        raise MonitorError(f"{path}: written by a newer tunelab (store schema {version[0]}, this one reads "
                           f"{SCHEMA_VERSION}); upgrade tunelab")


def move_aside(path: Path) -> Path:
    """Rename a bad database file (and its WAL/SHM companions) to ``PATH.corrupt-TIMESTAMP``."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        source = path.with_name(path.name + suffix)
        if source.exists():
            source.rename(target.with_name(target.name + suffix))
    return target


@dataclass
class StoreStats:
    """What the store has done since it started."""

    written: int = 0  # rows committed to SQLite
    batches: int = 0  # transactions that wrote rows
    dropped: int = 0  # rows lost because the file stayed unwritable and max_pending was reached
    pruned: int = 0  # rows removed by retention
    restarts: int = 0  # times the writer thread died on an unexpected error and was started again
    recovered: list[str] = field(default_factory=list)  # corrupt files moved aside


@dataclass
class _Statement:
    sql: str
    params: tuple[Any, ...]


@dataclass
class _Barrier:
    done: threading.Event = field(default_factory=threading.Event)
    prune: bool = False


_STOP = object()


class RequestStore:
    """SQLite store of :class:`RequestRecord` rows, written by a background thread.

    Args:
        path: the database file (created with its folder when missing).
        max_age_s: delete requests older than this many seconds (None: keep).
        max_rows: keep at most this many requests, the newest (None: no limit).
        flush_every: write as soon as this many rows wait.
        flush_seconds: otherwise write rows at most this long after they arrive.
        max_pending: rows kept in memory while the file cannot be written; older ones are dropped.
        busy_timeout_s: how long one write waits for another process's lock.
        retention_every_s: how often retention runs.

    Raises:
        MonitorError: the path cannot be a database (a folder, no permission, another program's
            SQLite file). A corrupt or locked file is not an error (see the module doc).
    """

    def __init__(self, path: str | Path, *, max_age_s: float | None = None, max_rows: int | None = None,
                 flush_every: int = 256, flush_seconds: float = 0.5, max_pending: int = 100_000,
                 busy_timeout_s: float = 1.0, retention_every_s: float = 60.0) -> None:
        self.path = Path(path).expanduser()
        self.max_age_s, self.max_rows = max_age_s, max_rows
        self.flush_every, self.flush_seconds, self.max_pending = flush_every, flush_seconds, max_pending
        self.busy_timeout_s, self.retention_every_s = busy_timeout_s, retention_every_s
        self.stats = StoreStats()
        self._warned_unwritable = False
        if self.path.is_dir():
            raise MonitorError(f"--monitor-db {self.path}: is a folder; give a file path such as {self.path}/requests.db")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MonitorError(f"--monitor-db {self.path}: cannot create its folder ({exc.strerror})") from None
        self._conn = self._open(at_start=True)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pending: list[Any] = []  # taken from the queue, not written yet (kept across a writer restart)
        self._barriers: list[_Barrier] = []
        self._closing = False
        self._thread_lock = threading.Lock()
        self._start_writer()

    # -- the request path ------------------------------------------------------------------

    def record(self, row: RequestRecord) -> None:
        """Queue a request's record; never blocks and never raises."""
        self._queue.put(row)
        if not self._thread.is_alive() and not self._closing:
            self._restart("the writer thread was found dead")

    def _start_writer(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name="tunelab-monitor-store", daemon=True)
        self._thread.start()

    def _restart(self, why: str) -> None:
        with self._thread_lock:
            if self._thread.is_alive() or self._closing:
                return
            self.stats.restarts += 1
            logger.error("monitoring store %s: %s; restarted it (restart %d)", self.path, why, self.stats.restarts)
            self._start_writer()

    def _supervise(self) -> None:
        """Run the writer; an unexpected error is logged and counted, and the writer starts again."""
        while True:
            try:
                self._run()
                return
            except Exception:
                self.stats.restarts += 1
                logger.exception("monitoring store %s: the writer failed; restarting it (restart %d)", self.path,
                                 self.stats.restarts)
                time.sleep(0.05)

    def record_alert(self, when: float, rule: str, metric: str, value: float | None, baseline: float | None,
                     z: float | None, message: str) -> None:
        """Queue a fired alert for the report."""
        self._queue.put(_Statement("INSERT INTO alerts (time, rule, metric, value, baseline, z, message) "
                                   "VALUES (?, ?, ?, ?, ?, ?, ?)", (when, rule, metric, value, baseline, z, message)))

    def set_meta(self, key: str, value: str) -> None:
        """Queue a ``meta`` entry (for example the served model's path, used by drift checks)."""
        self._queue.put(_Statement("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value)))

    def flush(self, timeout: float = 30.0, prune: bool = False) -> bool:
        """Write everything queued so far (and apply retention when ``prune``); True when done in time."""
        barrier = _Barrier(prune=prune)
        self._queue.put(barrier)
        return barrier.done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (retrying a locked file until ``timeout``) and stop the writer."""
        self._close_deadline = time.monotonic() + timeout
        if not self._thread.is_alive():
            self._restart("the writer thread was found dead at close")
        self._closing = True
        self._queue.put(_STOP)
        self._thread.join(timeout + 5)

    # -- the writer thread -----------------------------------------------------------------

    def _open(self, at_start: bool = False) -> sqlite3.Connection | None:
        """A writable connection, a fresh store in place of a corrupt file, or None while locked."""
        try:
            return self._opened(_open_writable(self.path, self.busy_timeout_s))
        except sqlite3.Error as exc:
            if _is_corrupt(exc):
                return self._recover(exc)
            if _is_locked(exc):
                self._warn_unwritable(exc)
                return None
            if at_start:
                raise MonitorError(f"--monitor-db {self.path}: cannot open it ({exc})") from None
            self._warn_unwritable(exc)
            return None

    def _opened(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        self._inode = self.path.stat().st_ino
        return conn

    def _recover(self, exc: sqlite3.Error) -> sqlite3.Connection | None:
        if getattr(self, "_conn", None) is not None:
            self._conn.close()
            self._conn = None
        moved = move_aside(self.path)
        self.stats.recovered.append(str(moved))
        logger.warning("monitoring store %s is corrupt (%s); moved it to %s and started a fresh store",
                       self.path, exc, moved)
        try:
            return self._opened(_open_writable(self.path, self.busy_timeout_s))
        except sqlite3.Error as again:
            self._warn_unwritable(again)
            return None

    def _warn_unwritable(self, exc: sqlite3.Error) -> None:
        if not self._warned_unwritable:
            self._warned_unwritable = True
            logger.warning("monitoring store %s cannot be written now (%s); keeping up to %d records in memory "
                           "and retrying", self.path, exc, self.max_pending)

    def _run(self) -> None:
        pending = self._pending
        first_at = time.monotonic()
        last_retention = -float("inf")
        stopping = False
        while True:
            wait = self.flush_seconds if not pending else max(0.0, first_at + self.flush_seconds - time.monotonic())
            barriers = self._barriers  # kept across a writer restart, like the rows
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
            while item is not None:
                if item is _STOP:
                    stopping = True
                elif isinstance(item, _Barrier):
                    barriers.append(item)
                else:
                    if not pending:
                        first_at = time.monotonic()
                    pending.append(item)
                if len(pending) >= 16 * self.flush_every:
                    break  # bound one transaction's size
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            due = stopping or barriers or len(pending) >= self.flush_every or (
                pending and time.monotonic() - first_at >= self.flush_seconds)
            if pending and due:
                pending[:] = self._write(pending)
                if pending:
                    first_at = time.monotonic()
            now = time.monotonic()
            if any(b.prune for b in barriers) or now - last_retention >= self.retention_every_s:
                if self._prune():
                    last_retention = now
            for barrier in barriers:
                barrier.done.set()
            barriers.clear()
            if stopping:
                if pending and time.monotonic() < self._close_deadline:
                    time.sleep(min(0.2, self.busy_timeout_s))  # a locked file: retry until the deadline
                    continue
                if pending:
                    self._drop(len(pending), "the store was closed while its file was still unwritable")
                if self._conn is not None:
                    self._conn.close()
                return

    def _file_changed(self) -> bool:
        """True when the file was deleted or replaced since it was opened (rotation, a copied file)."""
        try:
            return self.path.stat().st_ino != self._inode
        except OSError:
            return True

    def _write(self, pending: list[Any]) -> list[Any]:
        """Write ``pending`` in one transaction; return what could not be written."""
        if self._conn is not None and self._file_changed():
            # SQLite would go on writing into the old, unlinked file: open what is there now.
            logger.warning("monitoring store %s was deleted or replaced; reopening it", self.path)
            self._conn.close()
            self._conn = None
        for attempt in range(2):
            if self._conn is None:
                self._conn = self._open()
            if self._conn is None:
                return self._keep(pending)
            records = [r for r in pending if isinstance(r, RequestRecord)]
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.executemany(_INSERT_REQUEST, [_row_values(r) for r in records])
                for statement in (s for s in pending if isinstance(s, _Statement)):
                    self._conn.execute(statement.sql, tuple(_sqlite_value(v) for v in statement.params))
                self._conn.execute("COMMIT")
            except (ValueError, TypeError, OverflowError) as exc:  # a value SQLite cannot take: write row by row
                self._rollback()
                return self._write_one_by_one(pending, exc)
            except sqlite3.Error as exc:
                self._rollback()
                if _is_corrupt(exc) and attempt == 0:
                    self._conn = self._recover(exc)
                    continue
                self._warn_unwritable(exc)
                if not _is_locked(exc):  # e.g. the file was deleted or its disk is full: reopen next time
                    self._conn.close()
                    self._conn = None
                return self._keep(pending)
            self.stats.written += len(records)
            self.stats.batches += 1
            if self._warned_unwritable:
                logger.warning("monitoring store %s is writable again", self.path)
                self._warned_unwritable = False
            return []
        return self._keep(pending)

    def _write_one_by_one(self, pending: list[Any], first_error: Exception) -> list[Any]:
        """Write each row in its own statement, dropping (and counting) those that cannot be written at all."""
        logger.warning("monitoring store %s: a batch failed (%s: %s); writing its rows one by one", self.path,
                       type(first_error).__name__, first_error)
        written = 0
        for item in pending:
            try:
                if isinstance(item, RequestRecord):
                    self._conn.execute(_INSERT_REQUEST, _row_values(item))
                    written += 1
                elif isinstance(item, _Statement):
                    self._conn.execute(item.sql, tuple(_sqlite_value(v) for v in item.params))
            except sqlite3.Error:
                raise
            except Exception as exc:  # noqa: BLE001 - this one row is unusable; the others are kept
                self._drop(1, f"a record could not be written ({type(exc).__name__}: {exc})")
        self.stats.written += written
        self.stats.batches += 1
        return []

    def _rollback(self) -> None:
        try:
            if self._conn is not None and self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _keep(self, pending: list[Any]) -> list[Any]:
        excess = len(pending) - self.max_pending
        if excess > 0:
            self._drop(excess, f"more than {self.max_pending} records waited for the file")
            return pending[excess:]
        return pending

    def _drop(self, count: int, why: str) -> None:
        self.stats.dropped += count
        logger.warning("monitoring store %s: dropped %d records (%s)", self.path, count, why)

    def _prune(self) -> bool:
        """Apply retention; True when it ran."""
        if self.max_age_s is None and self.max_rows is None:
            return True
        if self._conn is None:
            self._conn = self._open()
        if self._conn is None:
            return False
        try:
            before = self._conn.total_changes
            if self.max_age_s is not None:
                cutoff = time.time() - self.max_age_s
                for table in ("requests", "alerts", "drift_checks"):
                    self._conn.execute(f"DELETE FROM {table} WHERE time < ?", (cutoff,))
            if self.max_rows is not None:
                self._conn.execute("DELETE FROM requests WHERE id <= (SELECT id FROM requests ORDER BY id DESC "
                                   "LIMIT 1 OFFSET ?)", (self.max_rows,))
            self.stats.pruned += self._conn.total_changes - before
        except sqlite3.Error as exc:
            if _is_corrupt(exc):
                self._conn = self._recover(exc)
            else:
                self._warn_unwritable(exc)
            return False
        return True


def _sqlite_value(value: Any) -> Any:
    """A value SQLite can store: text with lone surrogates (from a client's JSON) made valid UTF-8, ints clamped."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        return max(-(2**63), min(value, 2**63 - 1))  # SQLite integers are 64-bit
    return value


def _row_values(record: RequestRecord) -> tuple[Any, ...]:
    return tuple(_sqlite_value(getattr(record, c)) for c in REQUEST_COLUMNS)


# ---------------------------------------------------------------------------------------------
# Reading


@contextmanager
def connect_for_reading(path: str | Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to a monitoring store.

    Raises:
        MonitorError: no file, not a tunelab store, corrupt, or locked for too long.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MonitorError(f"--db {path}: no monitoring database there; tunelab serve writes one "
                           "(see --monitor-db, default ~/.tunelab/monitor/NAME.db)")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        _check_schema(conn, path)
        yield conn
    except sqlite3.Error as exc:
        if _is_corrupt(exc):
            raise MonitorError(f"--db {path}: the file is corrupt or not SQLite ({exc}); move it aside — "
                               "tunelab serve starts a fresh store when it finds a corrupt one") from None
        if _is_locked(exc):
            raise MonitorError(f"--db {path}: locked by another process for more than 5 s ({exc}); "
                               "try again when it is free") from None
        raise MonitorError(f"--db {path}: cannot read it ({exc})") from None
    finally:
        conn.close()


@dataclass
class Requests:
    """Request rows as numpy columns (missing values are NaN); text columns are lists."""

    time: np.ndarray
    model: list[str]
    endpoint: list[str]
    status: np.ndarray
    prompt_tokens: np.ndarray
    completion_tokens: np.ndarray
    latency_s: np.ndarray
    time_to_first_token_s: np.ndarray
    mean_logprob: np.ndarray
    finish_reason: list[str | None]
    error: list[str | None]
    prompt: list[str | None]
    completion: list[str | None]

    def __len__(self) -> int:
        return len(self.time)

    @property
    def perplexity(self) -> np.ndarray:
        """Per-request output perplexity, exp(-mean log-prob) (NaN where nothing was generated)."""
        return np.exp(-self.mean_logprob)

    @property
    def succeeded(self) -> np.ndarray:
        """Mask of requests answered with status 200."""
        return self.status == 200

    @property
    def failed(self) -> np.ndarray:
        """Mask of server-side failures: 5xx answers and 429 (queue full)."""
        return (self.status >= 500) | (self.status == 429)

    def select(self, mask: np.ndarray) -> Requests:
        """The rows where ``mask`` is true."""
        index = np.flatnonzero(mask)
        values = {}
        for name, column in vars(self).items():
            values[name] = column[index] if isinstance(column, np.ndarray) else [column[i] for i in index]
        return Requests(**values)

    def rows(self, start: int, stop: int) -> Requests:
        """Rows ``start:stop`` (a cheap slice)."""
        return Requests(**{name: column[start:stop] for name, column in vars(self).items()})

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[Any]]) -> Requests:
        """Columns from rows in :data:`REQUEST_COLUMNS` order, minus ``batch_size``."""
        names = [c for c in REQUEST_COLUMNS if c != "batch_size"]
        columns = list(zip(*rows)) if rows else [()] * len(names)
        values: dict[str, Any] = {}
        for name, column in zip(names, columns):
            if name in ("model", "endpoint", "finish_reason", "error", "prompt", "completion"):
                values[name] = list(column)
            elif name in ("status", "prompt_tokens", "completion_tokens"):
                values[name] = np.asarray(column, dtype=np.int64)
            else:
                values[name] = np.asarray([np.nan if v is None else v for v in column], dtype=np.float64)
        return cls(**values)


def read_requests(path: str | Path, since: float | None = None, until: float | None = None,
                  model: str | None = None, with_text: bool = False) -> Requests:
    """Requests of a store between unix times ``since`` and ``until``, oldest first.

    Args:
        path: the store.
        since: first arrival time (inclusive); None: from the oldest.
        until: last arrival time (exclusive); None: to the newest.
        model: only requests for this model/adapter name.
        with_text: also read prompt and completion text (when the server recorded it).

    Raises:
        MonitorError: the file cannot be read (see :func:`connect_for_reading`).
    """
    names = [c for c in REQUEST_COLUMNS if c != "batch_size"]
    selected = [c if with_text or c not in ("prompt", "completion") else f"NULL AS {c}" for c in names]
    where, params = ["1 = 1"], []
    if since is not None:
        where.append("time >= ?")
        params.append(since)
    if until is not None:
        where.append("time < ?")
        params.append(until)
    if model is not None:
        where.append("model = ?")
        params.append(model)
    sql = f"SELECT {', '.join(selected)} FROM requests WHERE {' AND '.join(where)} ORDER BY time"
    with connect_for_reading(path) as conn:
        return Requests.from_rows(conn.execute(sql, params).fetchall())


def read_meta(path: str | Path) -> dict[str, str]:
    """The store's ``meta`` entries (model path and name, serve run id, schema version)."""
    with connect_for_reading(path) as conn:
        return dict(conn.execute("SELECT key, value FROM meta").fetchall())


def read_table(path: str | Path, table: str, since: float | None = None) -> list[dict[str, Any]]:
    """Rows of the ``alerts`` or ``drift_checks`` table as dicts, oldest first."""
    if table not in ("alerts", "drift_checks"):
        raise ValueError(table)
    with connect_for_reading(path) as conn:
        cursor = conn.execute(f"SELECT * FROM {table} WHERE time >= ? ORDER BY time", (since or 0.0,))
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]


def write_drift_checks(path: str | Path, rows: list[dict[str, Any]]) -> bool:
    """Append drift-check results to the store (for the report); False, with a warning, when it cannot."""
    try:
        conn = sqlite3.connect(Path(path).expanduser(), timeout=2.0)
        try:
            with conn:
                conn.executemany(
                    "INSERT INTO drift_checks (time, reference, window_s, feature, n_reference, n_recent, "
                    "ks_statistic, ks_pvalue, psi, drift) VALUES (:time, :reference, :window_s, :feature, "
                    ":n_reference, :n_recent, :ks_statistic, :ks_pvalue, :psi, :drift)", rows)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        logger.warning("could not save the drift check into %s (%s)", path, exc)
        return False
    return True
