"""Synthetic instruction data from a generation backend: ``tunelab data synth``.

Two methods:

- **qa** (:func:`synth_qa`): question-answer pairs from context documents. The backend is asked
  for a JSON array of ``{question, answer}`` per document (a reply that is not one is asked
  again, then reported as failed). Pairs whose answer is not grounded in the document (too few of
  its content words occur there) and repeated questions are rejected. Each kept pair becomes a
  conversation: the document and the question, then the answer (or, with ``context="omit"``,
  the question alone).
- **self-instruct** (:func:`self_instruct`, Wang et al. 2023): from seed tasks, rounds of new
  instructions, each prompt showing instructions sampled from the seeds and from those already
  kept. A candidate is kept only if it passes the paper's filters: 3 < words <= 150, none of the
  blacklisted keywords (image, graph, picture, file, map, draw, plot, go to, video, audio, music,
  flowchart, diagram), not starting with punctuation, not an exact duplicate, and ROUGE-L below
  0.7 against *every* instruction kept so far (seeds included). Then one instance (an optional
  input and an output) is generated for each kept instruction.

The ROUGE-L of every candidate against its closest kept instruction is measured and reported
(kept and rejected, with a histogram) in ``<stem>.report.json``; rejected candidates with their
reason, ROUGE-L and closest instruction are listed in ``<stem>.rejects.jsonl``; requests that
gave no usable reply in ``<stem>.failed.jsonl``. Every record written carries ``id`` and
``provenance`` (source ``file:line``, parent id, backend, seed, round, the prompt's seeds).
"""

from __future__ import annotations

import json
import random
import re
import statistics
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rouge_score import rouge_scorer, tokenizers

from tunelab.data.files import read_rows
from tunelab.datatools.generation_jobs import (
    BackendSpec,
    SourceItem,
    claim_generation_outputs,
    load_backend,
    content_id,
    make_generator,
    read_sources,
    write_report,
    write_side_file,
)
from tunelab.datatools.jsonl_output import provenance, write_jsonl
from tunelab.data.records import LoadReport
from tunelab.errors import ConfigError, DataError
from tunelab.failures import failure_reasons, reason_lines
from tunelab.generation.backends import GenerationBackend, Sampling
from tunelab.generation.runner import GarbageReply, Generator

METHODS = ("qa", "self-instruct")
OUTPUT_SUFFIXES = ("report.json", "failed.jsonl", "rejects.jsonl")
"""The files a synth job writes beside ``--out`` (claimed with it, before the backend loads)."""
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```[\w-]*\n(.*?)\n?```", re.DOTALL)
_WORD = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset(
    "a an the and or but of to in on at by for with from as is are was were be been being it its this that these "
    "those he she they we you i his her their our your my me him them us not no yes do does did so if then than "
    "there here what which who whom whose when where why how can could would should will shall may might must".split()
)


# -- parsing replies ------------------------------------------------------------------------------


def _json_candidates(text: str) -> Iterable[Any]:
    """JSON values a reply may hold: the whole text, a fenced block, the outermost [...] or {...}."""
    text = _THINK.sub("", text).strip()
    fenced = _FENCE.search(text)
    pieces = [text] + ([fenced.group(1)] if fenced else [])
    for opening, closing in (("[", "]"), ("{", "}")):
        start, end = text.find(opening), text.rfind(closing)
        if 0 <= start < end:
            pieces.append(text[start : end + 1])
    for piece in pieces:
        try:
            yield json.loads(piece)
        except ValueError:
            continue


def parse_qa_pairs(reply: str) -> list[tuple[str, str]]:
    """The ``(question, answer)`` pairs of a reply holding a JSON array of ``{question, answer}``
    (also accepted: an object holding such an array, numbers as answers).

    Raises:
        GarbageReply: no such array, or no item with a non-empty question and answer.
    """
    for value in _json_candidates(reply):
        if isinstance(value, dict):
            value = next((v for v in value.values() if isinstance(v, list)), None)
        if not isinstance(value, list):
            continue
        pairs = []
        for item in value:
            if not isinstance(item, dict):
                continue
            question, answer = item.get("question"), item.get("answer")
            if isinstance(answer, int | float) and not isinstance(answer, bool):
                answer = str(answer)
            if isinstance(question, str) and isinstance(answer, str) and question.strip() and answer.strip():
                pairs.append((question.strip(), answer.strip()))
        if pairs:
            return pairs
    raise GarbageReply("not a JSON array of {question, answer} objects")


