"""The server records every request into the SQLite store; a bad store never fails a request."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from live_server import QUESTION, LiveServer
from tunelab.data.templates import resolve_template
from tunelab.models.load import generation_stop_ids, load_with_adapters
from tunelab.monitor.serving import start_serve_monitoring
from tunelab.monitor.store import RequestStore, read_meta, read_requests
from tunelab.serve.app import ServeSettings, create_app
from tunelab.serve.engine import GenerationEngine
from tunelab.track.registry import Registry


@pytest.fixture(scope="module")
def loaded(tiny_model):
    model, tokenizer = load_with_adapters(str(tiny_model), {}, torch.device("cpu"))
    return model, tokenizer


def serve(loaded, sinks, record_text: bool = False):
    model, tokenizer = loaded
    engine = GenerationEngine(model, tokenizer, max_batch_size=4, max_wait_ms=5, max_queue=16)
    settings = ServeSettings(model_name="tiny", max_tokens_limit=32, default_max_tokens=8, timeout=30,
                             record_text=record_text)
    app = create_app(engine, resolve_template(tokenizer, "auto"), generation_stop_ids(model.generation_config, tokenizer),
                     settings, None, sinks)
    return LiveServer(app), engine


def ask(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": QUESTION, "max_tokens": 8,
                                                          "temperature": 0, **body}, timeout=60)


def test_requests_land_in_sqlite_with_their_numbers(loaded, tmp_path):
    store = RequestStore(tmp_path / "m.db", flush_seconds=0.05)
    live, engine = serve(loaded, [store])
    try:
        replies = [ask(live.url) for _ in range(3)]
        missing = ask(live.url, model="nope")
        with httpx.stream("POST", f"{live.url}/v1/chat/completions", timeout=60,
                          json={"model": "tiny", "messages": QUESTION, "max_tokens": 8, "stream": True}) as streamed:
            assert streamed.status_code == 200 and "[DONE]" in "".join(streamed.iter_lines())
    finally:
        live.close()
        engine.close()
    store.close()
    assert [r.status_code for r in replies] == [200, 200, 200] and missing.status_code == 404
    rows = read_requests(tmp_path / "m.db", with_text=True)
    assert len(rows) == 5 and sorted(rows.status.tolist()) == [200, 200, 200, 200, 404]
    ok = rows.select(rows.succeeded)
    usage = replies[0].json()["usage"]
    assert ok.prompt_tokens[0] == usage["prompt_tokens"] and ok.completion_tokens[0] == usage["completion_tokens"]
    assert (ok.latency_s > 0).all() and np.isfinite(ok.time_to_first_token_s).all()
    assert (ok.time_to_first_token_s <= ok.latency_s).all() and (ok.mean_logprob < 0).all()
    assert set(ok.finish_reason) <= {"stop", "length"}
    assert rows.error[rows.status.tolist().index(404)].startswith("model 'nope' not found")
    assert rows.prompt == [None] * 5 and rows.completion == [None] * 5  # text is off by default


def test_text_is_recorded_only_when_enabled(loaded, tmp_path):
    store = RequestStore(tmp_path / "m.db", flush_seconds=0.05)
    live, engine = serve(loaded, [store], record_text=True)
    try:
        reply = ask(live.url)
    finally:
        live.close()
        engine.close()
    store.close()
    rows = read_requests(tmp_path / "m.db", with_text=True)
    assert "What is 2 + 3?" in rows.prompt[0]
    assert rows.completion[0] == reply.json()["choices"][0]["message"]["content"]


class BrokenSink:
    def record(self, row) -> None:
        raise RuntimeError("disk on fire")


def test_a_corrupt_store_and_a_failing_sink_never_fail_a_request(loaded, tmp_path, caplog):
    path = tmp_path / "m.db"
    path.write_bytes(b"\x13garbage" * 1000)
    with caplog.at_level(logging.WARNING):
        store = RequestStore(path, flush_seconds=0.05)
        live, engine = serve(loaded, [BrokenSink(), store])
        try:
            statuses = [ask(live.url).status_code for _ in range(3)]
        finally:
            live.close()
            engine.close()
        store.close()
    assert statuses == [200, 200, 200]
    assert len(read_requests(path)) == 3 and len(store.stats.recovered) == 1
    assert "corrupt" in caplog.text and "BrokenSink" in caplog.text


def test_serve_monitoring_defaults_and_its_serve_run(tiny_model, tmp_path):
    monitoring = start_serve_monitoring(str(tiny_model), "tiny-test")
    expected = Path(os.environ["TUNELAB_HOME"]) / "monitor" / "tiny-test.db"
    assert monitoring.store.path == expected and monitoring.store.max_age_s == 30 * 86400
    run_id = monitoring.register(str(tiny_model), {}, {"name": "tiny-test"})
    assert Registry().get(run_id)["status"] == "running"
    monitoring.close()
    run = Registry().get(run_id)
    assert run["status"] == "stopped" and run["inputs"][0]["path"] == str(Path(tiny_model).resolve())
    assert run["outputs"] == [{"kind": "monitor-db", "path": str(expected), "fingerprint": None}]
    meta = read_meta(expected)
    assert meta["model_path"] == str(Path(tiny_model).resolve()) and meta["serve_run_id"] == run_id
    assert start_serve_monitoring(str(tiny_model), "x", enabled=False).sinks == []
