"""Scale benchmark: ``tunelab data clean`` + tokenization of 100k generated records, cold and cached.

Generates N instruction records (seeded; words drawn from the shipped tiny corpus) with planted
exact duplicates, near duplicates (a few words changed), garbled answers and contact details,
then times, in one process with an empty cache:

1. ``clean_files`` (exact + MinHash near-dup removal, garbled filter, PII redaction) -> clean.jsonl
2. ``prepare_data`` on clean.jsonl: the training tokenization (chat template, labels), cached
3. both again: the second run must come from the caches, in under 10% of the first run's time.

Also reports how many planted duplicates were found. Appends a section to benchmarks/RESULTS.md.

    python benchmarks/data_clean.py [--records 100000] [--num-proc 2] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "src" / "tunelab" / "resources" / "tiny_corpus.txt"
TASKS = ["Explain", "Summarize", "Describe", "List the main points of", "Write a short note about",
         "Give an example of", "Compare", "What do you know about"]


def generate(path: Path, count: int, seed: int) -> dict[str, int]:
    """Write ``count`` conversation records to ``path``; returns how many of each planted kind."""
    rng = random.Random(seed)
    words = sorted({w.strip(".,;:!?\"'()").lower() for w in CORPUS.read_text().split()} - {""})
    planted = {"exact": 0, "near": 0, "garbled": 0, "pii": 0}
    records: list[dict] = []
    for _ in range(count):
        roll = rng.random()
        if records and roll < 0.05:  # an exact duplicate (case and spacing changed)
            original = rng.choice(records)
            record = {"messages": [{"role": m["role"], "content": "  " + m["content"].upper()}
                                   for m in original["messages"]]}
            planted["exact"] += 1
        elif records and roll < 0.10:  # a near duplicate: 3% of the answer's words replaced
            original = rng.choice(records)
            answer = original["messages"][1]["content"].split()
            for _ in range(max(1, len(answer) * 3 // 100)):
                answer[rng.randrange(len(answer))] = rng.choice(words)
            record = {"messages": [original["messages"][0], {"role": "assistant", "content": " ".join(answer)}]}
            planted["near"] += 1
        else:
            topic = " ".join(rng.choices(words, k=rng.randint(3, 8)))
            sentences = [" ".join(rng.choices(words, k=rng.randint(6, 16))).capitalize() + "."
                         for _ in range(rng.randint(3, 9))]
            answer = " ".join(sentences)
            if roll > 0.99:
                answer = answer.replace("e", "\u00c3\u00a9")  # mojibake
                planted["garbled"] += 1
            elif roll > 0.98:
                phone = f"+1 (555) {rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
                answer += f" Write to {rng.choice(words)}@example.com or call {phone}."
                planted["pii"] += 1
            record = {"messages": [{"role": "user", "content": f"{rng.choice(TASKS)} {topic}."},
                                   {"role": "assistant", "content": answer}]}
        records.append(record)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return planted


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(function, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, default=2, help="worker processes for the maps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tunelab-data-bench-"))
    os.environ["TUNELAB_CACHE"] = str(work / "cache")  # an empty cache: the first run is cold
    from tunelab.config import DataConfig
    from tunelab.datatools.quality import CleanOptions, clean_files
    from tunelab.data.tokenize import prepare_data
    from tunelab.models.load import load_tokenizer, stop_token_ids
    from tunelab.models.tiny import create_tiny_model

    data = work / "generated.jsonl"
    planted = generate(data, args.records, args.seed)
    model = create_tiny_model(work / "tiny", vocab=2000)
    tokenizer = load_tokenizer(str(model))
    stop_ids = stop_token_ids(str(model), tokenizer)
    options = CleanOptions(redact_pii=True)
    load_before = os.getloadavg()[0]

    runs = []
    for attempt in ("cold", "cached"):
        clean_s, report = timed(clean_files, [str(data)], work / "clean.jsonl", options, num_proc=args.num_proc,
                                overwrite=attempt == "cached")  # the cached run replaces the cold run's output
        config = DataConfig(train=[str(work / "clean.jsonl")], max_length=512, num_proc=args.num_proc)
        tokenize_s, tokenized = timed(prepare_data, config, "conversations", 0, tokenizer, stop_ids)
        runs.append({"attempt": attempt, "clean_s": clean_s, "tokenize_s": tokenize_s, "report": report,
                     "tokens": tokenized.train_report.tokens, "sequences": len(tokenized.train),
                     "tokenize_cached": tokenized.train_report.from_cache})
        print(f"{attempt}: clean {clean_s:.1f} s (from cache: {report.from_cache}), "
              f"tokenize {tokenize_s:.1f} s (from cache: {tokenized.train_report.from_cache})")
    load_after = os.getloadavg()[0]
    cold, warm = runs
    ratio = (warm["clean_s"] + warm["tokenize_s"]) / (cold["clean_s"] + cold["tokenize_s"])
    removed = cold["report"].removed
    duplicates = sum(n for reason, n in removed.items() if "duplicate" in reason)
    garbled = sum(n for reason, n in removed.items() if reason.startswith("garbled"))
    print(f"kept {cold['report'].kept:,} of {args.records:,}; removed {duplicates:,} duplicates "
          f"(planted {planted['exact'] + planted['near']:,}), {garbled:,} garbled (planted {planted['garbled']:,}); "
          f"redacted {cold['report'].redacted_records:,} records (planted {planted['pii']:,}); "
          f"second run {ratio:.1%} of the first")
    if args.no_write:
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    lines = [
        "", f"## data_clean — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC", "",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores; load average {load_before:.2f} before, "
        f"{load_after:.2f} after" + (" (other work shared the CPU during this run: the cold times are pessimistic)"
                                     if max(load_before, load_after) > 0.5 * (os.cpu_count() or 1) else ""),
        f"- command: `python benchmarks/data_clean.py --records {args.records} --num-proc {args.num_proc}` "
        f"(tunelab source {commit} + working tree)",
        f"- data: {args.records:,} generated conversation records ({data.stat().st_size / 1e6:.0f} MB JSONL) with "
        f"{planted['exact']:,} exact and {planted['near']:,} near duplicates, {planted['garbled']:,} garbled answers "
        f"and {planted['pii']:,} with an e-mail and a phone number planted",
        "- clean: exact + MinHash near-duplicate removal (threshold 0.8), garbled filter, PII redaction; "
        "tokenize: `prepare_data` (chatml, assistant labels, max_length 512) with a tiny BPE tokenizer (vocab 2,000); "
        "both in one process, the cache empty before the first run",
        "",
        "| run | clean s | tokenize s | total s | from cache |",
        "|---|---:|---:|---:|---|",
    ]
    for run in runs:
        lines.append(f"| {run['attempt']} | {run['clean_s']:.2f} | {run['tokenize_s']:.2f} | "
                     f"{run['clean_s'] + run['tokenize_s']:.2f} | clean {run['report'].from_cache}, "
                     f"tokenize {run['tokenize_cached']} |")
    lines += [
        "",
        f"- kept {cold['report'].kept:,} records; removed {duplicates:,} duplicates (planted "
        f"{planted['exact'] + planted['near']:,}) and {garbled:,} garbled (planted {planted['garbled']:,}); "
        f"(a copy of a garbled record counts as garbled); redacted {cold['report'].redacted_records:,} records "
        f"(planted {planted['pii']:,}, and copies of them); {cold['tokens']:,} tokens in "
        f"{cold['sequences']:,} sequences",
        f"- second run: {ratio:.1%} of the first (goal < 10%: {'met' if ratio < 0.10 else 'NOT met'})",
    ]
    with open(REPO / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
