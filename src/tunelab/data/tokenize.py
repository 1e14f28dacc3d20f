"""Records -> token ids and labels, cached on disk by fingerprint, with an honest report.

The fingerprint covers the data files' contents, every data setting that changes tokens, the
tokenizer (vocabulary, special tokens) and the chat template, so a second run with the same inputs
loads the Arrow cache and skips reading and tokenizing. Overlong sequences, dropped records and
skipped bad records are always counted; nothing is cut silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from tunelab.config import DataConfig
from tunelab.data.files import file_fingerprint
from tunelab.data.oversize import cut_messages, message_bytes, raw_byte_limit
from tunelab.data.pair_tokenize import PairTokenizer, feedback_rows, preference_rows
from tunelab.data.readers import load_feedback, load_preferences, load_records
from tunelab.data.records import Conversation, LoadReport, Text
from tunelab.data.templates import BUILTIN_TEMPLATES, IGNORE_INDEX, NO_TEMPLATE, render_conversation, resolve_template
from tunelab.errors import DataError
from tunelab.outputs import write_errors

CACHE_VERSION = 2  # bump when tokenization output changes for the same inputs
DATA_KINDS = ("conversations", "text", "pairs", "feedback", "prompts")
"""What an objective trains on (its registry entry says which): chats with trained assistant turns,
text trained on every token, preference pairs, labelled feedback records, or prompts (tokenized as
conversations here; online RL renders them itself)."""


@dataclass
class TokenizeReport:
    """Counts from reading and tokenizing one split."""

    records: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    split_into_chunks: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_first_at: dict[str, str] = field(default_factory=dict)
    lengths: dict[str, float] = field(default_factory=dict)
    from_cache: bool = False

    def lines(self) -> list[str]:
        """Human-readable summary lines (what was cut, dropped or skipped, and why)."""
        out = [
            f"{self.examples:,} sequences from {self.records:,} records, {self.tokens:,} tokens, "
            f"{self.trained_tokens:,} trained"
            + (f"; lengths min {self.lengths['min']:.0f} / median {self.lengths['p50']:.0f} / "
               f"p95 {self.lengths['p95']:.0f} / max {self.lengths['max']:.0f}" if self.lengths else "")
        ]
        if self.truncated:
            out.append(f"{self.truncated:,} sequences longer than data.max_length were truncated")
        if self.split_into_chunks:
            out.append(f"{self.split_into_chunks:,} texts longer than data.max_length were split into chunks")
        out += [f"{count:,} dropped: {reason}" for reason, count in self.dropped.items()]
        out += [
            f"{count:,} skipped: {reason} (first at {self.skipped_first_at.get(reason, '?')})"
            for reason, count in self.skipped.items()
        ]
        return out


@dataclass
class TokenizedData:
    """Tokenized train and eval sets (columns ``input_ids``, ``labels``), their reports and raw eval records."""

    train: datasets.Dataset
    eval: datasets.Dataset | None
    train_report: TokenizeReport
    eval_report: TokenizeReport | None
    eval_records: list[dict[str, Any]]
    template: str | None  # None: continued pretraining of a model without a chat template (plain text only)
    fingerprint: str


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the vocabulary, merges, normalisation and special tokens."""
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _record_to_row(record: Conversation | Text) -> dict[str, Any]:
    if isinstance(record, Text):
        return {"messages": [], "text": record.text, "source": record.source, "tools": ""}
    return {"messages": record.messages, "text": "", "source": record.source,
            "tools": json.dumps(record.tools) if record.tools else ""}


