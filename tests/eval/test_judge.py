"""LLM-as-judge: verdict parsing, position swap against a scripted OpenAI-compatible server, retries,
failures, the reply cache, custom templates and a local HF judge.

The server is a ``ThreadingHTTPServer`` on 127.0.0.1 whose replies are decided from the request
text by a script, so every expected count below is computed by hand from that script.
"""

from __future__ import annotations

import ast
import json
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from scripted_openai import Script, ScriptedServer, user_text

from tunelab.errors import TunelabError
from tunelab.eval import judge as judge_module
from tunelab.eval.judge import (
    Grade,
    HFBackend,
    Judge,
    JudgeError,
    OpenAIBackend,
    PairVerdict,
    combine_verdicts,
    parse_judge_spec,
    parse_pair_verdict,
    parse_score,
    parse_template,
)
from tunelab.generation import backends as backends_module


@pytest.fixture
def server():
    scripted = ScriptedServer(OpenAIBackend, "judge-model")
    yield scripted
    scripted.close()


# The planted comparison: question i, model 1 answers answer_a, model 2 answer_b.
N_QUESTIONS = 100


def planted_winner(i: int) -> int:
    """+1: model 1's answer is better, -1: model 2's, 0: equally good."""
    return 1 if i % 10 < 6 else -1 if i % 10 < 9 else 0


def pair_items(n: int = N_QUESTIONS, reverse: bool = False) -> list[dict]:
    items = []
    for i in range(n):
        tag1, tag2 = {1: ("<GOOD>", "<BAD>"), -1: ("<BAD>", "<GOOD>"), 0: ("<OK>", "<OK>")}[planted_winner(i)]
        one, two = f"{tag1} model-1 answer to q{i:03d}", f"{tag2} model-2 answer to q{i:03d}"
        first, second = (two, one) if reverse else (one, two)
        items.append({"question": f"Question q{i:03d}: explain item {i}.", "answer_a": first, "answer_b": second})
    return items


def pairwise_script(biased: Callable[[int], bool] = lambda i: False, unparsable: frozenset = frozenset()) -> Script:
    """Prefers the <GOOD> answer wherever it is shown; a biased question gets [[A]] whatever the content."""

    def script(body: dict) -> tuple[int, str]:
        text = user_text(body)
        qid = int(re.search(r"Question q(\d{3})", text).group(1))
        if qid in unparsable:
            return 200, "I think A is better"
        if biased(qid):
            return 200, "Assistant A answered first and that settles it. [[A]]"
        good, bad = text.find("<GOOD>"), text.find("<BAD>")
        if good < 0 or bad < 0:
            return 200, "Both answers are equally good. [[C]]"
        # Earlier [[..]] mentions must not count: only the last verdict does.
        return 200, f"Weighing [[A]] against [[B]]... final verdict: [[{'A' if good < bad else 'B'}]]"

    return script


def tally(outcomes: list[int | None]) -> tuple[int, int, int]:
    return outcomes.count(1), outcomes.count(-1), outcomes.count(0)


# ---------------------------------------------------------------------------------------------
# Parsing


def test_parse_score_takes_last_verdict_in_range():
    assert parse_score("Rating: [[7]]") == 7.0
    assert parse_score("Rating: [[ 7.5 ]]") == 7.5
    assert parse_score("First [[3]], on reflection [[8]]") == 8.0
    assert parse_score("[[10]]") == 10.0
    assert parse_score("[[8]] ... oops [[11]]") is None  # the last one is out of range
    assert parse_score("[[0]]") is None
    assert parse_score("I would give it a 7") is None
    assert parse_score("[7]") is None
    assert parse_score("") is None


def test_parse_pair_verdict_and_combine():
    assert parse_pair_verdict("Compare [[A]] with [[B]]; verdict: [[B]]") == "B"
    assert parse_pair_verdict("tie: [[C]]") == "C"
    assert parse_pair_verdict("I think A is better") is None
    # verdict_ab judged (A=first, B=second); verdict_ba judged (A=second, B=first).
    assert combine_verdicts("A", "B") == 1
    assert combine_verdicts("B", "A") == -1
    assert combine_verdicts("A", "A") == 0  # position bias: both orders picked slot A
    assert combine_verdicts("B", "B") == 0
    assert combine_verdicts("C", "B") == 0
    assert combine_verdicts("C", "C") == 0
    assert combine_verdicts(None, "A") is None
    assert combine_verdicts("A", None) is None