def parse_instruction_list(reply: str) -> list[str]:
    """The tasks of a reply listing them one per line: numbered lines (``1.``, ``2)``, ``Task 3:``)
    when there are any, else bulleted or plain lines.

    Raises:
        GarbageReply: no task in the reply.
    """
    lines = [line.strip() for line in _THINK.sub("", reply).splitlines() if line.strip()]
    numbered = [m.group(1).strip() for line in lines
                if (m := re.match(r"^(?:\*\*)?(?:task\s*)?\d+\s*[.):]\s*(?:\*\*)?\s*(.+)$", line, re.IGNORECASE))]
    tasks = numbered or [re.sub(r"^[-*\u2022]\s+", "", line) for line in lines if not line.endswith(":")]
    tasks = [task.strip().strip("*").strip() for task in tasks]
    tasks = [task for task in tasks if task]
    if not tasks:
        raise GarbageReply("no task in the reply")
    return tasks


def parse_instance(reply: str) -> tuple[str, str]:
    """``(input, output)`` of an instance reply: a JSON object with ``output`` (and ``input``),
    ``Input: ... Output: ...`` labels, or the whole reply as the output. ``<noinput>`` (or
    "none") means no input.

    Raises:
        GarbageReply: an empty output.
    """
    text = _THINK.sub("", reply).strip()
    for value in _json_candidates(text):
        if isinstance(value, dict) and isinstance(value.get("output"), str):
            extra = value.get("input")
            return _no_input(extra if isinstance(extra, str) else ""), _nonempty(value["output"])
    match = re.search(r"(?:^|\n)\s*output\s*:\s*(.*)$", text, re.IGNORECASE | re.DOTALL)
    if match:
        before = text[: match.start()]
        given = re.search(r"(?:^|\n)\s*input\s*:\s*(.*)$", before, re.IGNORECASE | re.DOTALL)
        return _no_input(given.group(1) if given else ""), _nonempty(match.group(1))
    return "", _nonempty(text)


def _no_input(text: str) -> str:
    text = text.strip()
    return "" if text.lower().strip("<>.()[] ") in ("", "noinput", "no input", "none", "n/a", "empty") else text


def _nonempty(text: str) -> str:
    if not text.strip():
        raise GarbageReply("empty output")
    return text.strip()


# -- QA pairs from documents ----------------------------------------------------------------------

QA_SYSTEM = "You write question-answer pairs for a reading-comprehension data set. Reply with JSON only."
QA_PROMPT = (
    "Write {n} diverse questions that the document below answers, each with a short answer taken from the "
    "document. Reply with a JSON array of objects with the keys \"question\" and \"answer\".\n\n"
    "Document:\n{document}"
)
QA_RECORD = "Read the document and answer the question.\n\nDocument:\n{document}\n\nQuestion: {question}"


def grounding(answer: str, document: str) -> float:
    """The share of the answer's content words (lowercase, stopwords left out) found in the document;
    1.0 for an answer without content words ("yes", "no")."""
    words = [w for w in _WORD.findall(answer.lower()) if w not in _STOPWORDS]
    if not words:
        return 1.0
    present = set(_WORD.findall(document.lower()))
    return sum(w in present for w in words) / len(words)


@dataclass
class QAOptions:
    """What :func:`synth_qa` makes.

    Attributes:
        pairs_per_document: questions asked for per document.
        text_field: the field holding the document in each input record (``dialogue`` for
            DialogSum); records are read as text.
        max_document_chars: longer documents are cut to this many characters (and the record
            uses the cut document, so the answer stays in what the model saw).
        min_document_chars: shorter documents are skipped (counted).
        min_grounding: the least share of an answer's content words that must occur in the
            document.
        context: ``include`` the document in each record's user message, or ``omit`` it.
        sampling: temperature, top_p, max_tokens and seed.
        limit: use only the first this many documents.
    """

    pairs_per_document: int = 3
    text_field: str = "text"
    max_document_chars: int = 6000
    min_document_chars: int = 50
    min_grounding: float = 0.5
    context: Literal["include", "omit"] = "include"
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.7, max_tokens=1024))
    limit: int | None = None

    def check(self) -> None:
        """Raise :class:`ConfigError` for values out of range."""
        too_small = min(self.pairs_per_document, self.max_document_chars, 1 if self.limit is None else self.limit) < 1
        if too_small or not 0 <= self.min_grounding <= 1:
            raise ConfigError("synth qa: pairs per document, max document chars and limit must be >= 1, "
                              "min grounding between 0 and 1")
        if self.context not in ("include", "omit"):
            raise ConfigError(f"synth qa: context must be include or omit, not {self.context!r}")