class _Tokenizer:
    """The picklable map function (datasets runs it in worker processes)."""

    def __init__(self, tokenizer, template, train_on, max_length, overlong, stop_ids, kind):
        self.tokenizer = tokenizer
        self.template = template
        self.train_on = train_on
        self.max_length = max_length
        self.overlong = overlong
        self.stop_ids = set(stop_ids)
        self.kind = kind
        self.byte_limit = raw_byte_limit(tokenizer, max_length)

    def _text(self, text: str) -> list[tuple[list[int], list[int], str]]:
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        chunks = [ids[i : i + self.max_length] for i in range(0, len(ids), self.max_length)]
        chunks = [c for c in chunks if len(c) > 1]
        flag = "split" if len(chunks) > 1 else ""
        return [(c, [IGNORE_INDEX] + c[1:], flag) for c in chunks]

    def _conversation(self, messages: list[dict],
                      tools: list[dict] | None = None) -> list[tuple[list[int], list[int], str]]:
        if self.template is None:
            raise DataError("a conversation record, but " + NO_TEMPLATE.format(names="|".join(BUILTIN_TEMPLATES))
                            .replace("train.objective: pretrain to train on plain text",
                                     "give plain-text records (format: text)"))
        if message_bytes(messages) > self.byte_limit:  # certainly longer than max_length: never tokenize it whole
            if self.overlong == "drop":
                return [([], [], "dropped: longer than data.max_length (data.overlong: drop)")]
            messages = cut_messages(messages, self.byte_limit)
        rendered = render_conversation(self.tokenizer, self.template, messages, self.train_on, self.stop_ids,
                                       tools=tools)
        ids, labels, flag = rendered.input_ids, rendered.labels, ""
        if len(ids) > self.max_length:
            if self.overlong == "drop":
                return [([], [], "dropped: longer than data.max_length (data.overlong: drop)")]
            ids, labels, flag = ids[: self.max_length], labels[: self.max_length], "truncated"
        if all(label == IGNORE_INDEX for label in labels):
            return [([], [], "dropped: no trained tokens left after truncation to data.max_length")]
        return [(ids, labels, flag)]

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "flag": [], "source": []}
        tools_column = batch.get("tools") or [""] * len(batch["source"])
        for messages, text, source, tools in zip(batch["messages"], batch["text"], batch["source"], tools_column):
            try:
                if not messages and self.kind != "text":
                    raise DataError("a plain-text record cannot be used for conversation data (train.objective: "
                                    "pretrain trains on plain text)")
                pieces = self._text(text) if not messages else self._conversation(messages, json.loads(tools or "[]"))
            except DataError as exc:
                pieces = [([], [], f"error: {exc}")]
            for ids, labels, flag in pieces:
                out["input_ids"].append(ids)
                out["labels"].append(labels)
                out["flag"].append(flag)
                out["source"].append(source)
        return out


def _tokenize_split(
    rows: list[dict[str, Any]], fn: _Tokenizer | PairTokenizer, num_proc: int, on_error: str,
    load_report: LoadReport, desc: str
) -> tuple[datasets.Dataset, TokenizeReport]:
    raw = datasets.Dataset.from_list(rows)
    procs = num_proc if len(raw) >= 1000 * num_proc else 1
    mapped = raw.map(fn, batched=True, batch_size=256, num_proc=procs if procs > 1 else None,
                     remove_columns=raw.column_names, desc=desc)
    report = TokenizeReport(records=load_report.read)
    report.skipped = dict(load_report.skipped)
    report.skipped_first_at = dict(load_report.examples)
    flags = Counter(mapped["flag"])
    errors = [(flag, source) for flag, source in zip(mapped["flag"], mapped["source"]) if flag.startswith("error: ")]
    if errors:
        flag, source = errors[0]
        if on_error == "fail":
            raise DataError(f"{source}: {flag.removeprefix('error: ')}\n(set data.on_error: skip to drop bad records and count them)")
        for flag, source in errors:
            reason = flag.removeprefix("error: ")
            report.skipped[reason] = report.skipped.get(reason, 0) + 1
            report.skipped_first_at.setdefault(reason, source)
    report.dropped = {f.removeprefix("dropped: "): n for f, n in flags.items() if f.startswith("dropped: ")}
    report.truncated = flags.get("truncated", 0)
    report.split_into_chunks = flags.get("split", 0)
    keep = [i for i, f in enumerate(mapped["flag"]) if not f.startswith(("error", "dropped"))]
    kept = (mapped.select(keep) if len(keep) < len(mapped) else mapped).remove_columns(["flag"])
    if len(kept) == 0:
        raise DataError("no usable training sequences after tokenization:\n" + "\n".join(report.lines()))
    lengths = np.array([len(ids) for ids in kept["input_ids"]])
    if "pair_ids" in kept.column_names:  # a pair row is both of its sequences
        lengths = lengths + np.array([len(ids) for ids in kept["pair_ids"]])
    report.examples = len(kept)
    report.tokens = int(lengths.sum())
    label_columns = ["labels", "pair_labels"] if "pair_labels" in kept.column_names else ["labels"]
    report.trained_tokens = int(sum(sum(1 for x in labels if x != IGNORE_INDEX)
                                    for column in label_columns for labels in kept[column]))
    report.lengths = {
        "min": float(lengths.min()), "mean": float(lengths.mean()), "p50": float(np.percentile(lengths, 50)),
        "p95": float(np.percentile(lengths, 95)), "max": float(lengths.max()),
    }
    return kept, report


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide datasets' progress bars for quick internal steps (saving the cache)."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def default_cache_dir() -> Path:
    """``$TUNELAB_CACHE`` or ``~/.cache/tunelab``, plus ``/data``."""
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab")) / "data"