def test_template_format_and_placeholders(tmp_path: Path):
    template = parse_template("Be fair.\n---\nQ: {question}\nA: {answer}\nJSON: {\"score\": 1}\n", "single")
    messages = template.render(question="Why {answer}?", answer="Because {reference}.")
    assert messages == [
        {"role": "system", "content": "Be fair."},
        # One pass: braces in the inserted values and non-placeholder braces stay literal.
        {"role": "user", "content": 'Q: Why {answer}?\nA: Because {reference}.\nJSON: {"score": 1}'},
    ]
    assert parse_template("Q: {question} A: {answer}", "single").system is None
    with pytest.raises(JudgeError, match=r"needs \{reference\}"):
        parse_template("{question} {answer}", "single_reference", "mine.txt")
    with pytest.raises(JudgeError, match=r"unknown placeholder \{anwser\}"):
        parse_template("{question} {anwser}", "single", "mine.txt")
    # The shipped templates load and have a system part.
    shipped = judge_module.load_templates()
    assert set(shipped) == {"single", "single_reference", "pairwise", "pairwise_reference"}
    assert all(t.system for t in shipped.values())
    (tmp_path / "pairwse.txt").write_text("{question} {answer_a} {answer_b}")
    with pytest.raises(JudgeError, match="pairwse.txt: not a judge template name"):
        judge_module.load_templates(tmp_path)
    with pytest.raises(JudgeError, match="not found"):
        judge_module.load_templates(tmp_path / "missing")


def test_parse_judge_spec():
    backend = parse_judge_spec("openai:http://127.0.0.1:8000/v1/", judge_model="qwen", concurrency=2)
    assert isinstance(backend, OpenAIBackend)
    assert backend.url == "http://127.0.0.1:8000/v1/chat/completions"
    assert backend.model == "qwen" and backend.concurrency == 2
    assert backend.name == "openai:qwen@http://127.0.0.1:8000/v1"
    default = parse_judge_spec("openai")
    assert default.url == "https://api.openai.com/v1/chat/completions" and default.model == "gpt-4o-mini"
    for bad, message in [
        ("vllm:http://x", "expected openai:BASE_URL"),
        ("hf:", "name the model directory"),
        ("openai:127.0.0.1:8000", "must start with http"),
    ]:
        with pytest.raises(JudgeError, match=message):
            parse_judge_spec(bad)
    with pytest.raises(JudgeError, match="only for openai"):
        parse_judge_spec("hf:/some/dir", judge_model="x")
    assert issubclass(JudgeError, TunelabError)


def test_tunelab_needs_no_openai_or_httpx_client():
    # The judge's HTTP client is the generic generation backend.
    source = "\n".join(Path(m.__file__).read_text(encoding="utf-8") for m in (judge_module, backends_module))
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"openai", "httpx", "requests", "aiohttp"}, imported
    assert not re.search(r"^\s*(import|from)\s+(openai|httpx)\b", source, re.MULTILINE)
    assert "urllib" in imported


# ---------------------------------------------------------------------------------------------
# Pairwise comparison against the scripted server


