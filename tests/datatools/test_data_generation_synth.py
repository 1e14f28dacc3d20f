"""``tunelab data synth`` end to end: self-instruct on the paper's 175 seed tasks with planted
near-duplicates (rejected, their ROUGE-L measured and reported), QA pairs from DialogSum dialogues
(ungrounded answers and repeated questions rejected, garbage replies retried then reported), and
both methods with the tiny local model through the CLI.

The scripted server builds its replies from the prompt it receives, so every count below follows
from the script; ROUGE-L is recomputed here with rouge_score's own scorer.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest
from conftest import SHARED_DATA, read_jsonl
from rouge_score import rouge_scorer
from scripted_openai import ScriptedServer, user_text

from tunelab.cli import main
from tunelab.datatools.synth import (
    BLACKLIST,
    QAOptions,
    SelfInstructOptions,
    parse_instance,
    parse_instruction_list,
    parse_qa_pairs,
    self_instruct,
    synth_qa,
)
from tunelab.errors import ConfigError
from tunelab.generation.runner import GarbageReply

SEEDS = SHARED_DATA / "self_instruct" / "seed_tasks.jsonl"
DIALOGSUM = SHARED_DATA / "summarization" / "dialogsum" / "dialogsum.dev.jsonl"
GSM8K_TRAIN = SHARED_DATA / "gsm8k" / "train.jsonl"


def digest(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def vocabulary() -> list[str]:
    """Words for novel instructions: from GSM8K questions, none of them blacklisted."""
    words: set[str] = set()
    for line in GSM8K_TRAIN.read_text().splitlines()[:400]:
        words.update(w for w in re.findall(r"[a-z]{4,}", json.loads(line)["question"].lower()) if w not in BLACKLIST)
    return sorted(words)


VOCAB = vocabulary()
NEAR_DUP_SUFFIX = " Keep it short."


def novel(prompt: str, k: int) -> str:
    """A fresh instruction: seven random words (two of these share almost nothing)."""
    return "Describe " + " ".join(random.Random(digest(f"{prompt}/{k}")).sample(VOCAB, 7))


def self_instruct_script(body: dict) -> tuple[int, str]:
    text = user_text(body)
    if text.startswith("Task: "):  # an instance
        instruction = text.split("\n\n", 1)[0].removeprefix("Task: ")
        if digest(instruction) % 5 == 0:
            return 200, "Input: <noinput>\nOutput:"  # no output: unusable, every time
        if digest(instruction) % 2:
            return 200, json.dumps({"input": "", "output": f"An answer to: {instruction}"})
        return 200, f"Input: <noinput>\nOutput: An answer to: {instruction}"
    examples = re.findall(r"^\d+\. (.+)$", text.split("\n\n", 1)[0], re.MULTILINE)
    seed_examples = [e for e in examples if not e.startswith("Describe ")]
    machine_examples = [e for e in examples if e.startswith("Describe ")]
    long_seed = next(e for e in seed_examples if len(e.split()) >= 8)
    exact = next(e for e in seed_examples if len(e.split()) > 3 and e != long_seed)
    planted = [long_seed + NEAR_DUP_SUFFIX, exact]  # a near-duplicate and an exact one
    if machine_examples:  # a near-duplicate of an instruction generated in an earlier round
        planted.append(machine_examples[0].rsplit(" ", 1)[0] + " kindly")
    planted += ["Draw a diagram of the water cycle for children.", "Say hello.",
                "...then summarize the paragraph below for a busy reader."]
    tasks = planted + [novel(text, 0), novel(text, 1)]
    return 200, "Here are the new tasks:\n" + "\n".join(f"{n}. {task}" for n, task in enumerate(tasks, start=1))


def test_self_instruct_rejects_planted_near_duplicates_and_reports_rouge(server: ScriptedServer, tmp_path: Path):
    server.script = self_instruct_script
    out = tmp_path / "self-instruct.jsonl"
    options = SelfInstructOptions(num_instructions=10, prompt_instructions=6, prompt_machine=2, new_per_request=8,
                                  requests_per_round=3)
    cache = tmp_path / "cache.jsonl"
    result = self_instruct([str(SEEDS)], out, server.backend(), options, cache=cache, progress=False)
    report = result.report
    # Round 0: 3 replies x 2 novel = 6 kept; round 1: 2 replies reach 10 (the third is not read).
    assert (report["seeds"], report["rounds"], report["kept"]) == (175, 2, 10)
    assert report["rejected"] == {"ROUGE-L >= 0.7": 3 + 2 * 2, "duplicate": 5, "blacklisted keyword": 5,
                                  "too short": 5, "starts with punctuation": 5}
    rejects = read_jsonl(tmp_path / "self-instruct.rejects.jsonl")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    near = [r for r in rejects if r["reason"] == "ROUGE-L >= 0.7"]
    measured = []
    for entry in near:
        # Rejected against the instruction it was planted from, with rouge_score's own ROUGE-L.
        if entry["instruction"].endswith(NEAR_DUP_SUFFIX):
            assert entry["closest"] == entry["instruction"].removesuffix(NEAR_DUP_SUFFIX)
        else:
            assert entry["instruction"].endswith(" kindly") and entry["closest"].startswith("Describe ")
            assert entry["closest"].rsplit(" ", 1)[0] == entry["instruction"].rsplit(" ", 1)[0]
        expected = scorer.score(entry["closest"], entry["instruction"])["rougeL"].fmeasure
        assert entry["rouge_l"] == round(expected, 4) and expected >= 0.7
        measured.append(expected)
    assert all(r["rouge_l"] == 1.0 for r in rejects if r["reason"] == "duplicate")
    rouge = report["rouge_l"]
    assert rouge["rejected"]["count"] == 7 and rouge["rejected"]["min"] == round(min(measured), 4)
    assert rouge["kept"]["count"] == 10 and rouge["kept"]["max"] < 0.3  # the novel ones share almost nothing
    assert sum(rouge["histogram"].values()) == 10 + len(rejects)
    print(f"planted near-duplicates: ROUGE-L {sorted(round(m, 3) for m in measured)}; kept max {rouge['kept']['max']}")

    # Instances: an instruction whose reply never has an output is reported, the others written.
    rows = read_jsonl(out)
    failed = read_jsonl(tmp_path / "self-instruct.failed.jsonl")
    assert len(rows) + len(failed) == 10 and all(f["stage"] == "instance" for f in failed)
    assert {f["instruction"] for f in failed} == {f["instruction"] for f in failed if digest(f["instruction"]) % 5 == 0}
    seed_ids = {json.loads(line)["id"]: n for n, line in enumerate(SEEDS.read_text().splitlines(), start=1)}
    for row in rows:
        instruction = row["messages"][0]["content"]
        assert instruction.startswith("Describe ") and row["messages"][1]["content"] == f"An answer to: {instruction}"
        p = row["provenance"]
        assert p["tool"] == "synth/self-instruct" and p["round"] in (0, 1)
        assert len(p["prompt_seeds"]) == 6 - 2 * p["round"]  # round 1 shows 2 generated instructions
        assert p["source"] == f"{SEEDS}:{seed_ids[p['prompt_seeds'][0]]}" and p["rouge_l"] < 0.7
    # A re-run replays the rounds from the cache: the same records, calls only for the failures.
    asked = len(server.requests)
    again = self_instruct([str(SEEDS)], out, server.backend(), options, cache=cache, progress=False, overwrite=True)
    assert [r["messages"] for r in read_jsonl(out)] == [r["messages"] for r in rows]
    assert len(server.requests) - asked == 3 * len(failed) == again.report["generator"]["calls"]


def dialogsum_script(calls: dict[str, int]):
    def script(body: dict) -> tuple[int, str]:
        document = user_text(body).split("Document:\n", 1)[1]
        calls[document] = calls.get(document, 0) + 1
        utterances = [line.split(": ", 1)[1] for line in document.splitlines() if ": " in line]
        if document.startswith("#Person1#: Do you believe in UFOs?"):
            return 200, "Sorry, I cannot help with that."  # never JSON: reported as failed
        if document.startswith("#Person1#: Did you go to school today?") and calls[document] == 1:
            return 200, "Let me think about good questions first."  # JSON only on the second try
        pairs = [
            {"question": f"In dialogue {digest(document) % 1000}, what does #Person1# say first?",
             "answer": utterances[0]},
            {"question": "What is said second?", "answer": utterances[1]},  # the same question everywhere
            {"question": "Which planets are mentioned?", "answer": "Neptune and Saturn"},  # not in any dialogue
        ]
        return 200, "```json\n" + json.dumps(pairs) + "\n```"

    return script


def test_qa_pairs_from_dialogsum(server: ScriptedServer, tmp_path: Path):
    documents = [json.loads(line)["dialogue"] for line in DIALOGSUM.read_text().splitlines()[:8]]
    assert sum(d.startswith("#Person1#: Do you believe in UFOs?") for d in documents) == 1
    assert sum(d.startswith("#Person1#: Did you go to school today?") for d in documents) == 1
    assert not any("neptune" in d.lower() for d in documents)
    calls: dict[str, int] = {}
    server.script = dialogsum_script(calls)
    out = tmp_path / "qa.jsonl"
    result = synth_qa([str(DIALOGSUM)], out, server.backend(), QAOptions(text_field="dialogue", limit=8),
                      cache=False, progress=False)
    report = result.report
    assert (report["documents"], report["failed"], report["written"]) == (8, 1, 7 + 1)
    assert report["rejected"] == {"duplicate question": 6, "answer not found in the document": 7}
    assert report["generator"]["garbage"] == 1 + 3 and len(server.requests) == 6 + 2 + 3
    rows = read_jsonl(out)
    failed = read_jsonl(tmp_path / "qa.failed.jsonl")
    assert len(failed) == 1 and failed[0]["source"].endswith(":" + str(1 + next(
        k for k, d in enumerate(documents) if d.startswith("#Person1#: Do you believe in UFOs?"))))
    assert "3 unusable replies; last: not a JSON array of {question, answer} objects" in failed[0]["error"]
    kept_docs = [d for d in documents if not d.startswith("#Person1#: Do you believe in UFOs?")]
    first = [r for r in rows if "say first" in r["messages"][0]["content"]]
    assert len(first) == 7
    for row, document in zip(first, kept_docs):
        user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        assert user.startswith(f"Read the document and answer the question.\n\nDocument:\n{document.strip()}\n\n")
        assert answer == document.splitlines()[0].split(": ", 1)[1]
        p = row["provenance"]
        assert p["tool"] == "synth/qa" and p["grounding"] == 1.0 and p["source"].startswith(f"{DIALOGSUM}:")
        assert row["id"] == f"{p['parent']}-qa0"
    rejects = read_jsonl(tmp_path / "qa.rejects.jsonl")
    assert all(r["grounding"] == 0.0 for r in rejects if r["reason"] == "answer not found in the document")


def test_reply_parsers():
    assert parse_qa_pairs('Sure!\n```json\n[{"question": "Q?", "answer": 42}, {"question": ""}]\n```') == [("Q?", "42")]
    assert parse_qa_pairs('{"pairs": [{"question": "A?", "answer": "b"}]}') == [("A?", "b")]
    with pytest.raises(GarbageReply, match="not a JSON array"):
        parse_qa_pairs('[{"q": "A?", "a": "b"}]')
    assert parse_instruction_list("Tasks:\n1. First task here\n2) Second one\nTask 3: Third\nnoise") == [
        "First task here", "Second one", "Third"]
    assert parse_instruction_list("- bullet task\n* another task") == ["bullet task", "another task"]
    with pytest.raises(GarbageReply):
        parse_instruction_list("\n  \n")
    assert parse_instance('{"input": "x", "output": "y"}') == ("x", "y")
    assert parse_instance("Input: <noinput>\nOutput: done") == ("", "done")
    assert parse_instance("Input: 3, 4\nOutput:\n7") == ("3, 4", "7")
    assert parse_instance("just an answer") == ("", "just an answer")
    with pytest.raises(GarbageReply, match="empty output"):
        parse_instance("Input: a\nOutput:   ")
    with pytest.raises(ConfigError, match="prompt_machine"):
        SelfInstructOptions(prompt_instructions=4, prompt_machine=4).check()
    with pytest.raises(ConfigError, match="limit"):
        QAOptions(limit=0).check()


def test_cli_synth_with_the_tiny_model(tiny_model: Path, tmp_path: Path, capsys):
    out = tmp_path / "si.jsonl"
    argv = ["data", "synth", str(SEEDS), "--out", str(out), "--method", "self-instruct", "--num-instructions", "3",
            "--requests-per-round", "2", "--max-rounds", "2", "--new-per-request", "4", "--backend",
            f"hf:{tiny_model}", "--max-tokens", "16", "--cache", str(tmp_path / "cache.jsonl")]
    code = main(argv)
    report = json.loads((tmp_path / "si.report.json").read_text())
    assert report["candidates"] == report["kept"] + sum(report["rejected"].values())
    assert report["rounds"] <= 2 and report["kept"] <= 3
    assert report["written"] + report["failed"] >= report["kept"]
    assert code == (0 if report["written"] else 1)
    for row in read_jsonl(out):
        p = row["provenance"]
        assert p["tool"] == "synth/self-instruct" and p["source"].startswith(f"{SEEDS}:")
        assert p["backend"] == f"hf:{tiny_model.resolve()}" and p["rouge_l"] < 0.7
    capsys.readouterr()

    qa_out = tmp_path / "qa.jsonl"
    code = main(["data", "synth", str(DIALOGSUM), "--out", str(qa_out), "--method", "qa", "--text-field", "dialogue",
                 "--limit", "2", "--backend", f"hf:{tiny_model}", "--max-tokens", "16", "--no-cache"])
    qa_report = json.loads((tmp_path / "qa.report.json").read_text())
    # A random model writes no JSON: each document is asked 3 times, then reported; nothing crashes.
    assert qa_report["documents"] == 2 and qa_report["written"] + qa_report["failed"] >= 1
    if qa_report["written"] == 0:
        assert code == 1 and "no records were generated" in capsys.readouterr().err
        assert all("not a JSON array" in f["error"] for f in read_jsonl(tmp_path / "qa.failed.jsonl"))
    # Options of the other method are refused.
    assert main(["data", "synth", str(SEEDS), "--out", str(out), "--method", "qa", "--num-instructions", "5",
                 "--backend", f"hf:{tiny_model}"]) == 2
    assert "--num-instructions: only for --method self-instruct" in capsys.readouterr().err