@dataclass
class SynthResult:
    """What a synth job wrote and its report (also in ``<stem>.report.json``)."""

    out: Path
    written: int
    report: dict[str, Any]
    report_path: Path
    failed_path: Path | None
    rejects_path: Path | None

    def summary(self) -> str:
        """A few lines for the terminal."""
        r = self.report
        lines = [f"wrote {self.written} records to {self.out}"]
        if r.get("rejected"):
            lines.append("rejected: " + ", ".join(f"{n} {why}" for why, n in r["rejected"].items())
                         + (f" (see {self.rejects_path})" if self.rejects_path else ""))
        rouge = r.get("rouge_l")
        if rouge and rouge["kept"]["count"]:
            kept, refused = rouge["kept"], rouge["rejected"]
            line = (f"ROUGE-L against the closest earlier instruction: kept {kept['count']}, "
                    f"mean {kept['mean']}, max {kept['max']}")
            if refused["count"]:
                line += f"; rejected at >= {rouge['threshold']}: {refused['count']}, lowest {refused['min']}"
            lines.append(line)
        if r["failed"]:
            lines.append(f"{r['failed']} requests failed after retries: see {self.failed_path}")
            lines += reason_lines(r["failure_reasons"])
        g = r["generator"]
        lines.append(f"backend {r['backend']}: {g['calls']} calls, {g['cached']} from the cache, "
                     f"{g['garbage']} unusable replies asked again; report {self.report_path}")
        return "\n".join(lines)


