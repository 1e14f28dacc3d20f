"""tunelab data clean and data stats: dedup quality on planted duplicates, filters, PII, language, cache, stats."""

from __future__ import annotations

import copy
import gzip
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import ALPACA_DEMO, SHARED_DATA, read_jsonl
from tunelab.cli import main
from tunelab.data.readers import read_canonical
from tunelab.datatools.quality import (
    CleanOptions,
    _Features,
    clean_files,
    clean_records,
    dedup_text,
    garbled_reason,
    lsh_bands,
    normalize,
    record_parts,
    redact_pii,
    shingle_hashes,
)
from tunelab.datatools.stats import histogram, stats_files, terminal_sketch
from tunelab.errors import TunelabError

HH_RLHF = SHARED_DATA / "hh_rlhf" / "harmless-base-test.jsonl.gz"
DIALOGSUM = SHARED_DATA / "summarization" / "dialogsum" / "dialogsum.dev.jsonl"
MULTI30K = SHARED_DATA / "translation" / "multi30k"
FILLER = "apple river quickly green seven under window music planet silver".split()


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def jaccard(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The true Jaccard similarity of two records' shingle sets (what MinHash estimates)."""
    x, y = (set(shingle_hashes(normalize(dedup_text(record_parts(r), "all"))).tolist()) for r in (a, b))
    return len(x & y) / len(x | y)


def exact_copy(record: dict[str, Any]) -> dict[str, Any]:
    """Equal after normalisation: case and whitespace changed."""
    copied = copy.deepcopy(record)
    for message in copied["messages"]:
        message["content"] = "  " + message["content"].upper().replace(" ", "  ") + "\n"
    return copied


def near_copy(record: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """A light edit: 2-6% of the answer's words replaced, the final punctuation changed."""
    copied = copy.deepcopy(record)
    answer = copied["messages"][-1]
    words = answer["content"].split(" ")
    for _ in range(max(1, round(rng.uniform(0.02, 0.06) * len(words)))):
        words[rng.randrange(len(words))] = rng.choice(FILLER)
    answer["content"] = " ".join(words).rstrip(".!") + "!"
    return copied


@pytest.fixture(scope="module")
def distinct_records(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """400 Alpaca records and 200 DialogSum summarization records built from shared templates.

    The DialogSum records are hard negatives: same system prompt and template phrasings, other
    dialogues. The two natural duplicates of this set are removed first, so every duplicate in
    the planted set is a planted one.
    """
    from tunelab.datatools.builders import build_files

    built = tmp_path_factory.mktemp("built") / "summaries.jsonl"
    build_files([str(DIALOGSUM)], built, "summarization", limit=200)
    alpaca = [r.data for r in read_canonical([str(ALPACA_DEMO)]).records[:400]]
    dialogues = [{"messages": r["messages"]} for r in read_jsonl(built)]
    records = alpaca + dialogues
    result = clean_records(records, [f"base:{i}" for i in range(len(records))])
    assert len(result.removed) == 2  # alpaca_en_demo has one exact and one near duplicate in its first 400
    return result.kept


def test_dedup_precision_and_recall_on_planted_duplicates(distinct_records: list[dict[str, Any]]) -> None:
    rng = random.Random(0)
    long_enough = [i for i, r in enumerate(distinct_records) if len(dedup_text(record_parts(r), "all")) >= 300]
    exact_of = rng.sample(range(len(distinct_records)), 60)
    near_of = rng.sample(long_enough, 60)
    planted = [exact_copy(distinct_records[i]) for i in exact_of]
    planted += [near_copy(distinct_records[i], rng) for i in near_of]
    similarities = [jaccard(copy_, distinct_records[i]) for copy_, i in zip(planted[60:], near_of)]
    order = list(range(len(planted)))
    rng.shuffle(order)
    records = distinct_records + [planted[i] for i in order]
    sources = [f"base:{i}" for i in range(len(distinct_records))] + [f"planted:{i}" for i in order]

    result = clean_records(records, sources)
    removed = {r["source"] for r in result.removed}
    planted_sources = {s for s in sources if s.startswith("planted:")}
    true_positives = len(removed & planted_sources)
    precision, recall = true_positives / len(removed), true_positives / len(planted_sources)
    near_recall = len(removed & {f"planted:{i}" for i in range(60, 120)}) / 60
    print(f"\ndedup on {len(records)} records with 60 exact + 60 near planted duplicates "
          f"(near-duplicate Jaccard {min(similarities):.2f}-{max(similarities):.2f}, median "
          f"{np.median(similarities):.2f}): precision {precision:.3f}, recall {recall:.3f} "
          f"(near duplicates {near_recall:.3f})")
    assert precision >= 0.95 and recall >= 0.95
    by_reason = {r["source"]: r for r in result.removed}
    for index, original in zip(range(60), exact_of):
        entry = by_reason[f"planted:{index}"]
        assert entry["reason"].startswith("exact duplicate") and entry["duplicate_of"] == f"base:{original}"
    assert all(by_reason[f"planted:{i}"]["duplicate_of"] == f"base:{near_of[i - 60]}"
               for i in range(60, 120) if f"planted:{i}" in by_reason)


def test_lsh_bands_catch_pairs_at_the_threshold() -> None:
    for threshold in (0.7, 0.8, 0.9):
        bands, rows = lsh_bands(threshold, 128)
        assert bands * rows <= 128
        assert 1 - (1 - threshold**rows) ** bands >= 0.98  # a pair at the threshold is a candidate
        assert 1 - (1 - 0.3**rows) ** bands < 0.1  # unrelated texts rarely are


def test_garbled_empty_and_length_filters(tmp_path: Path) -> None:
    def conversation(user: str, answer: str) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}

    records = [
        conversation("What is the capital of France?", "Paris is the capital of France."),
        conversation("Say something.", "Caf\u00c3\u00a9 au lait is na\u00c3\u00afve."),  # mojibake
        conversation("Describe a cat.", "A cat is a small \ufffd\ufffd animal."),
        conversation("Tell a story.", "Once upon a time " * 12),
        conversation("Draw a line.", "=== ### *** --- +++ ||| ~~~ ^^^ %%%"),
        conversation("Name a colour.", "Red"),
        conversation(" ".join(f"Fact {i} is {i * 7}." for i in range(30)), "Noted."),  # 121 words
        {"text": "   "},
    ]
    sources = [f"r:{i}" for i in range(len(records))]
    options = CleanOptions(min_length=5, max_length=100, near_dedup=False)
    result = clean_records(records, sources, options)
    reasons = {r["source"]: r["reason"] for r in result.removed}
    assert [r["messages"][0]["content"] for r in result.kept if "messages" in r] == ["What is the capital of France?"]
    assert reasons["r:1"].startswith("garbled: mojibake")
    assert reasons["r:2"].startswith("garbled: contains U+FFFD")
    assert reasons["r:3"].startswith("garbled: repeats itself")
    assert reasons["r:4"].startswith("garbled: mostly symbols")
    assert reasons["r:5"] == "shorter than --min-length 5 words"
    assert reasons["r:6"] == "longer than --max-length 100 words"
    assert reasons["r:7"] == "empty answer"
    assert garbled_reason("The quick brown fox jumps over the lazy dog.") is None
    assert garbled_reason("Der schnelle braune Fuchs springt über den faulen Hund. 日本語のテキストです。") is None
    with pytest.raises(TunelabError, match="--length-unit tokens needs --tokenizer"):
        CleanOptions(length_unit="tokens").check()


def test_length_in_tokens_uses_the_tokenizer(tiny_model: Path, tokenizer) -> None:
    records = [r.data for r in read_canonical([str(ALPACA_DEMO)]).records[:50]]
    sources = [f"a:{i}" for i in range(50)]
    options = CleanOptions(max_length=120, length_unit="tokens", tokenizer=str(tiny_model), near_dedup=False)
    result = clean_records(records, sources, options)
    lengths = [len(tokenizer("\n".join(m["content"] for m in r["messages"]), add_special_tokens=False)["input_ids"])
               for r in records]
    assert len(result.kept) == sum(length <= 120 for length in lengths) > 0
    assert len(result.removed) == sum(length > 120 for length in lengths) > 0


def test_pii_redaction_and_its_provenance(tmp_path: Path) -> None:
    text, emails, phones = redact_pii(
        "Write to jane.doe+news@mail.example.org or call +1 (555) 123-4567, 555.123.4567 or +44 20 7946 0958. "
        "Not phones: 2023-01-15, $1,234.56, 16 - 3 - 4 = 9, ISBN 978-3-16-148410-0, call 911."
    )
    assert (emails, phones) == (1, 3)
    assert text.startswith("Write to [EMAIL] or call [PHONE], [PHONE] or [PHONE]. Not phones: 2023-01-15, $1,234.56, "
                           "16 - 3 - 4 = 9, ISBN 978-3-16-148410-0, call 911.")
    data = write_jsonl(tmp_path / "contacts.jsonl", [
        {"instruction": "How do I reach support?", "output": "Mail help@tunelab.dev or phone (555) 010-9999."},
        {"instruction": "What is 2+2?", "output": "4, since 2 + 2 = 4."},
    ])
    out = tmp_path / "clean.jsonl"
    report = clean_files([str(data)], out, CleanOptions(redact_pii=True), use_cache=False)
    assert (report.emails_redacted, report.phones_redacted, report.redacted_records) == (1, 1, 1)
    first, second = read_jsonl(out)
    assert first["messages"][1]["content"] == "Mail [EMAIL] or phone [PHONE]."
    assert first["provenance"]["tool"] == "clean/redact-pii" and first["provenance"]["source"] == f"{data}:1"
    assert "provenance" not in second  # untouched records are not re-stamped


def test_language_filter_on_multi30k(tmp_path: Path) -> None:
    def lines(name: str) -> list[str]:
        return gzip.decompress((MULTI30K / name).read_bytes()).decode().splitlines()[:150]

    english, german = lines("val.en.gz"), lines("val.de.gz")
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("\n".join(line for pair in zip(english, german) for line in pair) + "\n")
    out = tmp_path / "english.jsonl"
    report = clean_files([str(mixed)], out, CleanOptions(languages=("en",), near_dedup=False, exact_dedup=False),
                         use_cache=False)
    kept = {row["text"] for row in read_jsonl(out)}
    accuracy = (len(kept & set(english)) + len(set(german) - kept)) / 300
    print(f"\nlanguage filter on 150 English + 150 German Multi30k captions: accuracy {accuracy:.3f}")
    assert accuracy >= 0.95 and report.kept == len(kept)
    assert any(reason.startswith("language is de, not en") for reason in report.removed)


def test_clean_files_cache_and_rejects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    records = [r.data for r in read_canonical([str(ALPACA_DEMO)]).records[:200]]
    rng = random.Random(1)
    data = write_jsonl(tmp_path / "data.jsonl", records + [exact_copy(records[3]), near_copy(records[10], rng)]
                       + ["not an object"])
    out = tmp_path / "clean.jsonl"
    first = clean_files([str(data)], out)
    assert (first.read, first.kept, first.from_cache) == (203, 200, False)
    assert sum(first.removed.values()) == 2 and sum(first.unreadable.values()) == 1
    rejects = read_jsonl(tmp_path / "clean.rejects.jsonl")
    assert [r["source"].rsplit(":", 1)[1] for r in rejects] == ["201", "202", "203"]
    assert rejects[0]["duplicate_of"] == f"{data}:4" and rejects[1]["duplicate_of"] == f"{data}:11"
    assert rejects[2]["reason"].startswith("unreadable: ")
    output = out.read_bytes()
    workers = clean_files([str(data)], tmp_path / "two_workers.jsonl", num_proc=2, use_cache=False)
    assert workers.removed == first.removed and (tmp_path / "two_workers.jsonl").read_bytes() == output

    def must_not_run(self, batch):  # the second run must not recompute features
        raise AssertionError("features recomputed")

    monkeypatch.setattr(_Features, "__call__", must_not_run)
    out.unlink()
    second = clean_files([str(data)], out, overwrite=True)
    assert second.from_cache and out.read_bytes() == output and second.removed == first.removed
    looser = clean_files([str(data)], tmp_path / "looser.jsonl", CleanOptions(near_dup_threshold=0.5))
    assert not looser.from_cache and looser.kept <= first.kept  # new threshold, features from the cache


def test_clean_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dpo = SHARED_DATA / "llamafactory_demo" / "dpo_en_demo.json"
    out = tmp_path / "dpo.jsonl"
    assert main(["data", "clean", str(dpo), "--out", str(out), "--redact-pii", "--max-length", "400"]) == 0
    printed = capsys.readouterr().out
    pairs = read_jsonl(out)
    longer = sum(1 for line in printed.splitlines() if "longer than --max-length 400 words" in line)
    assert f"wrote {len(pairs)} records" in printed and longer == 1
    assert 0 < len(pairs) < 300 and all({"prompt", "chosen", "rejected"} <= set(pair) for pair in pairs)
    rejects = read_jsonl(tmp_path / "dpo.rejects.jsonl")
    assert len(pairs) + len(rejects) == 300
    assert main(["data", "clean", str(ALPACA_DEMO), "--out", str(out), "--near-dup-threshold", "1.5"]) == 2
    assert "--near-dup-threshold 1.5: must be in (0, 1]" in capsys.readouterr().err


# --- stats ---------------------------------------------------------------------------------------


def test_stats_tokens_histogram_png_and_formats(tmp_path: Path, tiny_model: Path, tokenizer) -> None:
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", json.loads(ALPACA_DEMO.read_text())[:300])
    report, sketch = stats_files([str(alpaca)], tmp_path / "report", tokenizer=str(tiny_model),
                                 max_length=256, bins=12)
    records = [r.data for r in read_canonical([str(alpaca)]).records]
    expected = np.array([len(tokenizer(tokenizer.apply_chat_template(r["messages"], tokenize=False),
                                       add_special_tokens=False)["input_ids"]) for r in records])
    assert report.records == 300 and report.unit == "tokens"
    assert report.lengths["max"] == expected.max() and report.lengths["p50"] == np.percentile(expected, 50)
    assert report.over_max_length == int((expected > 256).sum())
    assert sum(report.histogram["counts"]) == 300 and len(report.histogram["counts"]) <= 12
    assert report.layouts == {str(alpaca): {"conversation: alpaca": 300}}
    assert report.roles == {"user": 300, "assistant": 300}
    saved = json.loads((tmp_path / "report" / "stats.json").read_text())
    assert saved["lengths"] == report.lengths
    png = (tmp_path / "report" / "token_lengths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert sketch.count("\n") + 1 == len(report.histogram["counts"]) and "█" in sketch
    assert sketch in (tmp_path / "report" / "report.md").read_text()
    again, _ = stats_files([str(alpaca)], tmp_path / "again", tokenizer=str(tiny_model), max_length=256, bins=12)
    assert again.lengths == report.lengths


def test_stats_preferences_in_words_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "stats", str(HH_RLHF), "--out", str(tmp_path / "hh"), "--bins", "8"]) == 0
    printed = capsys.readouterr().out
    assert "2,299 preference records (of 2,312 read)" in printed  # 13 unusable: 4 empty, 9 with roles out of order
    assert "preference: HH-RLHF transcripts 2,299" in printed and "length in words" in printed
    saved = json.loads((tmp_path / "hh" / "stats.json").read_text())
    assert saved["kind"] == "preference" and saved["skipped"]["'chosen' is empty"] == 4
    assert sum(saved["skipped"].values()) == 13


def test_histogram_edges_and_sketch() -> None:
    counts, edges = histogram(np.array([1, 2, 2, 9, 10]), bins=5)
    assert counts == [3, 0, 0, 2] and edges == [0, 3, 6, 9, 12]  # whole-number bins of width 3 up to the max
    sketch = terminal_sketch([1, 4, 0], [0, 10, 20, 30], "tokens", width=8)
    assert sketch.splitlines() == [" 0–9  tokens │██ 1", "10–19 tokens │████████ 4", "20–29 tokens │ 0"]
