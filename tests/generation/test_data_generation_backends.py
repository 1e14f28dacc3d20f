"""Generation backends and the generator behind the data tools: cache, concurrency limit, retries of
timeouts and garbage, failures that do not stop the job, resuming after a dead backend, and the
local HF backend.

The OpenAI-compatible server is the scripted one on 127.0.0.1 (tests/support/scripted_openai.py); every
expected count below follows from its script.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from scripted_openai import Raw, ScriptedServer, user_text

from tunelab.generation.backends import BackendError, HFBackend, OpenAIBackend, Sampling, parse_backend_spec
from tunelab.generation.runner import GarbageReply, Generator


def prompts(n: int, tag: str = "item") -> list[list[dict]]:
    return [[{"role": "user", "content": f"{tag} {k}"}] for k in range(n)]


def echo(body: dict) -> tuple[int, str]:
    """Reply 'reply to <prompt> (seed S)'."""
    return 200, f"reply to {user_text(body)} (seed {body.get('seed')})"


def test_cached_replies_make_a_rerun_free(server: ScriptedServer, tmp_path: Path):
    server.script = echo
    cache = tmp_path / "cache.jsonl"
    sampling = Sampling(temperature=0.7, max_tokens=32, seed=5)
    first = Generator(server.backend(), cache, progress=False).generate(prompts(40), sampling)
    assert [r.text for r in first] == [f"reply to item {k} (seed 5)" for k in range(40)]
    assert len(server.requests) == 40 and len(cache.read_text().splitlines()) == 40

    again = Generator(server.backend(), cache, progress=False)
    second = again.generate(prompts(40), sampling)
    assert len(server.requests) == 40  # not one call
    assert [r.text for r in second] == [r.text for r in first] and all(r.cached for r in second)
    assert (again.stats.calls, again.stats.cached) == (0, 40)
    # The sampling is part of the key: another seed is another request. Duplicates are asked once.
    other = again.generate(prompts(3) + prompts(3), Sampling(temperature=0.7, max_tokens=32, seed=6))
    assert len(server.requests) == 43 and other[0].text == other[3].text == "reply to item 0 (seed 6)"
    assert (again.stats.calls, again.stats.cached) == (3, 43)


def test_concurrency_limit(server: ScriptedServer):
    # Each request waits at a 3-party barrier: three must be in flight together for any to return
    # (a client sending fewer at once breaks the barrier), and the peak shows no more were.
    barrier = threading.Barrier(3)
    lock = threading.Lock()
    state = {"in_flight": 0, "peak": 0}

    def script(body: dict) -> tuple[int, str]:
        with lock:
            state["in_flight"] += 1
            state["peak"] = max(state["peak"], state["in_flight"])
        try:
            barrier.wait(timeout=10)
        finally:
            with lock:
                state["in_flight"] -= 1
        return 200, "ok"

    server.script = script
    results = Generator(server.backend(concurrency=3), progress=False).generate(prompts(12))
    assert [r.text for r in results] == ["ok"] * 12
    assert state["peak"] == 3 and len(server.requests) == 12


def test_timeouts_are_retried_then_reported_and_the_job_continues(server: ScriptedServer, tmp_path: Path):
    release = threading.Event()
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def script(body: dict) -> tuple[int, str]:
        text = user_text(body)
        with lock:
            seen[text] = seen.get(text, 0) + 1
            attempt = seen[text]
        # 'stall' prompts never answer in time; 'slow' ones only the first time.
        if text.startswith("stall") or (text.startswith("slow") and attempt == 1):
            release.wait(timeout=30)
        return 200, f"done {text}"

    server.script = script
    cache = tmp_path / "cache.jsonl"
    requests = prompts(6, "fast") + prompts(2, "slow") + prompts(2, "stall")
    try:
        generator = Generator(server.backend(timeout=0.3, max_retries=1, concurrency=4), cache, progress=False)
        results = generator.generate(requests)
    finally:
        release.set()
    assert [r.ok for r in results] == [True] * 8 + [False] * 2
    assert [r.text for r in results[:8]] == [f"done {m[0]['content']}" for m in requests[:8]]
    assert [r.attempts for r in results] == [1] * 10  # timeouts are retried inside the backend call
    assert all(seen[f"slow {k}"] == 2 and seen[f"stall {k}"] == 2 for k in range(2))
    for failed in results[8:]:
        assert "timed out" in failed.error and "gave up after 2 attempts" in failed.error
        assert failed.error.startswith(f"backend {server.url}/chat/completions: ")
    assert (generator.stats.calls, generator.stats.failed) == (10, 2)
    # Nothing already generated is lost: the 8 replies are in the cache, and a re-run (server
    # healthy now) asks only for the 2 that failed.
    assert len(cache.read_text().splitlines()) == 8
    calls_before = len(server.requests)
    rerun = Generator(server.backend(timeout=5), cache, progress=False).generate(requests)
    assert all(r.ok for r in rerun) and len(server.requests) == calls_before + 2
    assert [r.cached for r in rerun] == [True] * 8 + [False] * 2


def parse_answer(text: str) -> int:
    """The job wants {"answer": int}; anything else is garbage."""
    try:
        value = json.loads(text)["answer"]
    except (ValueError, KeyError, TypeError):
        raise GarbageReply("not a JSON object with an answer") from None
    if not isinstance(value, int):
        raise GarbageReply("the answer is not a number")
    return value


def test_garbage_is_retried_then_reported(server: ScriptedServer):
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def script(body: dict) -> tuple[int, str | Raw]:
        text = user_text(body)
        with lock:
            counts[text] = counts.get(text, 0) + 1
            n = counts[text]
        if text == "html":  # never a chat completion at all
            return 200, Raw(b"<html>502 bad gateway</html>", "text/html")
        if text == "no choices":  # JSON without the fields
            return 200, Raw(json.dumps({"id": "x", "object": "chat.completion"}).encode())
        if text == "html once" and n == 1:
            return 200, Raw(b"<html>oops</html>", "text/html")
        if text == "prose":  # a chat completion, but not the JSON the job asked for
            return 200, "The answer is seven."
        if text == "prose once" and n == 1:
            return 200, "Let me think..."
        return 200, json.dumps({"answer": len(text)})

    server.script = script
    names = ["ok", "html", "no choices", "html once", "prose", "prose once"]
    generator = Generator(server.backend(max_retries=2), attempts=3, progress=False)
    results = generator.generate([[{"role": "user", "content": n}] for n in names],
                                 Sampling(temperature=0.5, seed=1), parse_answer)
    by_name = dict(zip(names, results))
    assert {n: r.value for n, r in by_name.items() if r.ok} == {"ok": 2, "html once": 9, "prose once": 10}
    # Malformed responses are retried by the backend (3 HTTP attempts), then fail.
    assert counts["html"] == 3 and "not a chat completion response: '<html>502" in by_name["html"].error
    assert counts["no choices"] == 3 and "gave up after 3 attempts" in by_name["no choices"].error
    # A reply that is not what the job asked for is asked again (3 attempts), then fails.
    assert counts["prose"] == 3 and by_name["prose"].error.startswith("3 unusable replies; last: not a JSON object")
    assert by_name["prose"].attempts == 3 and counts["prose once"] == 2 and counts["html once"] == 2
    # A sampled retry asks with another seed (a greedy one would be asked as it was).
    seeds = [b["seed"] for b in server.requests if b["messages"][0]["content"] == "prose once"]
    assert seeds == [1, 1 + 7919]
    assert (generator.stats.garbage, generator.stats.failed) == (4, 3)


def test_a_dead_backend_stops_the_job_and_a_rerun_resumes(server: ScriptedServer, tmp_path: Path):
    state = {"healthy": 10}
    lock = threading.Lock()

    def dying(body: dict) -> tuple[int, str]:
        with lock:
            if state["healthy"] <= 0:
                return 500, "model crashed"
            state["healthy"] -= 1
        return echo(body)

    server.script = dying
    cache = tmp_path / "cache.jsonl"
    generator = Generator(server.backend(concurrency=1, max_retries=0), cache, progress=False,
                          max_consecutive_failures=5)
    with pytest.raises(BackendError, match=r"(?s)the last 5 calls to openai:scripted-model.* failed.*"
                                           r"HTTP 500: model crashed.*run the same command again to resume"):
        generator.generate(prompts(30), Sampling(temperature=0.7, seed=0))
    assert len(cache.read_text().splitlines()) == 10
    asked = len(server.requests)
    # Stopped at the 5th failure in a row; calls not yet started were cancelled (one may have
    # been on its way already).
    assert asked in (15, 16)

    server.script = echo
    resumed = Generator(server.backend(), cache, progress=False)
    results = resumed.generate(prompts(30), Sampling(temperature=0.7, seed=0))
    assert [r.text for r in results] == [f"reply to item {k} (seed 0)" for k in range(30)]
    assert len(server.requests) == asked + 20 and sum(r.cached for r in results) == 10


def test_openai_request_body_key_and_specs(server: ScriptedServer, monkeypatch: pytest.MonkeyPatch):
    server.script = echo
    monkeypatch.setenv("TUNELAB_TEST_KEY", "sk-secret")
    backend = parse_backend_spec(f"openai:{server.url}", "my-model", api_key_env="TUNELAB_TEST_KEY", backoff=0)
    assert isinstance(backend, OpenAIBackend) and backend.name == f"openai:my-model@{server.url}"
    backend.complete([{"role": "user", "content": "hi"}], Sampling(temperature=0.9, top_p=0.5, max_tokens=7, seed=3))
    backend.complete([{"role": "user", "content": "hi"}])
    sampled, greedy = server.requests
    assert {k: sampled[k] for k in ("model", "temperature", "top_p", "max_tokens", "seed")} == {
        "model": "my-model", "temperature": 0.9, "top_p": 0.5, "max_tokens": 7, "seed": 3}
    assert greedy["temperature"] == 0 and "seed" not in greedy and "max_tokens" not in greedy
    assert server.headers[0]["Authorization"] == "Bearer sk-secret"
    monkeypatch.delenv("TUNELAB_TEST_KEY")
    backend.complete([{"role": "user", "content": "hi"}])
    assert "Authorization" not in server.headers[-1]
    for spec, model, message in [
        (f"openai:{server.url}", None, r"name the model the server serves \(--backend-model NAME\)"),
        ("hf:/models/x", "m", "only for openai"),
        ("hf:", None, "name the model directory"),
        ("vllm:http://x", None, "expected openai:BASE_URL"),
        ("openai:localhost:8000", "m", "must start with http"),
    ]:
        with pytest.raises(BackendError, match=message):
            parse_backend_spec(spec, model)
    server.script = lambda body: (401, "bad key")
    with pytest.raises(BackendError, match=r"HTTP 401: bad key \(is the API key right\? set OPENAI_API_KEY\)"):
        server.backend().complete([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 4  # a 401 is not retried


def test_hf_backend_batches_reproducibly_and_caches(tiny_model: Path, tmp_path: Path):
    from tunelab.generation.local import generate_answers

    backend = parse_backend_spec(f"hf:{tiny_model}", batch_size=4, max_new_tokens=6)
    assert isinstance(backend, HFBackend) and backend.name == f"hf:{tiny_model.resolve()}"
    requests = [[{"role": "user", "content": f"Tell me about the number {k}."}] for k in range(6)]
    sampling = Sampling(temperature=0.9, max_tokens=6, seed=11)
    cache = tmp_path / "cache.jsonl"
    generator = Generator(backend, cache, progress=False)
    first = generator.generate(requests, sampling)
    assert all(r.ok for r in first) and generator.stats.calls == 6
    # The batches are exactly tunelab's batched generate with the same seed.
    expected = []
    for start in (0, 4):
        expected += generate_answers(backend.model, backend.tokenizer, backend.template, requests[start:start + 4],
                                     max_new_tokens=6, batch_size=4, temperature=0.9, seed=11)
    assert [r.text for r in first] == expected
    rerun = Generator(backend, cache, progress=False)
    assert [r.text for r in rerun.generate(requests, sampling)] == expected and rerun.stats.calls == 0