def synth_qa(
    files: Iterable[str],
    out: str | Path,
    backend: GenerationBackend | BackendSpec,
    options: QAOptions | None = None,
    cache: str | Path | None | Literal[False] = None,
    attempts: int = 3,
    progress: bool = True,
    overwrite: bool = False,
) -> SynthResult:
    """Question-answer pairs from the documents in ``files``, written as conversations to ``out``.

    Args:
        files: documents (text records, or any records with ``options.text_field``).
        out: the output JSONL; the report, failures and rejects go beside it.
        backend: the model that writes the pairs, or a :class:`BackendSpec` naming it.
        options: what to make.
        cache: the reply cache file (None: the default one for the backend; False: none).
        attempts: replies asked for per document when they come back unusable.
        progress: show progress bars.
        overwrite: replace the outputs of an earlier run.

    The options are checked first, then a missing input is named and ``out`` and the files beside
    it are claimed (existing ones refused unless ``overwrite``, an input always), then the backend
    loads and the work starts.

    Raises:
        ConfigError: bad options. DataError: missing or unreadable inputs, or no usable document.
        OutputError: an output exists (without ``overwrite``) or is an input.
    """
    options = options or QAOptions()
    options.check()
    files = list(files)
    claim_generation_outputs(files, out, OUTPUT_SUFFIXES, overwrite)
    backend = load_backend(backend)
    started = time.monotonic()
    items, load_report = read_sources(files, ("text",), "text", options.text_field, "synth qa", options.limit)
    documents: list[tuple[SourceItem, str]] = []
    too_short = 0
    for item in items:
        text = item.data["text"].strip()
        if len(text) < options.min_document_chars:
            too_short += 1
            continue
        documents.append((item, text[: options.max_document_chars]))
    if not documents:
        raise DataError(f"{', '.join(files)}: no document of at least {options.min_document_chars} characters")
    generator = make_generator(backend, cache, attempts, progress, "writing QA pairs")
    requests = [[{"role": "system", "content": QA_SYSTEM},
                 {"role": "user", "content": QA_PROMPT.format(n=options.pairs_per_document, document=document)}]
                for _, document in documents]
    results = generator.generate(requests, options.sampling, parse_qa_pairs)
    rows, rejects, failed = [], [], []
    rejected: Counter[str] = Counter()
    seen: set[str] = set()
    for (item, document), result in zip(documents, results):
        if not result.ok:
            failed.append({"parent": item.id, "source": item.source, "stage": "qa", "error": result.error})
            continue
        for index, (question, answer) in enumerate(result.value or []):
            score = grounding(answer, document)
            key = _normalised(question)
            reason = None
            if key in seen:
                reason = "duplicate question"
            elif score < options.min_grounding:
                reason = "answer not found in the document"
            if reason is not None:
                rejected[reason] += 1
                rejects.append({"parent": item.id, "source": item.source, "question": question, "answer": answer,
                                "reason": reason, "grounding": round(score, 3)})
                continue
            seen.add(key)
            user = QA_RECORD.format(document=document, question=question) if options.context == "include" else question
            rows.append({
                "id": f"{item.id}-qa{index}",
                "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                "provenance": provenance("synth/qa", item.source, parent=item.id, pair=index, backend=backend.name,
                                         temperature=options.sampling.temperature, seed=options.sampling.seed,
                                         grounding=round(score, 3), context=options.context),
            })
    written = write_jsonl(out, rows)
    report = {
        "tool": "synth", "method": "qa", "inputs": files, "output": str(out), "backend": backend.name,
        "sampling": options.sampling.as_dict(), "read": load_report.read, "skipped": dict(load_report.skipped),
        "documents": len(documents), "documents_too_short": too_short, "pairs_per_document": options.pairs_per_document,
        "pairs_generated": len(rows) + sum(rejected.values()), "rejected": dict(rejected), "written": written,
        "failed": len(failed), "failure_reasons": failure_reasons(row["error"] for row in failed),
        "generator": generator.stats.as_dict(),
        "cache": str(generator.cache.path) if generator.cache.path else None,
        "seconds": round(time.monotonic() - started, 2),
    }
    return SynthResult(Path(out), written, report, write_report(out, report),
                       write_side_file(out, "failed.jsonl", failed), write_side_file(out, "rejects.jsonl", rejects))


# -- self-instruct --------------------------------------------------------------------------------

INSTRUCTIONS_SYSTEM = "You write diverse task instructions for training a helpful text-only assistant."
INSTRUCTIONS_PROMPT = (
    "Here are some example tasks:\n{examples}\n\n"
    "Come up with {n} new tasks that differ from these and from each other: vary the topic, the kind of task "
    "(open questions, classification, rewriting, extraction, brainstorming, reasoning, ...) and the wording. "
    "A text-only assistant must be able to do each one. Reply with a numbered list, one task per line, and "
    "nothing else."
)
INSTANCE_SYSTEM = "You write one worked example of a task for a training data set."
INSTANCE_PROMPT = (
    "Task: {instruction}\n\n"
    "Write one example of this task. If it needs an input (a text to work on, a list, a question, ...), write it "
    "after \"Input:\"; otherwise write \"Input: <noinput>\". Then write an excellent response after \"Output:\"."
)


@dataclass
class Seed:
    """A seed task: its instruction, id and where it came from."""

    instruction: str
    id: str
    source: str


def read_seed_tasks(files: Iterable[str], limit: int | None = None) -> tuple[list[Seed], LoadReport]:
    """Seed instructions from self-instruct seed files (``instruction`` + ``instances``), alpaca
    records (``instruction``), or conversations (the first user message); bad rows are counted.
    With ``limit``, only the first this many seeds are kept.

    Raises:
        DataError: no usable seed.
    """
    files = list(files)
    seeds: list[Seed] = []
    report = LoadReport()
    for name in files:
        for row in read_rows(name):
            if limit is not None and len(seeds) >= limit:
                break
            report.read += 1
            data = row.data
            instruction = None
            if row.error is None and isinstance(data, dict):
                instruction = data.get("instruction")
                if instruction is None and isinstance(data.get("messages"), list):
                    instruction = next((m.get("content") for m in data["messages"]
                                        if isinstance(m, dict) and m.get("role") == "user"), None)
            if not isinstance(instruction, str) or not instruction.strip():
                report.skip(row.error or "no instruction (expected 'instruction' or a user message)", row.source)
                continue
            own_id = data.get("id")
            seeds.append(Seed(instruction.strip(), str(own_id) if own_id else content_id(instruction), row.source))
    report.kept = len(seeds)
    if not seeds:
        detail = f"\n{report.summary()}" if report.skipped else ""
        raise DataError(f"{', '.join(files)}: no seed task with an instruction{detail}")
    return seeds, report