def data_fingerprint(cfg: DataConfig, kind: str, seed: int, tokenizer, template: str | None,
                     stop_ids: set[int]) -> str:
    """Fingerprint of everything that decides the tokenized data."""
    parts = {
        "version": CACHE_VERSION,
        "train": [file_fingerprint(f) for f in cfg.train],
        "eval": [file_fingerprint(f) for f in cfg.eval or []],
        "data": {**cfg.model_dump(exclude={"packing", "num_proc", "cache_dir"}), "train_on": cfg.trained_tokens(kind)},
        "kind": kind,
        "seed": seed,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": template,
        "stop_ids": sorted(stop_ids),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def split_records(records: list, val_ratio: float, seed: int) -> tuple[list, list]:
    """Hold out ``val_ratio`` of the records, chosen by a seeded permutation (at least one each)."""
    if val_ratio <= 0:
        return records, []
    count = len(records)
    held = max(1, round(count * val_ratio))
    if held >= count:
        raise DataError(f"data.val_ratio {val_ratio} leaves no training records out of {count}")
    order = np.random.default_rng(seed).permutation(count)
    held_out = set(order[:held].tolist())
    return [r for i, r in enumerate(records) if i not in held_out], [r for i, r in enumerate(records) if i in held_out]


def prepare_data(
    cfg: DataConfig, kind: str, seed: int, tokenizer: PreTrainedTokenizerBase, stop_ids: set[int]
) -> TokenizedData:
    """Read, split, render, tokenize and cache the train and eval data.

    ``kind`` is the objective's data kind (one of :data:`DATA_KINDS`).

    Raises:
        DataError: unreadable files, bad records (with ``on_error: fail``), or nothing usable.
    """
    try:
        template: str | None = resolve_template(tokenizer, cfg.template)
    except DataError:
        if kind != "text" or cfg.template != "auto":
            raise
        template = None  # plain text needs no template; a conversation record is refused when it is met
    if kind not in DATA_KINDS:
        raise ValueError(f"unknown data kind {kind!r}; one of {', '.join(DATA_KINDS)}")
    fingerprint = data_fingerprint(cfg, kind, seed, tokenizer, template, stop_ids)
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    target = cache / fingerprint
    if (target / "meta.json").is_file():
        meta = json.loads((target / "meta.json").read_text())
        train = datasets.load_from_disk(str(target / "train"))
        evaluation = datasets.load_from_disk(str(target / "eval")) if (target / "eval").exists() else None
        train_report = TokenizeReport(**{**meta["train_report"], "from_cache": True})
        eval_report = TokenizeReport(**{**meta["eval_report"], "from_cache": True}) if meta["eval_report"] else None
        return TokenizedData(train, evaluation, train_report, eval_report, meta["eval_records"], template, fingerprint)

    fn: _Tokenizer | PairTokenizer
    if kind in ("pairs", "feedback"):
        fn = PairTokenizer(tokenizer, template, cfg.max_length, cfg.overlong, stop_ids)
        pairs = kind == "pairs"
        to_rows = preference_rows if pairs else feedback_rows

        def load(files: list[str], limit: int | None = None) -> tuple[list, LoadReport]:
            loader = load_preferences if pairs else load_feedback
            return loader(files, cfg.on_error, cfg.system_prompt, limit)
    else:
        fn = _Tokenizer(tokenizer, template, cfg.trained_tokens(kind), cfg.max_length, cfg.overlong, stop_ids, kind)

        def to_rows(records: list) -> list[dict[str, Any]]:
            return [_record_to_row(r) for r in records]

        def load(files: list[str], limit: int | None = None) -> tuple[list, LoadReport]:
            return load_records(files, cfg.format, cfg.on_error, cfg.text_field, cfg.system_prompt, limit)

    records, load_report = load(cfg.train, cfg.max_samples)
    if cfg.eval:
        train_records = records
        eval_records, eval_load = load(cfg.eval)
    else:
        train_records, eval_records = split_records(records, cfg.val_ratio, seed)
        eval_load = LoadReport(read=len(eval_records), kept=len(eval_records))
        load_report.read -= len(eval_records)
    train, train_report = _tokenize_split(to_rows(train_records), fn, cfg.num_proc, cfg.on_error, load_report,
                                          "Tokenizing train")
    evaluation, eval_report = None, None
    if eval_records:
        evaluation, eval_report = _tokenize_split(to_rows(eval_records), fn, cfg.num_proc, cfg.on_error, eval_load,
                                                  "Tokenizing eval")
    # Generation evaluators take conversations; pair objectives are scored on held-out pairs instead.
    eval_rows = to_rows(eval_records) if isinstance(fn, _Tokenizer) else []

    tmp = cache / f".tmp-{fingerprint}"
    with write_errors(cache, "tokenized data cache", kept="nothing was trained yet; free space, or set "
                      "data.cache_dir to a directory you can write"):
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            with _quiet_datasets():
                train.save_to_disk(str(tmp / "train"))
                if evaluation is not None:
                    evaluation.save_to_disk(str(tmp / "eval"))
            meta = {
                "train_report": {k: v for k, v in asdict(train_report).items() if k != "from_cache"},
                "eval_report": {k: v for k, v in asdict(eval_report).items() if k != "from_cache"}
                if eval_report else None,
                "eval_records": eval_rows,
            }
            (tmp / "meta.json").write_text(json.dumps(meta))
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return TokenizedData(train, evaluation, train_report, eval_report, eval_rows, template, fingerprint)