def test_compare_many_recovers_planted_win_rate(server: ScriptedServer):
    server.script = pairwise_script()
    judge = Judge(server.backend())
    verdicts = judge.compare_many(pair_items())
    outcomes = [v.outcome for v in verdicts]
    # Exact: the script prefers the planted better answer in both orders.
    assert outcomes == [planted_winner(i) for i in range(N_QUESTIONS)]
    wins, losses, ties = tally(outcomes)
    assert (wins, losses, ties) == (60, 30, 10)
    assert (wins + ties / 2) / N_QUESTIONS == 0.65
    assert all(isinstance(v, PairVerdict) and v.error is None for v in verdicts)
    # Both raw replies are kept, and both orders were really asked.
    first = verdicts[0]
    assert (first.verdict_ab, first.verdict_ba) == ("A", "B") and first.raw_ab.endswith("[[A]]")
    assert len(server.requests) == 2 * N_QUESTIONS
    assert (judge.stats.calls, judge.stats.cached, judge.stats.unparsable, judge.stats.failed) == (200, 0, 0, 0)
    body = server.requests[0]
    assert body["temperature"] == 0 and body["model"] == "judge-model"
    assert [m["role"] for m in body["messages"]] == ["system", "user"]


def test_position_swap_cancels_planted_order_bias(server: ScriptedServer):
    biased = lambda i: i % 4 == 0  # noqa: E731 - 25 of the 100 questions: "[[A]]" whatever is shown
    server.script = pairwise_script(biased)
    verdicts = Judge(server.backend()).compare_many(pair_items())
    # By hand: the biased questions are i = 0, 4, ..., 96, whose i % 10 is 0, 2, 4, 6, 8 five
    # times each: 15 where model 1 is better, 10 where model 2 is, none tied.
    # With swap: the biased ones become ties -> wins 60 - 15 = 45, losses 30 - 10 = 20, ties 10 + 25.
    swapped = [v.outcome for v in verdicts]
    assert tally(swapped) == (45, 20, 35)
    for i, verdict in enumerate(verdicts):
        if biased(i):
            assert (verdict.verdict_ab, verdict.verdict_ba, verdict.outcome) == ("A", "A", 0)
        else:
            assert verdict.outcome == planted_winner(i)
    # Without swap (the A/B order only), slot A's bias turns every biased question into a win
    # for model 1: 45 + 25 = 70 wins instead of the planted 60.
    no_swap = [{"A": 1, "B": -1, "C": 0}[v.verdict_ab] for v in verdicts]
    assert tally(no_swap) == (70, 20, 10)
    rate = lambda outcomes: (outcomes.count(1) + outcomes.count(0) / 2) / len(outcomes)  # noqa: E731
    assert (rate(no_swap), rate(swapped), rate([planted_winner(i) for i in range(N_QUESTIONS)])) == (0.75, 0.625, 0.65)
    # The bias favours whoever sits in slot A: with the models' places exchanged, no-swap gives
    # model 2 the 25 biased questions (20 + 25 = 45 wins instead of 30); swap still gives 20.
    reversed_verdicts = Judge(server.backend()).compare_many(pair_items(reverse=True))
    assert tally([{"A": 1, "B": -1, "C": 0}[v.verdict_ab] for v in reversed_verdicts]) == (45, 45, 10)
    assert tally([v.outcome for v in reversed_verdicts]) == (20, 45, 35)


def test_unparsable_verdicts_are_counted_not_raised(server: ScriptedServer):
    server.script = pairwise_script(unparsable=frozenset({3, 7}))
    judge = Judge(server.backend())
    verdicts = judge.compare_many(pair_items(10))
    assert [i for i, v in enumerate(verdicts) if v.outcome is None] == [3, 7]
    assert verdicts[3].raw_ab == verdicts[3].raw_ba == "I think A is better"
    assert verdicts[3].error is None and verdicts[3].verdict_ab is None
    rest = [i for i in range(10) if i not in (3, 7)]
    assert [verdicts[i].outcome for i in rest] == [planted_winner(i) for i in rest]
    assert judge.stats.unparsable == 4  # two questions, both orders
    assert judge.stats.calls == 20 and judge.stats.failed == 0

    server.script = lambda body: (200, "I think it is quite good")
    grade = judge.grade("q", "a")
    assert grade == Grade(score=None, raw="I think it is quite good", error=None)
    assert judge.stats.unparsable == 5


# ---------------------------------------------------------------------------------------------
# Single-answer grading