@dataclass
class SelfInstructOptions:
    """What :func:`self_instruct` makes (defaults follow the paper where it gives one).

    Attributes:
        num_instructions: new instructions to keep (the job stops when it has them).
        prompt_instructions: example instructions shown in each prompt.
        prompt_machine: how many of those come from the instructions generated so far (the
            rest are seeds).
        new_per_request: new tasks asked for per prompt.
        requests_per_round: prompts per round (sent concurrently); kept instructions of a round
            join the pool the next round samples from.
        max_rounds: stop after this many rounds (None: until the target, or ``patience`` rounds
            in a row keep nothing new).
        patience: rounds in a row without a new instruction before the job gives up.
        rouge_threshold: a candidate with ROUGE-L at or above this against any kept instruction
            is rejected.
        min_words, max_words: a kept instruction has more than ``min_words`` and at most
            ``max_words`` words.
        blacklist: keywords (whole words, case-insensitive) that reject an instruction.
        sampling: sampling of the instruction prompts (the paper: temperature 0.7, top_p 0.5).
        instance_sampling: sampling of the instances (the paper: greedy).
        limit: use only the first this many seed tasks.
    """

    num_instructions: int = 100
    prompt_instructions: int = 8
    prompt_machine: int = 2
    new_per_request: int = 8
    requests_per_round: int = 8
    max_rounds: int | None = None
    patience: int = 3
    rouge_threshold: float = 0.7
    min_words: int = 3
    max_words: int = 150
    blacklist: tuple[str, ...] = BLACKLIST
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.7, top_p=0.5, max_tokens=1024))
    instance_sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.0, max_tokens=1024))
    limit: int | None = None

    def check(self) -> None:
        """Raise :class:`ConfigError` for values out of range."""
        if min(self.num_instructions, self.prompt_instructions, self.new_per_request, self.requests_per_round,
               self.patience, 1 if self.limit is None else self.limit) < 1:
            raise ConfigError("synth self-instruct: counts (instructions, prompt instructions, new per request, "
                              "requests per round, patience, limit) must be at least 1")
        if not 0 <= self.prompt_machine < self.prompt_instructions:
            raise ConfigError("synth self-instruct: prompt_machine must be at least 0 and below prompt_instructions "
                              "(every prompt shows at least one seed task)")
        if not 0 < self.rouge_threshold <= 1:
            raise ConfigError("synth self-instruct: the ROUGE-L threshold must be in (0, 1]")
        if self.max_rounds is not None and self.max_rounds < 1:
            raise ConfigError("synth self-instruct: max_rounds must be at least 1")


class InstructionFilter:
    """The self-instruct filters, and the pool of kept instructions they compare against.

    ROUGE-L is ``rouge_score``'s (the paper's scorer, no stemming), each kept instruction
    tokenized once.
    """

    def __init__(self, options: SelfInstructOptions) -> None:
        self.options = options
        self._tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)
        self._blacklist = [re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE) for word in options.blacklist]
        self.kept: list[str] = []
        self._tokens: list[list[str]] = []
        self._exact: set[str] = set()

    def add(self, instruction: str) -> None:
        """Add an instruction to the pool (seeds, and candidates that passed)."""
        self.kept.append(instruction)
        self._tokens.append(self._tokenizer.tokenize(instruction))
        self._exact.add(_normalised(instruction))

    def closest(self, instruction: str) -> tuple[float, str | None]:
        """The highest ROUGE-L F-measure against the pool, and the instruction that has it."""
        tokens = self._tokenizer.tokenize(instruction)
        best, best_index = 0.0, None
        for index, kept in enumerate(self._tokens):
            # rouge_score's own LCS on pre-tokenized text: the same number as RougeScorer.score,
            # without tokenizing every kept instruction again for every candidate.
            score = rouge_scorer._score_lcs(kept, tokens).fmeasure
            if score > best or best_index is None:
                best, best_index = score, index
        return best, None if best_index is None else self.kept[best_index]

    def reason_to_reject(self, instruction: str) -> str | None:
        """Why a candidate fails a filter other than ROUGE-L (None when it passes them)."""
        words = len(instruction.split())
        if words <= self.options.min_words:
            return "too short"
        if words > self.options.max_words:
            return "too long"
        if any(pattern.search(instruction) for pattern in self._blacklist):
            return "blacklisted keyword"
        if not instruction[0].isalnum():
            return "starts with punctuation"
        if _normalised(instruction) in self._exact:
            return "duplicate"
        return None


