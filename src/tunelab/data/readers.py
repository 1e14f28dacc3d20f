"""The one path from data files to records: every reader of tunelab goes through :func:`convert_rows`.

A file is read row by row (:func:`~tunelab.data.files.read_rows`, each row with its ``file:line``),
its layout is decided once from its first readable row, and each row is converted by the
record readers of :mod:`tunelab.data.records` (conversations, prompts, text) and
:mod:`tunelab.data.preferences` (pairs, KTO feedback). A bad row raises :class:`DataError` naming
its place (``on_error: fail``) or is counted in a :class:`~tunelab.data.records.LoadReport`
(``on_error: skip``). On this path sit training's loaders (:func:`load_records`,
:func:`load_prompts`, :func:`load_preferences`, :func:`load_feedback`) and the data tools'
canonical reader (:func:`iter_canonical`, :func:`read_canonical`), so what ``tunelab data``
accepts is exactly what training accepts.

Five kinds of canonical record: ``conversation`` (``{"messages"}``), ``prompt``
(``{"messages", "reference"}``), ``text`` (``{"text"}``), ``preference`` (``{"prompt", "chosen",
"rejected"}``) and ``feedback`` (KTO: ``{"messages", "label"}``). ``kind: auto`` decides per file
from its first readable record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from tunelab.data.files import Row, read_rows
from tunelab.data.preferences import Feedback, Preference, feedback_to_json, preference_to_json, to_feedback, to_preference
from tunelab.data.records import (
    SHAREGPT_ROLES,
    Format,
    LoadReport,
    Prompt,
    Record,
    detect_format,
    record_to_json,
    to_prompt,
    to_record,
)
from tunelab.errors import DataError

Kind = Literal["conversation", "prompt", "text", "preference", "feedback"]
KINDS: tuple[str, ...] = ("conversation", "prompt", "text", "preference", "feedback")
ConversationFormat = Literal["auto", "alpaca", "sharegpt", "messages", "qa", "text"]
KEPT_KEYS = ("id", "task", "provenance", "metadata")  # extra keys a canonical record keeps through the tools


def convert_rows(
    files: Iterable[str],
    detect: Callable[[str, Row], Any],
    convert: Callable[[Row, Any], Any],
    on_error: Literal["fail", "skip"],
    report: LoadReport,
    fail_hint: str,
    on_skip: Callable[[Row, str], None] | None = None,
) -> Iterator[tuple[Row, Any]]:
    """Read rows of data files and convert each, counting in ``report`` what was read and skipped.

    Args:
        files: data files (any type :func:`~tunelab.data.files.read_rows` reads).
        detect: ``(file name, first readable row) -> layout``, called once per file.
        convert: ``(row, layout) -> item``; raises DataError for a bad row.
        on_error: ``fail`` raises at the first bad row (with ``fail_hint`` added); ``skip`` counts it.
        report: updated as rows are read (``read`` and skips; ``kept`` is the caller's).
        fail_hint: how to skip bad rows instead, for the ``fail`` message.
        on_skip: also told of each skipped row and its reason.

    Yields:
        Each good row with its converted item.
    """
    for name in files:
        layout = None
        for row in read_rows(name):
            report.read += 1
            try:
                if row.error is not None:
                    raise DataError(f"{row.source}: {row.error}")
                if layout is None:
                    layout = detect(name, row)
                item = convert(row, layout)
            except DataError as exc:
                if on_error == "fail":
                    raise DataError(f"{exc}\n({fail_hint})") from None
                reason = str(exc).removeprefix(f"{row.source}: ")
                report.skip(reason, row.source)
                if on_skip is not None:
                    on_skip(row, reason)
                continue
            yield row, item


def load_items(
    files: Iterable[str],
    fmt: Literal["auto"] | Format,
    on_error: Literal["fail", "skip"],
    limit: int | None,
    convert: Callable[[Row, Format], Any],
) -> tuple[list, LoadReport]:
    """Read up to ``limit`` items with ``convert(row, layout)``; the layout is ``fmt`` or detected per file.

    Raises:
        DataError: a file cannot be read, or (``fail``) a row is bad, or no item is usable.
    """
    files = list(files)
    items: list = []
    report = LoadReport()
    detect = (lambda _, row: detect_format(row.data, row.source)) if fmt == "auto" else (lambda _, row: fmt)
    if limit is None or limit > 0:
        for _, item in convert_rows(files, detect, convert, on_error, report,
                                    "set data.on_error: skip to drop bad records and count them"):
            items.append(item)
            if limit is not None and len(items) >= limit:
                break
    report.kept = len(items)
    if not items:
        detail = f"\n{report.summary()}" if report.skipped else ""
        raise DataError(f"{', '.join(files)}: no usable records{detail}")
    return items, report


def load_records(
    files: Iterable[str],
    fmt: Literal["auto"] | Format = "auto",
    on_error: Literal["fail", "skip"] = "fail",
    text_field: str = "text",
    system_prompt: str | None = None,
    limit: int | None = None,
) -> tuple[list[Record], LoadReport]:
    """Read data files into canonical records (conversations or texts) for training.

    Args:
        files: data files (or hub dataset ids).
        fmt: record format, or ``auto`` to detect it per file from its first record.
        on_error: ``fail`` raises at the first bad record; ``skip`` drops it and counts why.
        text_field: the field holding text for ``text`` records in JSON/CSV/Parquet.
        system_prompt: system message for conversations that have none.
        limit: stop after this many records.

    Returns:
        The records and a report of what was read and skipped.

    Raises:
        DataError: a file cannot be read, or (``fail``) a record is bad, or no record is usable.
    """
    return load_items(files, fmt, on_error, limit, lambda row, f: to_record(row, f, text_field, system_prompt))


def load_prompts(
    files: Iterable[str],
    fmt: Literal["auto"] | Format = "auto",
    on_error: Literal["fail", "skip"] = "skip",
    system_prompt: str | None = None,
    limit: int | None = None,
) -> tuple[list[Prompt], LoadReport]:
    """Read data files into prompts with optional references (evaluation, RL).

    Same arguments as :func:`load_records`; bad records are skipped and counted by default.
    """
    return load_items(files, fmt, on_error, limit, lambda row, f: to_prompt(row, f, system_prompt=system_prompt))


def load_preferences(
    files: Iterable[str],
    on_error: Literal["fail", "skip"] = "fail",
    system_prompt: str | None = None,
    limit: int | None = None,
) -> tuple[list[Preference], LoadReport]:
    """Read preference pairs from data files (every supported layout, see the module docstring).

    Raises:
        DataError: a file cannot be read, or (``fail``) a pair is bad, or no pair is usable.
    """
    return load_items(files, "preference", on_error, limit, lambda row, _: to_preference(row, system_prompt))


def load_feedback(
    files: Iterable[str],
    on_error: Literal["fail", "skip"] = "fail",
    system_prompt: str | None = None,
    limit: int | None = None,
) -> tuple[list[Feedback], LoadReport]:
    """Read KTO records (a conversation or prompt + completion, and a boolean label).

    Raises:
        DataError: a file cannot be read, or (``fail``) a record is bad, or none is usable.
    """
    return load_items(files, "feedback", on_error, limit, lambda row, _: to_feedback(row, system_prompt))


@dataclass
class CanonicalRecord:
    """One record in canonical form, where it came from, and the raw row it was read from."""

    data: dict[str, Any]
    source: str
    raw: Any = None


@dataclass
class ReadResult:
    """Canonical records, what kind each file held, what was rejected and why."""

    records: list[CanonicalRecord]
    report: LoadReport
    kinds: dict[str, Kind] = field(default_factory=dict)
    rejects: list[dict[str, Any]] = field(default_factory=list)

    @property
    def kind(self) -> Kind:
        """The one kind of all the files (read_canonical refuses a mix)."""
        return next(iter(self.kinds.values()))


def detect_kind(data: Any, source: str, fmt: ConversationFormat = "auto") -> Kind:
    """The canonical kind of a raw record, from its keys.

    ``chosen``/``rejected`` mean a preference pair; a boolean ``label`` with a conversation a
    KTO record; ``reference``, or a conversation with no answer field at all (alpaca without
    ``output``, messages without an assistant turn), a prompt; ``text`` or a plain line text;
    anything else the conversation readers accept a conversation (an empty answer is a bad
    conversation, not a prompt).

    Raises:
        DataError: nothing matches; the message lists the keys found.
    """
    if isinstance(data, dict):
        if any(key in data for key in ("chosen", "rejected", "chosen_messages", "rejected_messages")):
            return "preference"
        if isinstance(data.get("label"), bool) and ("messages" in data or "completion" in data):
            return "feedback"
        if "reference" in data and "messages" in data:
            return "prompt"
    row_format = detect_format(data, source) if fmt == "auto" else fmt
    if row_format == "text":
        return "text"
    return "prompt" if isinstance(data, dict) and _lacks_answer(data, row_format) else "conversation"


def _lacks_answer(data: dict[str, Any], fmt: str) -> bool:
    """No answer field at all (a question to answer), as opposed to an empty or broken one (a bad record)."""
    if fmt == "alpaca":
        return data.get("output") is None
    if fmt == "qa":
        return data.get("answer") is None
    turns = data.get("messages" if fmt == "messages" else "conversations")
    if not isinstance(turns, list):
        return False
    speakers = [str(t.get("role", t.get("from"))).lower() for t in turns if isinstance(t, dict)]
    if not speakers or any(speaker not in SHAREGPT_ROLES for speaker in speakers):
        return False  # no turns or an unknown speaker: a broken conversation (the reader names it), not a prompt
    return not any(SHAREGPT_ROLES[speaker] == "assistant" for speaker in speakers)


def _with_kept_keys(canonical: dict[str, Any], raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        for key in KEPT_KEYS:
            if key in raw and key not in canonical:
                canonical[key] = raw[key]
    return canonical


def to_canonical(row: Row, kind: Kind, fmt: ConversationFormat = "auto", text_field: str = "text",
                 system_prompt: str | None = None) -> dict[str, Any]:
    """Convert one raw row to the canonical JSON object of ``kind``.

    The row's ``id``, ``task``, ``provenance`` and ``metadata`` keys are kept.

    Raises:
        DataError: the row is not a valid record of that kind; the message starts with its source.
    """
    if kind == "preference":
        canonical = preference_to_json(to_preference(row, system_prompt))
    elif kind == "feedback":
        canonical = feedback_to_json(to_feedback(row, system_prompt))
    else:
        if kind == "text":
            row_format = "text"
        else:
            row_format = fmt if fmt != "auto" else detect_format(row.data, row.source)
        if kind == "prompt":
            canonical = record_to_json(to_prompt(row, row_format, text_field, system_prompt))
        else:
            if row_format == "text" and kind == "conversation":
                raise DataError(f"{row.source}: a plain-text record is not a conversation (use --kind text)")
            canonical = record_to_json(to_record(row, row_format, text_field, system_prompt))
    return _with_kept_keys(canonical, row.data)


def iter_canonical(
    files: Iterable[str],
    kind: Literal["auto"] | Kind = "auto",
    fmt: ConversationFormat = "auto",
    text_field: str = "text",
    system_prompt: str | None = None,
    on_error: Literal["fail", "skip"] = "skip",
    report: LoadReport | None = None,
    rejects: list[dict[str, Any]] | None = None,
    kinds: dict[str, Kind] | None = None,
) -> Iterator[CanonicalRecord]:
    """Yield canonical records from data files, counting (and collecting) rejected rows.

    Args:
        files: data files (any type :func:`~tunelab.data.files.read_rows` reads).
        kind: the canonical kind, or ``auto`` to decide per file from its first readable record.
        fmt: the conversation format for ``conversation``/``prompt`` records (``auto`` detects).
        text_field: the field that holds text for ``text`` records.
        system_prompt: a system message for conversations and prompts that have none.
        on_error: ``skip`` counts a bad row in ``report`` (and adds it to ``rejects``);
            ``fail`` raises at the first one.
        report: counts of read, kept and skipped rows (updated as rows are read).
        rejects: if given, receives ``{"source", "reason", "record"}`` per rejected row.
        kinds: if given, receives the kind decided for each file.

    Raises:
        DataError: a file cannot be read, or (``fail``) a row is bad.
    """
    report = report if report is not None else LoadReport()
    files = list(files)
    if kind != "auto" and kinds is not None:
        kinds.update(dict.fromkeys(files, kind))

    def detect(name: str, row: Row) -> Kind:
        if kind != "auto":
            return kind
        decided = detect_kind(row.data, row.source, fmt)
        if kinds is not None:
            kinds[name] = decided
        return decided

    def reject(row: Row, reason: str) -> None:
        if rejects is not None:
            rejects.append({"source": row.source, "reason": reason, "record": row.data})

    convert = lambda row, file_kind: to_canonical(row, file_kind, fmt, text_field, system_prompt)  # noqa: E731
    for row, canonical in convert_rows(files, detect, convert, on_error, report,
                                       "pass --on-error skip to drop bad records and list them", reject):
        report.kept += 1
        yield CanonicalRecord(canonical, row.source, row.data)


def read_canonical(
    files: Iterable[str],
    kind: Literal["auto"] | Kind = "auto",
    fmt: ConversationFormat = "auto",
    text_field: str = "text",
    system_prompt: str | None = None,
    on_error: Literal["fail", "skip"] = "skip",
) -> ReadResult:
    """Read data files into canonical records of one kind (see :func:`iter_canonical`).

    Raises:
        DataError: a file cannot be read, (``fail``) a row is bad, the files hold different
            kinds, or no record is usable (the message lists why rows were rejected).
    """
    files = list(files)
    result = ReadResult([], LoadReport())
    result.records = list(iter_canonical(files, kind, fmt, text_field, system_prompt, on_error, result.report,
                                         result.rejects, result.kinds))
    check_read(files, result)
    return result


def check_read(files: list[str], result: ReadResult) -> None:
    """Refuse a mix of kinds, and inputs with no usable record.

    Raises:
        DataError: naming each file's kind, or listing why rows were rejected.
    """
    if len(set(result.kinds.values())) > 1:
        found = ", ".join(f"{name}: {file_kind}" for name, file_kind in result.kinds.items())
        raise DataError(f"the inputs hold different kinds of record ({found}); "
                        "process them separately, or pass --kind to read all as one kind")
    if not result.records:
        detail = f"\n{result.report.summary()}" if result.report.skipped else ""
        raise DataError(f"{', '.join(files)}: no usable records{detail}")