def test_grading_parses_scores_and_sends_the_reference(server: ScriptedServer, monkeypatch: pytest.MonkeyPatch):
    # The answer plants the judge's reply: "REPLY=<text>".
    server.script = lambda body: (200, re.search(r"REPLY=(.*)\n", user_text(body)).group(1))
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test")
    judge = Judge(server.backend(api_key_env="JUDGE_TEST_KEY"))
    replies = ["Solid. Rating: [[7]]", "Rating: [[7.5]]", "First [[3]], then [[8]]", "Rating: [[11]]", "no verdict"]
    grades = judge.grade_many([(f"question {k}", f"REPLY={reply}") for k, reply in enumerate(replies)])
    assert [g.score for g in grades] == [7.0, 7.5, 8.0, None, None]
    assert [g.raw for g in grades] == replies
    assert all(g.error is None for g in grades)
    assert judge.stats.unparsable == 2
    assert server.headers[0]["Authorization"] == "Bearer sk-test"
    plain = user_text(server.requests[0])
    assert "[The Start of the Reference Answer]" not in plain and "Rubric" in plain

    grade = judge.grade("What is 6 * 7?", "REPLY=Matches the reference. [[9]]", reference="REFTEXT: 6 * 7 = 42")
    assert grade.score == 9.0
    sent = server.requests[-1]["messages"]
    assert "reference answer" in sent[0]["content"].lower()
    shown = "[The Start of the Reference Answer]\nREFTEXT: 6 * 7 = 42\n[The End of the Reference Answer]"
    assert shown in sent[-1]["content"]
    assert "What is 6 * 7?" in sent[-1]["content"]


def test_custom_templates_dir(server: ScriptedServer, tmp_path: Path):
    (tmp_path / "pairwise.txt").write_text("MY PROMPT for {question}: 1) {answer_a} 2) {answer_b}\n", encoding="utf-8")
    server.script = pairwise_script()
    verdicts = Judge(server.backend(), templates_dir=tmp_path).compare_many(pair_items(2))
    assert [v.outcome for v in verdicts] == [1, 1]
    # No "---" line: a user message only; the swap shows the answers the other way round.
    assert all(len(body["messages"]) == 1 and body["messages"][0]["role"] == "user" for body in server.requests)
    good, bad = "<GOOD> model-1 answer to q000", "<BAD> model-2 answer to q000"
    assert {user_text(body) for body in server.requests} >= {
        f"MY PROMPT for Question q000: explain item 0.: 1) {good} 2) {bad}",
        f"MY PROMPT for Question q000: explain item 0.: 1) {bad} 2) {good}",
    }
    # Templates not in the directory are the shipped ones.
    server.script = lambda body: (200, "[[6]]")
    Judge(server.backend(), templates_dir=tmp_path).grade("q", "a")
    assert "Rubric" in user_text(server.requests[-1])


# ---------------------------------------------------------------------------------------------
# Failures and retries


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_judge_gives_error_entries():
    url = f"http://127.0.0.1:{closed_port()}/v1"
    backend = OpenAIBackend(url, "m", max_retries=2, backoff=0)
    judge = Judge(backend)
    verdicts = judge.compare_many(pair_items(5))
    grades = judge.grade_many([{"question": "q", "answer": f"a{k}"} for k in range(5)])
    assert all(v.outcome is None and v.error for v in verdicts)
    assert all(g.score is None and g.error for g in grades)
    assert f"{url}/chat/completions" in grades[0].error and "Connection refused" in grades[0].error
    assert "gave up after 3 attempts" in grades[0].error
    assert verdicts[0].error.startswith("A/B order: judge http://127.0.0.1") and "; B/A order: " in verdicts[0].error
    assert (judge.stats.calls, judge.stats.failed, judge.stats.cached) == (15, 15, 0)
    # The single call raises a JudgeError (the batch API turns it into entries).
    with pytest.raises(JudgeError, match="Connection refused"):
        backend.complete([{"role": "user", "content": "hi"}])


def flaky(statuses: list[int], then: str) -> Script:
    """Answer with the given error statuses first, then with ``then``."""
    remaining = list(statuses)
    lock = threading.Lock()

    def script(body: dict) -> tuple[int, str]:
        with lock:
            if remaining:
                return remaining.pop(0), "overloaded"
        return 200, then

    return script


