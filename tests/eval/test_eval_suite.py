"""tunelab eval and compare: perplexity, predictions, accounting, reports, regression gates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from scripted_openai import ScriptedServer
from tunelab.data.records import Prompt
from tunelab.eval import suite
from tunelab.eval.compare import run_compare
from tunelab.eval.generate import generate_answers
from tunelab.eval.judge import Judge, OpenAIBackend
from tunelab.eval.suite import EvalOptions, check_thresholds, reference_loss, run_eval
from tunelab.errors import TunelabError
from tunelab.models.load import generation_stop_ids, load_for_inference

QA = [
    ("What is 2 + 3?", "2 + 3 = 5\nanswer: 5"),
    ("Name a colour.", "Blue is a colour."),
    ("Say hello in French.", "Bonjour!"),
    ("Count to three.", "One, two, three."),
    ("What is the capital of Italy?", "Rome is the capital of Italy, a city of long history."),
]


def write_eval_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def qa_rows() -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]


@pytest.fixture(scope="module")
def loaded(tiny_model):
    model, tokenizer = load_for_inference(str(tiny_model), device=torch.device("cpu"))
    return model, tokenizer, generation_stop_ids(model.generation_config, tokenizer)


@pytest.mark.parametrize("packing", [True, False])
def test_perplexity_is_exp_of_mean_answer_token_nll(loaded, packing):
    """Independent of tunelab's masks: answer tokens are those after the rendered prompt's tokens."""
    model, tokenizer, stop_ids = loaded
    total, count = 0.0, 0
    for question, answer in QA:
        prompt = [{"role": "user", "content": question}]
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}],
                                                  tokenize=False).rstrip()
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        targets = torch.tensor(ids[len(prompt_ids):])
        total += float(F.cross_entropy(logits[len(prompt_ids) - 1 : -1], targets, reduction="sum"))
        count += len(targets)
    expected = math.exp(total / count)
    prompts = [Prompt([{"role": "user", "content": q}], a) for q, a in QA]
    template = tokenizer.chat_template
    result, truncated = reference_loss(model, tokenizer, template, prompts, stop_ids, 512, packing, batch_size=2)
    assert truncated == 0
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_run_eval_writes_predictions_results_and_accounting(tmp_path, loaded, monkeypatch):
    model, tokenizer, stop_ids = loaded
    rows = qa_rows() + [
        {"messages": [{"role": "user", "content": "No reference here."}]},
        {"messages": [{"role": "user", "content": "Blank reference"}, {"role": "assistant", "content": "  "}]},
        {"instruction": "a record of the wrong format"},
        {"messages": "not a list"},
    ]
    data = write_eval_file(tmp_path / "mixed.jsonl", rows)
    real = suite.generate_answers

    def some_empty(*args, **kwargs):  # the model answers nothing for two prompts
        answers = real(*args, **kwargs)
        return ["" if k in (1, 5) else a for k, a in enumerate(answers)]

    monkeypatch.setattr(suite, "generate_answers", some_empty)
    options = EvalOptions(metrics=["bleu", "rougeL", "exact_match", "distinct_1", "perplexity"], max_new_tokens=8)
    results = run_eval(model, tokenizer, [str(data)], tmp_path / "out", options, stop_ids, {"model": "tiny"})
    entry = results["sets"][0]
    assert entry["accounting"]["examples"] == 7 and entry["accounting"]["records_read"] == 9
    assert sum(entry["accounting"]["skipped_records"].values()) == 2
    assert entry["accounting"]["missing_reference"] == 2
    assert entry["accounting"]["empty_prediction"] == 2
    assert set(results["metrics"]) == {"bleu", "rougeL", "exact_match", "distinct_1", "perplexity"}
    assert all(results["metrics"][m] is not None for m in results["metrics"])
    assert set(entry["ci"]) == {"bleu", "rougeL", "exact_match"}
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 7 and first["id"] == f"{data}:1" and first["reference"] == QA[0][1]
    assert {"prompt", "prediction", "messages", "set"} <= first.keys()


def test_thresholds():
    assert check_thresholds({"bleu": 30.0, "exact_match": 0.4}, ["bleu=20", "exact_match=0.5"]) == [
        "exact_match = 0.4 is below 0.5"]
    with pytest.raises(TunelabError, match="not measured"):
        check_thresholds({"bleu": 1.0}, ["rougeL=3"])
    with pytest.raises(TunelabError, match="expected METRIC=VALUE"):
        check_thresholds({"bleu": 1.0}, ["bleu"])


def test_cli_eval_report_and_fail_below(tmp_path, tiny_model):
    data = write_eval_file(tmp_path / "qa.jsonl", qa_rows())
    out = tmp_path / "eval"
    result = run_cli("eval", "--model", str(tiny_model), "--data", str(data), "--out", str(out),
                     "--metrics", "bleu,exact_match,perplexity", "--max-new-tokens", "8", "--fail-below", "bleu=99")
    assert result.returncode == 1, result.stderr
    assert "FAIL: bleu" in result.stderr and "Traceback" not in result.stderr
    for name in ("results.json", "predictions.jsonl", "report.md", "report.html"):
        assert (out / name).is_file(), name
    assert "perplexity" in (out / "report.html").read_text()
    bad = run_cli("eval", "--model", str(tiny_model), "--data", str(data), "--out", str(out), "--metrics", "blue")
    assert bad.returncode == 2 and "unknown metric(s) blue" in bad.stderr


def predictions_file(path: Path, answers: list[str], references: list[str]) -> str:
    rows = [{"id": str(k), "prompt": f"question {k}", "prediction": a, "reference": r}
            for k, (a, r) in enumerate(zip(answers, references))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_compare_by_metric_with_three_models(tmp_path):
    references = [f"answer: {k}" for k in range(40)]
    good = predictions_file(tmp_path / "good.jsonl", references, references)
    half = predictions_file(tmp_path / "half.jsonl", [r if k % 2 else "answer: x" for k, r in enumerate(references)],
                            references)
    none = predictions_file(tmp_path / "none.jsonl", ["" for _ in references], references)
    results = run_compare([good, half, none], "metric:exact_match", tmp_path / "cmp", resamples=2000)
    pairs = {(p["model_a"], p["model_b"]): p for p in results["pairs"]}
    assert (pairs["good", "half"]["wins"], pairs["good", "half"]["ties"], pairs["good", "half"]["losses"]) == (20, 20, 0)
    assert pairs["good", "none"]["win_rate"] == 1.0 and pairs["half", "none"]["win_rate"] == 0.75
    assert pairs["good", "half"]["ci_low"] < 0.75 < pairs["good", "half"]["ci_high"]
    assert [r["model"] for r in results["ratings"]] == ["good", "half", "none"]
    assert len((tmp_path / "cmp" / "verdicts.jsonl").read_text().splitlines()) == 3 * 40


def test_compare_with_a_judge_server_and_an_unreachable_judge(tmp_path):
    a = predictions_file(tmp_path / "a.jsonl", ["a long detailed answer"] * 10, [""] * 10)
    b = predictions_file(tmp_path / "b.jsonl", ["short"] * 10, [""] * 10)
    server = ScriptedServer()

    def prefer_longer(body: dict) -> tuple[int, str]:
        text = body["messages"][-1]["content"]
        first = text.index("a long detailed answer") < text.index("short")
        return 200, "[[A]]" if first else "[[B]]"

    server.script = prefer_longer
    try:
        results = run_compare([a, b], f"openai:{server.url}", tmp_path / "judged", judge_model="judge-model",
                              resamples=1000)
    finally:
        server.close()
    pair = results["pairs"][0]
    assert (pair["wins"], pair["ties"], pair["losses"]) == (10, 0, 0)
    assert results["accounting"]["judge_calls"] == 20
    # A closed port: every example is a "no verdict", counted; nothing raises.
    unreachable = run_compare([a, b], "openai:http://127.0.0.1:9/v1", tmp_path / "down", judge_model="m",
                              resamples=100)
    assert unreachable["pairs"][0]["no_verdict"] == 10 and unreachable["accounting"]["judge_failed"] == 20
    errors = [json.loads(line)["error"] for line in (tmp_path / "down" / "verdicts.jsonl").read_text().splitlines()]
    assert all("127.0.0.1:9" in error for error in errors)


def test_compare_with_human_labels_and_bad_inputs(tmp_path):
    a = predictions_file(tmp_path / "a.jsonl", ["x"] * 4, ["y"] * 4)
    b = predictions_file(tmp_path / "b.jsonl", ["z"] * 4, ["y"] * 4)
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"id": str(k), "model_a": "a", "model_b": "b", "winner": w}) + "\n"
                              for k, w in enumerate(["a", "a", "tie", "b"])))
    results = run_compare([a, b], "labels", tmp_path / "human", labels_path=str(labels), resamples=100)
    pair = results["pairs"][0]
    assert (pair["wins"], pair["ties"], pair["losses"], pair["win_rate"]) == (2, 1, 1, 0.625)
    with pytest.raises(TunelabError, match="at least twice"):
        run_compare([a], "metric:bleu", tmp_path / "x")
    with pytest.raises(TunelabError, match="per-example metric"):
        run_compare([a, b], "metric:distinct_1", tmp_path / "x")
    cli = run_cli("compare", "--predictions", a, "--predictions", str(tmp_path / "missing.jsonl"), "--out",
                  str(tmp_path / "y"))
    assert cli.returncode == 2 and "missing.jsonl: data file not found" in cli.stderr


def test_single_answer_grading_in_eval(tmp_path, loaded):
    model, tokenizer, stop_ids = loaded
    rows = qa_rows() + [{"messages": [{"role": "user", "content": "No reference here."}]}]
    data = write_eval_file(tmp_path / "graded.jsonl", rows)
    server = ScriptedServer()
    seen = []

    def grade(body: dict) -> tuple[int, str]:
        text = body["messages"][-1]["content"]
        seen.append(text)
        return (200, "Fine. [[8]]") if "Rome" not in text else (200, "no verdict here")

    server.script = grade
    try:
        options = EvalOptions(metrics=["exact_match"], max_new_tokens=4,
                              judge=Judge(server.backend(), cache_path=str(tmp_path / "cache.jsonl")))
        results = run_eval(model, tokenizer, [str(data)], tmp_path / "out", options, stop_ids)
    finally:
        server.close()
    entry = results["sets"][0]
    assert results["metrics"]["judge_score"] == 8.0
    assert (entry["accounting"]["judge_graded"], entry["accounting"]["judge_unparsable"]) == (5, 1)
    assert sum("Bonjour!" in text for text in seen) == 1  # reference-guided when a reference exists
    # An unreachable judge: graded by nobody, accounted, no crash.
    options.judge = Judge(OpenAIBackend("http://127.0.0.1:9/v1", "judge-model", backoff=0))
    results = run_eval(model, tokenizer, [str(data)], tmp_path / "down", options, stop_ids)
    assert results["metrics"]["judge_score"] is None
    assert results["sets"][0]["accounting"]["judge_failed"] == 6


def test_seeded_sampling_is_reproducible(loaded):
    model, tokenizer, _ = loaded
    prompts = [[{"role": "user", "content": q}] for q, _ in QA]
    greedy = generate_answers(model, tokenizer, tokenizer.chat_template, prompts, 12, 4)
    assert greedy == generate_answers(model, tokenizer, tokenizer.chat_template, prompts, 12, 4)
    sampled = [generate_answers(model, tokenizer, tokenizer.chat_template, prompts, 12, 4, temperature=1.0, seed=s)
               for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
