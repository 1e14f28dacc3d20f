"""The SQLite request store: batched background writes, retention, corrupt and locked files."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tunelab.monitor.store import MonitorError, RequestStore, read_meta, read_requests
from tunelab.serve.request_log import RequestRecord


def make_record(k: int, when: float | None = None) -> RequestRecord:
    return RequestRecord(time=when if when is not None else time.time(), model="tiny", endpoint="chat", status=200,
                         prompt_tokens=10 + k % 7, completion_tokens=5 + k % 3, latency_s=0.01 * (1 + k % 5),
                         time_to_first_token_s=0.002, mean_logprob=-1.5, finish_reason="stop", batch_size=2)


def count_rows(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0]


def test_ten_thousand_concurrent_records_are_all_written_in_batches(tmp_path):
    store = RequestStore(tmp_path / "requests.db", flush_every=256, flush_seconds=0.05)
    threads_n, per_thread = 8, 1250
    start = threading.Barrier(threads_n)
    slowest_put = [0.0] * threads_n

    def client(index: int) -> None:
        start.wait()
        for k in range(per_thread):
            began = time.perf_counter()
            store.record(make_record(index * per_thread + k))
            slowest_put[index] = max(slowest_put[index], time.perf_counter() - began)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    assert count_rows(tmp_path / "requests.db") == 10_000
    assert store.stats.written == 10_000 and store.stats.dropped == 0
    assert store.stats.batches <= 10_000 / 10  # batched, not one transaction per request
    assert max(slowest_put) < 0.05  # recording never waits for the disk


def test_fields_round_trip_and_text_only_when_given(tmp_path):
    store = RequestStore(tmp_path / "r.db", flush_seconds=0.05)
    store.record(make_record(1, when=1000.0))
    failed = RequestRecord(time=1001.0, model="alpha", endpoint="completions", status=504, prompt_tokens=3,
                           latency_s=2.5, error="timeout", prompt="hi", completion="there")
    store.record(failed)
    store.set_meta("model_path", "/models/tiny")
    store.close()
    rows = read_requests(tmp_path / "r.db", with_text=True)
    assert list(rows.status) == [200, 504] and rows.model == ["tiny", "alpha"]
    assert rows.prompt_tokens[0] == 11 and rows.completion_tokens[0] == 6
    assert rows.perplexity[0] == pytest.approx(2.718281828 ** 1.5)
    assert rows.time_to_first_token_s[1] != rows.time_to_first_token_s[1]  # NaN for a missing value
    assert rows.error == [None, "timeout"] and rows.prompt == [None, "hi"] and rows.completion[1] == "there"
    assert list(rows.failed) == [False, True]
    assert read_requests(tmp_path / "r.db").prompt == [None, None]  # text is read only when asked for
    assert len(read_requests(tmp_path / "r.db", since=1000.5)) == 1
    assert len(read_requests(tmp_path / "r.db", model="tiny")) == 1
    assert read_meta(tmp_path / "r.db")["model_path"] == "/models/tiny"


def test_retention_by_age_and_by_row_count(tmp_path):
    now = time.time()
    store = RequestStore(tmp_path / "r.db", max_age_s=3600, flush_seconds=0.05)
    for k in range(30):
        store.record(make_record(k, when=now - 7200 + k))  # two hours old
    for k in range(20):
        store.record(make_record(k, when=now - 60 + k))
    assert store.flush(prune=True)
    assert count_rows(tmp_path / "r.db") == 20 and store.stats.pruned == 30
    store.close()

    capped = RequestStore(tmp_path / "r.db", max_rows=5, flush_seconds=0.05)
    for k in range(10):
        capped.record(make_record(k, when=now + k))
    assert capped.flush(prune=True)
    capped.close()
    assert len(rows := read_requests(tmp_path / "r.db")) == 5
    assert list(rows.time) == pytest.approx([now + k for k in range(5, 10)])  # the newest are kept


def test_a_corrupt_file_is_moved_aside_and_a_fresh_store_started(tmp_path, caplog):
    path = tmp_path / "r.db"
    path.write_bytes(b"this is not sqlite at all " * 200)
    with caplog.at_level(logging.WARNING, logger="tunelab.monitor"):
        store = RequestStore(path, flush_seconds=0.05)
    store.record(make_record(0))
    store.close()
    assert count_rows(path) == 1
    moved = [Path(p) for p in store.stats.recovered]
    assert len(moved) == 1 and moved[0].read_bytes().startswith(b"this is not sqlite")
    assert "corrupt" in caplog.text and str(moved[0]) in caplog.text


def test_a_file_replaced_or_deleted_while_serving_is_reopened(tmp_path, caplog):
    path = tmp_path / "r.db"
    store = RequestStore(path, flush_seconds=0.05)
    store.record(make_record(0))
    assert store.flush()
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\xff" * 8192)
    garbage.replace(path)  # a bad copy over the live file (and its WAL)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING, logger="tunelab.monitor"):
        for k in range(5):
            store.record(make_record(k))
        assert store.flush()
        assert len(store.stats.recovered) == 1 and count_rows(path) == 5
        for suffix in ("", "-wal", "-shm"):  # rotation: rm r.db*
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        store.record(make_record(9))
        assert store.flush()
    store.close()
    assert count_rows(path) == 1
    assert "replaced" in caplog.text and "corrupt" in caplog.text


def test_a_locked_file_keeps_records_in_memory_until_it_is_free(tmp_path, caplog):
    path = tmp_path / "r.db"
    RequestStore(path).close()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
    with caplog.at_level(logging.WARNING, logger="tunelab.monitor"):
        store = RequestStore(path, flush_seconds=0.05, busy_timeout_s=0.05)
        began = time.perf_counter()
        for k in range(50):
            store.record(make_record(k))
        assert time.perf_counter() - began < 0.5  # requests never wait for the lock
        assert store.flush()
    assert store.stats.written == 0 and "cannot be written now" in caplog.text
    blocker.execute("ROLLBACK")
    blocker.close()
    assert store.flush()
    store.close()
    assert count_rows(path) == 50 and store.stats.dropped == 0


def test_records_beyond_max_pending_are_dropped_and_counted(tmp_path):
    path = tmp_path / "r.db"
    RequestStore(path).close()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    store = RequestStore(path, flush_seconds=0.05, busy_timeout_s=0.05, max_pending=10)
    for k in range(25):
        store.record(make_record(k))
    assert store.flush()
    blocker.execute("ROLLBACK")
    blocker.close()
    store.close()
    assert store.stats.dropped == 15 and count_rows(path) == 10


def test_paths_that_cannot_be_a_store_are_clear_errors(tmp_path):
    with pytest.raises(MonitorError, match="is a folder"):
        RequestStore(tmp_path)
    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE requests (url TEXT)")
    with pytest.raises(MonitorError, match="not a tunelab monitoring database"):
        RequestStore(foreign)
    with pytest.raises(MonitorError, match="no monitoring database there"):
        read_requests(tmp_path / "missing.db")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"x" * 4096)
    with pytest.raises(MonitorError, match="corrupt"):
        read_requests(garbage)