def test_retries_on_5xx_and_429_then_succeeds(server: ScriptedServer):
    server.script = flaky([500], "Rating: [[8]]")
    judge = Judge(server.backend(max_retries=3))
    assert judge.grade("q", "a") == Grade(score=8.0, raw="Rating: [[8]]", error=None)
    assert len(server.requests) == 2
    server.script = flaky([429, 503], "Rating: [[4]]")
    assert judge.grade("q", "another answer").score == 4.0
    assert len(server.requests) == 5
    assert (judge.stats.calls, judge.stats.failed) == (2, 0)


def test_retries_give_up_and_client_errors_are_not_retried(server: ScriptedServer):
    server.script = lambda body: (500, "model crashed")
    judge = Judge(server.backend(max_retries=2))
    grade = judge.grade("q", "a")
    assert grade.score is None and len(server.requests) == 3
    assert grade.error == f"judge {server.url}/chat/completions: HTTP 500: model crashed (gave up after 3 attempts)"
    server.script = lambda body: (400, "unknown model 'judge-model'")
    grade = judge.grade("q", "b")
    assert len(server.requests) == 4  # a 400 is the caller's mistake: no retry
    assert "HTTP 400: unknown model 'judge-model'" in grade.error
    assert judge.stats.failed == 2
    # A failed call is not cached: asking again calls the server again.
    server.script = lambda body: (200, "[[5]]")
    assert judge.grade("q", "b").score == 5.0 and len(server.requests) == 5


# ---------------------------------------------------------------------------------------------
# Cache


def test_cache_makes_rerun_free(server: ScriptedServer, tmp_path: Path):
    server.script = pairwise_script(lambda i: i % 4 == 0)
    cache = tmp_path / "judge-cache.jsonl"
    items = pair_items(20)
    first = Judge(server.backend(), cache_path=cache).compare_many(items)
    assert len(server.requests) == 40
    lines = cache.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 40
    entry = json.loads(lines[0])
    assert set(entry) == {"key", "judge", "reply"} and entry["judge"] == f"openai:judge-model@{server.url}"
    assert re.fullmatch(r"[0-9a-f]{64}", entry["key"])

    again = Judge(server.backend(), cache_path=cache)
    second = again.compare_many(items)
    assert len(server.requests) == 40  # zero HTTP requests
    assert second == first
    assert (again.stats.calls, again.stats.cached) == (0, 40)

    # Another judge model is another key; a line cut by a crash is skipped, the file stays usable.
    with open(cache, "a", encoding="utf-8") as handle:
        handle.write('{"key": "abc", "rep')
    other = Judge(OpenAIBackend(server.url, "other-model", backoff=0), cache_path=cache)
    other.compare_many(items[:1])
    assert len(server.requests) == 42 and other.stats.calls == 2
    assert all(json.loads(line)["judge"] for line in cache.read_text().splitlines()[-2:])
    assert Judge(server.backend(), cache_path=cache).compare_many(items) == first
    assert len(server.requests) == 42


# ---------------------------------------------------------------------------------------------
# A local Hugging Face judge


def test_hf_backend_grades_without_raising(tiny_model: Path):
    backend = parse_judge_spec(f"hf:{tiny_model}", max_new_tokens=8, batch_size=4)
    assert isinstance(backend, HFBackend) and backend.name == f"hf:{tiny_model.resolve()}"
    judge = Judge(backend)
    items = [{"question": f"What is {k} + {k}?", "answer": str(2 * k)} for k in range(3)]
    items.append({"question": "What is 2 + 2?", "answer": "4", "reference": "4"})
    grades = judge.grade_many(items)
    assert len(grades) == 4
    for grade in grades:
        # A random model: its reply is garbage, so the score is None (unparsable) or a valid number.
        assert grade.error is None and isinstance(grade.raw, str)
        assert grade.score is None or 1 <= grade.score <= 10
    assert judge.stats.calls == 4 and judge.stats.failed == 0
    assert judge.stats.unparsable == sum(g.score is None for g in grades)
