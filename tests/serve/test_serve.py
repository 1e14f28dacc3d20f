"""The OpenAI-compatible server, driven by the official openai client on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
import torch
from live_server import KEY, QUESTION, LiveServer, error_of, stream_and_hang_up
from peft import PeftModel
from served_models import greedy, make_adapter
from transformers import AutoModelForCausalLM

from tunelab.data.templates import resolve_template
from tunelab.models.load import generation_stop_ids, load_with_adapters
from tunelab.serve.app import ServeSettings, create_app
from tunelab.serve.engine import GenerationEngine
from tunelab.serve.request_log import RequestLog


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve")
    adapters = {name: str(make_adapter(tiny_model, directory / name, seed)) for name, seed in (("alpha", 1), ("beta", 2))}
    model, tokenizer = load_with_adapters(str(tiny_model), adapters, torch.device("cpu"))
    engine = GenerationEngine(model, tokenizer, max_batch_size=8, max_wait_ms=20, max_queue=64)
    settings = ServeSettings(model_name="tiny", adapters=tuple(adapters), api_key=KEY, max_prompt_tokens=200,
                             max_tokens_limit=64, default_max_tokens=16, timeout=30)
    log = RequestLog(directory / "requests.jsonl", flush_seconds=0.05)
    app = create_app(engine, resolve_template(tokenizer, "auto"), generation_stop_ids(model.generation_config, tokenizer),
                     settings, log)
    live = LiveServer(app)
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0)
    yield {"live": live, "client": client, "engine": engine, "log": log, "adapters": adapters, "tiny": tiny_model,
           "tokenizer": tokenizer, "directory": directory}
    live.close()
    engine.close()
    log.close()


def test_models_chat_and_train_serve_parity(served):
    client = served["client"]
    assert [m.id for m in client.models.list().data] == ["tiny", "alpha", "beta"]
    reply = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=16)
    base = AutoModelForCausalLM.from_pretrained(served["tiny"]).eval()
    assert reply.choices[0].message.content == greedy(base, served["tokenizer"], QUESTION)
    assert reply.usage.completion_tokens <= 16 and reply.usage.prompt_tokens > 0
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_adapters_are_chosen_by_model_name(served):
    client, tokenizer = served["client"], served["tokenizer"]
    for name in ("alpha", "beta"):
        base = AutoModelForCausalLM.from_pretrained(served["tiny"])
        expected = greedy(PeftModel.from_pretrained(base, served["adapters"][name]).eval(), tokenizer, QUESTION)
        reply = client.chat.completions.create(model=name, messages=QUESTION, temperature=0, max_tokens=16)
        assert reply.choices[0].message.content == expected, name
    base_reply = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=16)
    alpha_reply = client.chat.completions.create(model="alpha", messages=QUESTION, temperature=0, max_tokens=16)
    assert base_reply.choices[0].message.content != alpha_reply.choices[0].message.content


def test_streaming_equals_non_streaming(served):
    client = served["client"]
    whole = client.chat.completions.create(model="beta", messages=QUESTION, temperature=0, max_tokens=20)
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model="beta", messages=QUESTION, temperature=0, max_tokens=20,
                                                stream=True):
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason


def test_completions_and_seeded_sampling(served):
    client = served["client"]
    plain = client.completions.create(model="tiny", prompt="The cat", max_tokens=8, temperature=0)
    assert plain.object == "text_completion" and plain.usage.completion_tokens <= 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The cat", max_tokens=8, temperature=0, stream=True))
    assert streamed == plain.choices[0].text
    sampled = [client.chat.completions.create(model="tiny", messages=QUESTION, temperature=1.0, seed=s,
                                              max_tokens=12).choices[0].message.content for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_concurrent_requests_are_batched(served):
    client, engine = served["client"], served["engine"]
    before = engine.stats.max_batch_seen
    results: list[str | Exception] = []

    def ask(k: int) -> None:
        try:
            reply = client.chat.completions.create(model="tiny", max_tokens=24, temperature=0,
                                                   messages=[{"role": "user", "content": f"Count to {k}."}])
            results.append(reply.choices[0].message.content)
        except Exception as exc:  # collected, asserted below
            results.append(exc)

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not [r for r in results if isinstance(r, Exception)]
    assert max(before, engine.stats.max_batch_seen) > 1


def test_errors_are_openai_shaped_and_the_server_keeps_serving(served):
    url, headers = served["live"].url, {"Authorization": f"Bearer {KEY}"}
    post = lambda body, **kw: httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=30, **kw)  # noqa: E731
    assert post(None, content=b"{not json").status_code == 400
    missing = post({"model": "nope", "messages": QUESTION}, json={"model": "nope", "messages": QUESTION})
    assert missing.status_code == 404 and error_of(missing)["code"] == "model_not_found"
    too_many = post(None, json={"model": "tiny", "messages": QUESTION, "max_tokens": 1000})
    assert too_many.status_code == 400 and "max_tokens" in error_of(too_many)["message"]
    empty = post(None, json={"model": "tiny", "messages": []})
    assert empty.status_code == 400 and error_of(empty)["param"] == "messages"
    long_prompt = post(None, json={"model": "tiny", "messages": [{"role": "user", "content": "word " * 500}]})
    assert long_prompt.status_code == 400 and "200 tokens" in error_of(long_prompt)["message"]
    wrong_type = post(None, json={"model": "tiny", "messages": QUESTION, "temperature": "hot"})
    assert wrong_type.status_code == 400
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{url}/health").status_code == 200  # health needs no key
    ok = served["client"].chat.completions.create(model="tiny", messages=QUESTION, max_tokens=4)
    assert ok.choices[0].message.role == "assistant"


def test_metrics_and_request_records(served):
    served["client"].chat.completions.create(model="alpha", messages=QUESTION, max_tokens=6, temperature=0)
    text = httpx.get(f"{served['live'].url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'tunelab_requests_total{endpoint="chat",status="200"}' in text
    assert 'tunelab_request_latency_seconds{quantile="0.95"}' in text and "tunelab_queue_depth" in text
    log_file = served["directory"] / "requests.jsonl"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (log_file.exists() and '"alpha"' in log_file.read_text()):
        time.sleep(0.05)
    rows = [json.loads(line) for line in log_file.read_text().splitlines()]
    row = next(r for r in rows if r["model"] == "alpha" and r["status"] == 200)
    assert row["completion_tokens"] > 0 and row["latency_s"] > 0 and row["time_to_first_token_s"] is not None
    assert row["mean_logprob"] < 0 and row["prompt"] is None  # text only when asked for


def test_disconnect_cancels_generation(served):
    url, engine = served["live"].url, served["engine"]
    generated_before = engine.stats.generated_tokens
    stream_and_hang_up(url)
    metrics = ""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and 'status="499"' not in metrics:
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        time.sleep(0.05)
    assert 'status="499"' in metrics
    time.sleep(0.2)
    assert engine.stats.generated_tokens - generated_before < 64


def test_full_queue_answers_429_and_timeouts_504(tiny_model):
    model, tokenizer = load_with_adapters(str(tiny_model), {}, torch.device("cpu"))
    engine = GenerationEngine(model, tokenizer, max_batch_size=1, max_wait_ms=0, max_queue=1)
    settings = ServeSettings(model_name="tiny", max_tokens_limit=400, timeout=300)  # no 504 on a loaded machine
    records: list = []
    sink = type("ListSink", (), {"record": lambda self, row: records.append(row)})()
    live = LiveServer(create_app(engine, resolve_template(tokenizer, "auto"), set(), settings, record_sinks=[sink]))
    statuses: list[int] = []

    def ask() -> None:  # no stop ids: every request generates all 400 tokens
        response = httpx.post(f"{live.url}/v1/chat/completions", timeout=300,
                              json={"model": "tiny", "messages": QUESTION, "max_tokens": 400})
        statuses.append(response.status_code)

    try:
        threads = [threading.Thread(target=ask) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses.count(429) >= 1 and statuses.count(200) >= 1 and set(statuses) <= {200, 429}
        assert sorted(r.status for r in records) == sorted(statuses)  # refusals are recorded too
        assert f'status="429"}} {statuses.count(429)}' in httpx.get(f"{live.url}/metrics").text
        settings.timeout = 0.01  # far shorter than 400 tokens take
        slow = httpx.post(f"{live.url}/v1/chat/completions", timeout=60,
                          json={"model": "tiny", "messages": QUESTION, "max_tokens": 400})
        assert slow.status_code == 504 and slow.json()["error"]["type"] == "timeout"
    finally:
        live.close()
        engine.close()


def test_stop_strings_end_the_answer(served):
    client = served["client"]
    whole = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=16)
    text = whole.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=16, stop=stop)
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=QUESTION, temperature=0, max_tokens=16, stop=[stop], stream=True))
    assert streamed == text[: text.index(stop)]