def _normalised(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@dataclass
class _Kept:
    instruction: str
    round: int
    rouge_l: float
    closest: str | None
    prompt_seeds: list[str]
    source: str


def self_instruct(
    files: Iterable[str],
    out: str | Path,
    backend: GenerationBackend | BackendSpec,
    options: SelfInstructOptions | None = None,
    cache: str | Path | None | Literal[False] = None,
    attempts: int = 3,
    progress: bool = True,
    overwrite: bool = False,
) -> SynthResult:
    """Self-instruct from seed tasks: new instructions through the filters, then one instance each.

    Args:
        files: seed tasks (self-instruct ``seed_tasks.jsonl``, alpaca records or conversations).
        out: the output JSONL (conversations); report, rejects and failures go beside it.
        backend: the model, or a :class:`BackendSpec` naming it.
        options: what to make.
        cache: the reply cache file (None: the default one for the backend; False: none). The
            rounds depend only on the seed and the replies, so a re-run with the cache replays
            them without calls.
        attempts: replies asked for per request when they come back unusable.
        progress: show progress bars.
        overwrite: replace the outputs of an earlier run.

    The options are checked first, then a missing input is named and ``out`` and the files beside
    it are claimed (existing ones refused unless ``overwrite``, an input always), then the backend
    loads and the work starts.

    Raises:
        ConfigError: bad options. DataError: a missing input, or no usable seed task.
        OutputError: an output exists (without ``overwrite``) or is an input.
    """
    options = options or SelfInstructOptions()
    options.check()
    files = list(files)
    claim_generation_outputs(files, out, OUTPUT_SUFFIXES, overwrite)
    backend = load_backend(backend)
    started = time.monotonic()
    seeds, load_report = read_seed_tasks(files, options.limit)
    generator = make_generator(backend, cache, attempts, progress, "self-instruct")
    pool = InstructionFilter(options)
    for seed in seeds:
        pool.add(seed.instruction)
    kept, rejects, failed, rounds = _grow_instructions(generator, seeds, pool, options)
    instances = generator.generate(
        [[{"role": "system", "content": INSTANCE_SYSTEM},
          {"role": "user", "content": INSTANCE_PROMPT.format(instruction=k.instruction)}] for k in kept],
        options.instance_sampling, parse_instance, description="self-instruct: instances",
    )
    rows = []
    for entry, result in zip(kept, instances):
        record_id = f"self-instruct-{content_id(entry.instruction)}"
        if not result.ok:
            failed.append({"id": record_id, "instruction": entry.instruction, "stage": "instance",
                           "error": result.error})
            continue
        given, output = result.value
        user = f"{entry.instruction}\n\n{given}" if given else entry.instruction
        rows.append({
            "id": record_id,
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}],
            "provenance": provenance(
                "synth/self-instruct", entry.source, round=entry.round, prompt_seeds=entry.prompt_seeds,
                rouge_l=round(entry.rouge_l, 4), closest=entry.closest, backend=backend.name,
                temperature=options.sampling.temperature, seed=options.sampling.seed,
            ),
        })
    written = write_jsonl(out, rows)
    rejected = Counter(r["reason"] for r in rejects)
    report = {
        "tool": "synth", "method": "self-instruct", "inputs": files, "output": str(out), "backend": backend.name,
        "sampling": options.sampling.as_dict(), "instance_sampling": options.instance_sampling.as_dict(),
        "seeds": len(seeds), "skipped": dict(load_report.skipped), "rounds": rounds,
        "candidates": len(kept) + len(rejects), "kept": len(kept), "rejected": dict(rejected),
        "rouge_l": _rouge_summary(kept, rejects, options.rouge_threshold),
        "written": written, "failed": len(failed), "failure_reasons": failure_reasons(row["error"] for row in failed),
        "generator": generator.stats.as_dict(),
        "cache": str(generator.cache.path) if generator.cache.path else None,
        "seconds": round(time.monotonic() - started, 2),
    }
    return SynthResult(Path(out), written, report, write_report(out, report),
                       write_side_file(out, "failed.jsonl", failed), write_side_file(out, "rejects.jsonl", rejects))


