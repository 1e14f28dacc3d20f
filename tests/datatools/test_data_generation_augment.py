"""``tunelab data augment`` end to end: back-translation of Multi30k captions through German with a
scripted translator, paraphrase/restyle/verified constraints on GSM8K, the tiny local model through
the CLI, and the option and prompt-file errors.

The scripted translator looks sentences up in the real Multi30k parallel data (val en/de), so the
pivot text of every record can be checked against the German reference.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
from conftest import SHARED_DATA, read_jsonl
from scripted_openai import ScriptedServer, user_text

from tunelab.cli import main
from tunelab.datatools.augment import AugmentOptions, augment_files, load_rewrite_prompts
from tunelab.errors import ConfigError
from tunelab.generation.backends import Sampling

MULTI30K = SHARED_DATA / "translation" / "multi30k"
GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"
FIRST_WORD_SWAP = {"A": "One", "Two": "2", "The": "This", "An": "One"}


def without_created(rows: list[dict]) -> list[dict]:
    return [{**row, "provenance": {k: v for k, v in row["provenance"].items() if k != "created"}} for row in rows]


def round_trip_english(sentence: str) -> str:
    """What the scripted translator gives back from German: the first word reworded when it can."""
    first, _, rest = sentence.partition(" ")
    return f"{FIRST_WORD_SWAP[first]} {rest}" if first in FIRST_WORD_SWAP else sentence


def test_backtranslation_through_german_on_multi30k(server: ScriptedServer, tmp_path: Path, capsys):
    n = 24
    english = gzip.decompress((MULTI30K / "val.en.gz").read_bytes()).decode().splitlines()[:n]
    german = gzip.decompress((MULTI30K / "val.de.gz").read_bytes()).decode().splitlines()[:n]
    to_german, to_english = dict(zip(english, german)), dict(zip(german, english))

    def translator(body: dict) -> tuple[int, str]:
        text = user_text(body)
        source = text.split("\n\n", 1)[1]
        if "from English into German" in text:
            return 200, to_german[source]
        assert "from German into English" in text
        return 200, f'"{round_trip_english(to_english[source])}"'  # quotes a model might add

    server.script = translator
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"id": f"val-{k}", "text": s}) + "\n" for k, s in enumerate(english)))
    out = tmp_path / "augmented.jsonl"
    argv = ["data", "augment", str(captions), "--out", str(out), "--ops", "backtranslate", "--pivot", "German",
            "--backend", f"openai:{server.url}", "--backend-model", "translator", "--cache", str(tmp_path / "c.jsonl")]
    assert main(argv) == 0

    rows = read_jsonl(out)
    changed = [k for k, s in enumerate(english) if round_trip_english(s) != s]
    assert 0 < len(changed) < n  # the sample has both kinds
    assert [row["text"] for row in rows] == [round_trip_english(english[k]) for k in changed]
    for row, k in zip(rows, changed):
        p = row["provenance"]
        assert row["id"] == f"val-{k}-backtranslate0"
        assert (p["tool"], p["source"], p["parent"]) == ("augment/backtranslate", f"{captions}:{k + 1}", f"val-{k}")
        assert (p["pivot"], p["pivot_text"]) == ("German", german[k])  # the real German reference
        assert p["backend"] == f"openai:translator@{server.url}" and p["temperature"] == 0.7
    report = json.loads((tmp_path / "augmented.report.json").read_text())
    assert report["made"] == {"backtranslate": len(changed)}
    assert report["dropped"] == {"round trips that gave the source back": n - len(changed)}
    assert report["failed"] == {} and report["generator"]["calls"] == 2 * n == len(server.requests)
    assert f"wrote {len(changed)} records to {out}" in capsys.readouterr().out

    # A re-run is served from the cache: same records, no call.
    assert main([*argv, "--overwrite"]) == 0
    assert len(server.requests) == 2 * n
    assert without_created(read_jsonl(out)) == without_created(rows)


def gsm8k_script(body: dict) -> tuple[int, str]:
    """Paraphrases (one question is only ever echoed back), restyles, and constrained answers that
    keep 'one sentence' but never 'lowercase'."""
    text = user_text(body)
    if text.startswith("Paraphrase the instruction below"):
        question = text.split("\n\n", 1)[1]
        if question.startswith("Janet"):
            return 200, question  # the same text: unusable, asked again, then failed
        return 200, f'Here is the paraphrase: "Put differently: {question}"'
    if text.startswith("Rewrite the instruction below"):
        question = text.split("\n\n", 1)[1]
        tag = "Formally" if "formal and polite" in text else "Briefly" if "as short as possible" in text else "??"
        return 200, f"{tag}: {question}"
    return 200, "The answer is 18."  # an answer to a constrained question


def test_paraphrase_restyle_and_verified_constraints_on_gsm8k(server: ScriptedServer, tmp_path: Path):
    server.script = gsm8k_script
    out = tmp_path / "gsm8k-aug.jsonl"
    options = AugmentOptions(operations=("paraphrase", "restyle", "constrain"), variants=2,
                             styles=("formal", "concise"), constraints=("one-sentence", "lowercase"), limit=12,
                             sampling=Sampling(temperature=0.7, max_tokens=64, seed=3))
    result = augment_files([str(GSM8K_TEST)], out, server.backend(), options, cache=False, attempts=3, progress=False)
    rows = read_jsonl(out)
    sources = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()[:12]]
    by_op: dict[str, list[dict]] = {}
    for row in rows:
        by_op.setdefault(row["provenance"]["operation"], []).append(row)

    # Paraphrase: 12 x 2 variants; Janet's question (line 1) was echoed back every time -> 2 failed.
    assert len(by_op["paraphrase"]) == 22
    for row in by_op["paraphrase"]:
        line = int(row["provenance"]["source"].rsplit(":", 1)[1])
        source = sources[line - 1]
        assert row["messages"] == [{"role": "user", "content": f"Put differently: {source['question']}"},
                                   {"role": "assistant", "content": source["answer"]}]  # answer kept
        assert row["provenance"]["answer"] == "kept" and row["provenance"]["seed"] == 3 + row["provenance"]["variant"]
    # Restyle: each record gets both styles, one per variant.
    assert len(by_op["restyle"]) == 24
    for line in range(1, 13):
        styles = [r["provenance"]["style"] for r in by_op["restyle"] if r["provenance"]["source"].endswith(f":{line}")]
        assert sorted(styles) == ["concise", "formal"]
    assert all(r["messages"][0]["content"].startswith({"formal": "Formally: ", "concise": "Briefly: "}[
        r["provenance"]["style"]]) for r in by_op["restyle"])
    # Constrain: both constraints per record; "The answer is 18." keeps one-sentence, never lowercase.
    assert len(by_op["constrain"]) == 12
    for row in by_op["constrain"]:
        assert row["provenance"]["constraint"] == "one-sentence" and row["provenance"]["answer"] == "generated"
        assert row["messages"][0]["content"].endswith("\n\nAnswer in one sentence.")
        assert row["messages"][1] == {"role": "assistant", "content": "The answer is 18."}
    failed = read_jsonl(tmp_path / "gsm8k-aug.failed.jsonl")
    assert [(f["operation"], f["stage"]) for f in failed].count(("constrain", "answer")) == 12
    assert [(f["operation"], f["stage"]) for f in failed].count(("paraphrase", "paraphrase")) == 2
    lowercase = [f for f in failed if f["operation"] == "constrain"]
    assert all("breaks the constraint 'Write your whole answer in lowercase letters.' (has capital letters)"
               in f["error"] and f["error"].startswith("3 unusable replies") for f in lowercase)
    assert result.report["made"] == {"paraphrase": 22, "restyle": 24, "constrain": 12}
    assert result.report["failed"] == {"paraphrase": 2, "constrain": 12}
    # Calls: 24 paraphrases (+2 x 2 retries), 24 restyles, 24 answers (+12 x 2 retries).
    assert result.report["generator"]["calls"] == len(server.requests) == 24 + 4 + 24 + 24 + 24
    ids = [row["id"] for row in rows]
    assert len(set(ids)) == len(ids)


def test_cli_augment_with_the_tiny_model(tiny_model: Path, tmp_path: Path, capsys):
    out = tmp_path / "tiny-aug.jsonl"
    argv = ["data", "augment", str(GSM8K_TEST), "--out", str(out), "--limit", "4",
            "--ops", "paraphrase,backtranslate,constrain", "--constraints", "none", "--constraint", "Be brief.",
            "--answers", "regenerate", "--backend", f"hf:{tiny_model}", "--batch-size", "8", "--max-tokens", "8",
            "--temperature", "0", "--cache", str(tmp_path / "cache.jsonl")]
    code = main(argv)
    report = json.loads((tmp_path / "tiny-aug.report.json").read_text())
    made, failed = sum(report["made"].values()), sum(report["failed"].values())
    assert made + failed + sum(report["dropped"].values()) == 12  # 4 records x 3 operations
    assert code == (0 if made else 1)
    rows = read_jsonl(out)
    assert len(rows) == made
    for row in rows:  # gibberish content, but the plumbing is all there
        p = row["provenance"]
        assert p["backend"] == f"hf:{tiny_model.resolve()}" and p["answer"] == "generated"
        assert re.fullmatch(rf"{re.escape(str(GSM8K_TEST))}:[1-4]", p["source"]) and row["id"].startswith(p["parent"])
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        if p["operation"] == "constrain":
            assert row["messages"][0]["content"].endswith("\n\nBe brief.")
    assert report["generator"]["calls"] >= 4 * 4  # paraphrase, two translation legs, answers
    capsys.readouterr()
    main([*argv, "--overwrite"])  # again: everything usable comes from the cache; only failed requests are asked again
    again = json.loads((tmp_path / "tiny-aug.report.json").read_text())
    assert again["made"] == report["made"] and without_created(read_jsonl(out)) == without_created(rows)
    assert again["generator"]["cached"] >= made and again["generator"]["calls"] < report["generator"]["calls"]

    # Options that cannot apply are refused before a model loads.
    assert main(["data", "augment", str(GSM8K_TEST), "--out", str(out), "--backend", f"hf:{tiny_model}",
                 "--concurrency", "2"]) == 2
    assert "--concurrency: only for openai: backends" in capsys.readouterr().err
    assert main(["data", "augment", str(GSM8K_TEST), "--out", str(out), "--backend", f"hf:{tiny_model}",
                 "--ops", "paraphrase,summarize"]) == 2
    assert "unknown operation summarize" in capsys.readouterr().err


def test_prompt_files_and_option_errors(server: ScriptedServer, tmp_path: Path):
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("paraphrase:\n  user: 'Reword this {kind} for a pirate: {text}'\n")
    server.script = lambda body: (200, "Arr, " + user_text(body).split(": ", 1)[1])
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"instruction": "Name three colours.", "output": "Red, green, blue."}) + "\n")
    result = augment_files([str(data)], tmp_path / "out.jsonl", server.backend(),
                           AugmentOptions(prompts_file=str(prompts)), cache=False, progress=False)
    assert result.written == 1
    assert server.requests[0]["messages"] == [
        {"role": "user", "content": "Reword this instruction for a pirate: Name three colours."}]
    row = read_jsonl(tmp_path / "out.jsonl")[0]
    assert row["messages"][0]["content"] == "Arr, Name three colours." and row["provenance"]["prompt"] == str(prompts)

    for text, message in [
        ("paraphrse:\n  user: '{text}'\n", "unknown prompt 'paraphrse'"),
        ("translate:\n  user: 'Translate please'\n", r"must contain \{text\}"),
        ("restyle:\n  user: '{text} in {tone}'\n", r"unknown placeholder \{tone\}"),
        ("restyle: [1, 2]\n", "must be a mapping with a 'user' text"),
    ]:
        prompts.write_text(text)
        with pytest.raises(ConfigError, match=rf"{re.escape(str(prompts))}: .*{message}"):
            load_rewrite_prompts(prompts)
    with pytest.raises(ConfigError, match="need a temperature above 0"):
        AugmentOptions(variants=2, sampling=Sampling(temperature=0)).check()
    with pytest.raises(ConfigError, match="unknown style or constraint 'shouty'"):
        AugmentOptions(operations=("restyle",), styles=("shouty",)).check()
    text = tmp_path / "corpus.txt"
    text.write_text("Plain text has no instruction.\n")
    with pytest.raises(ConfigError, match="text records have no instruction to restyle or constrain"):
        augment_files([str(text)], tmp_path / "x.jsonl", server.backend(), AugmentOptions(operations=("restyle",)))
