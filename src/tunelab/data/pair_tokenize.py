"""Preference pairs and KTO records -> token ids: two scored sequences per row.

A row holds two sequences that share a prompt: ``input_ids``/``labels`` (the chosen answer, or
the KTO completion) and ``pair_ids``/``pair_labels`` (the rejected answer, or, for KTO, the
prompt with another record's completion, whose log-ratio estimates the KL term). Only the
continuation is labelled; the prompt, including its earlier assistant turns, is context.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from tunelab.data.oversize import cut_messages, message_bytes, raw_byte_limit
from tunelab.data.preferences import Feedback, Preference
from tunelab.data.templates import IGNORE_INDEX, render_conversation
from tunelab.errors import DataError


def _assistant_turns(messages: list[dict[str, str]]) -> int:
    return sum(1 for m in messages if m["role"] == "assistant")


def preference_rows(records: list[Preference]) -> list[dict[str, Any]]:
    """Rows for :class:`PairTokenizer`: prompt + chosen first, prompt + rejected second."""
    return [
        {"first": r.prompt + r.chosen, "second": r.prompt + r.rejected, "skip": _assistant_turns(r.prompt),
         "label": True, "source": r.source}
        for r in records
    ]


def feedback_rows(records: list[Feedback]) -> list[dict[str, Any]]:
    """Rows for :class:`PairTokenizer`: the record, then its prompt with the next record's completion.

    The mismatched pair (prompt ``i`` with completion ``i+1``, in file order) is what KTO uses
    to estimate the policy's KL divergence from the reference without gradient.
    """
    count = len(records)
    return [
        {"first": r.prompt + r.completion, "second": r.prompt + records[(i + 1) % count].completion,
         "skip": _assistant_turns(r.prompt), "label": r.label, "source": r.source}
        for i, r in enumerate(records)
    ]


class PairTokenizer:
    """The picklable map function for pair rows (datasets may run it in worker processes)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str, max_length: int, overlong: str,
                 stop_ids: set[int]) -> None:
        self.tokenizer, self.template = tokenizer, template
        self.max_length, self.overlong, self.stop_ids = max_length, overlong, set(stop_ids)
        self.byte_limit = raw_byte_limit(tokenizer, max_length)

    def _sequence(self, messages: list[dict], skip: int, name: str) -> tuple[list[int], list[int], str]:
        if message_bytes(messages) > self.byte_limit:  # far longer than max_length: tokenize only what can be kept
            messages = cut_messages(messages, self.byte_limit)
        rendered = render_conversation(self.tokenizer, self.template, messages, "assistant", self.stop_ids, skip)
        ids, labels = rendered.input_ids, rendered.labels
        first_trained = next((k for k, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        if first_trained >= self.max_length:
            raise DataError(f"the prompt is longer than data.max_length ({self.max_length} tokens)")
        if len(ids) <= self.max_length:
            return ids, labels, ""
        if self.overlong == "drop":
            return [], [], f"dropped: {name} longer than data.max_length (data.overlong: drop)"
        return ids[: self.max_length], labels[: self.max_length], "truncated"

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "pair_ids": [], "pair_labels": [], "label": [],
                                "flag": [], "source": []}
        for first, second, skip, label, source in zip(
            batch["first"], batch["second"], batch["skip"], batch["label"], batch["source"]
        ):
            try:
                ids, labels, flag = self._sequence(first, skip, "the chosen sequence")
                pair_ids, pair_labels, pair_flag = self._sequence(second, skip, "the rejected sequence")
                flag = next((f for f in (flag, pair_flag) if f.startswith("dropped")), flag or pair_flag)
                if flag.startswith("dropped"):
                    ids, labels, pair_ids, pair_labels = [], [], [], []
            except DataError as exc:
                ids, labels, pair_ids, pair_labels, flag = [], [], [], [], f"error: {exc}"
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["pair_ids"].append(pair_ids)
            out["pair_labels"].append(pair_labels)
            out["label"].append(bool(label))
            out["flag"].append(flag)
            out["source"].append(source)
        return out