def _grow_instructions(
    generator: Generator, seeds: Sequence[Seed], pool: InstructionFilter, options: SelfInstructOptions
) -> tuple[list[_Kept], list[dict[str, Any]], list[dict[str, Any]], int]:
    """Rounds of new instructions until the target (or max_rounds, or patience) is reached."""
    rng = random.Random(options.sampling.seed)
    kept: list[_Kept] = []
    rejects: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    rounds = stale = 0
    while len(kept) < options.num_instructions and stale < options.patience and (
        options.max_rounds is None or rounds < options.max_rounds
    ):
        requests, shown = [], []
        for _ in range(options.requests_per_round):
            machine = rng.sample(kept, min(options.prompt_machine, len(kept)))
            human = rng.sample(list(seeds), min(options.prompt_instructions - len(machine), len(seeds)))
            examples = [s.instruction for s in human] + [k.instruction for k in machine]
            shown.append(human)
            listing = "\n".join(f"{n}. {text}" for n, text in enumerate(examples, start=1))
            requests.append([{"role": "system", "content": INSTRUCTIONS_SYSTEM},
                             {"role": "user", "content": INSTRUCTIONS_PROMPT.format(
                                 examples=listing, n=options.new_per_request)}])
        sampling = Sampling(options.sampling.temperature, options.sampling.top_p, options.sampling.max_tokens,
                            options.sampling.seed + rounds)
        results = generator.generate(requests, sampling, parse_instruction_list,
                                     description=f"self-instruct: round {rounds + 1}")
        before = len(kept)
        for human, result in zip(shown, results):
            if not result.ok:
                failed.append({"round": rounds, "stage": "instructions", "prompt_seeds": [s.id for s in human],
                               "error": result.error})
                continue
            for candidate in result.value or []:
                if len(kept) >= options.num_instructions:
                    break
                reason = pool.reason_to_reject(candidate)
                score, closest = pool.closest(candidate)
                if reason is None and score >= options.rouge_threshold:
                    reason = f"ROUGE-L >= {options.rouge_threshold}"
                if reason is not None:
                    rejects.append({"instruction": candidate, "reason": reason, "rouge_l": round(score, 4),
                                    "closest": closest, "round": rounds})
                    continue
                pool.add(candidate)
                kept.append(_Kept(candidate, rounds, score, closest, [s.id for s in human], human[0].source))
        rounds += 1
        stale = stale + 1 if len(kept) == before else 0
    return kept, rejects, failed, rounds


def _rouge_summary(kept: list[_Kept], rejects: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """ROUGE-L of kept and rejected candidates against their closest kept instruction."""
    kept_scores = [k.rouge_l for k in kept]
    rouge_rejects = [r["rouge_l"] for r in rejects if r["reason"].startswith("ROUGE-L")]
    all_scores = kept_scores + [r["rouge_l"] for r in rejects]
    bins = Counter(min(int(score * 10), 9) for score in all_scores)

    def describe(scores: list[float]) -> dict[str, Any]:
        if not scores:
            return {"count": 0, "mean": None, "min": None, "max": None}
        return {"count": len(scores), "mean": round(statistics.fmean(scores), 4), "min": round(min(scores), 4),
                "max": round(max(scores), 4)}

    return {
        "threshold": threshold,
        "kept": describe(kept_scores),
        "rejected": describe(rouge_rejects),
        "histogram": {f"{b / 10:.1f}-{(b + 1) / 10:.1f}": bins.get(b, 0) for b in range(10)},
    }
