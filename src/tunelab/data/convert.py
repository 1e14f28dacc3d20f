"""Any supported data file -> canonical JSONL: ``tunelab data convert`` and the reader of the data tools.

Five kinds of canonical record (see :mod:`tunelab.data.jsonl_output`): ``conversation``
(``{"messages"}``), ``prompt`` (``{"messages", "reference"}``), ``text`` (``{"text"}``),
``preference`` (``{"prompt", "chosen", "rejected"}``) and ``feedback`` (KTO:
``{"messages", "label"}``). ``kind: auto`` decides per file from its first readable record.
Every record goes through the project's readers (records.py, preferences.py), so what
``convert`` accepts is exactly what training accepts; a record they refuse is rejected with the
reader's reason and its ``file:line``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunelab.data.files import Row
from tunelab.data.jsonl_output import provenance, write_jsonl
from tunelab.data.preferences import feedback_to_json, preference_to_json, to_feedback, to_preference
from tunelab.data.records import (
    SHAREGPT_ROLES,
    LoadReport,
    convert_rows,
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


def rejects_path_for(out: str | Path) -> Path:
    """Where the rejects of ``--out data.jsonl`` go by default: ``data.rejects.jsonl`` beside it."""
    out = Path(out)
    stem = out.name.removesuffix(".gz").removesuffix(".jsonl").removesuffix(".json")
    return out.with_name(f"{stem}.rejects.jsonl")


def write_rejects(rejects: list[dict[str, Any]], out: str | Path, rejects_path: str | Path | None) -> Path | None:
    """Write rejected rows beside ``out`` (or to ``rejects_path``); returns the file, or None if nothing was rejected.

    With nothing rejected, a default rejects file left by an earlier run is removed: a stale list
    would mislead.
    """
    rejects_file = Path(rejects_path) if rejects_path else rejects_path_for(out)
    if rejects:
        write_jsonl(rejects_file, rejects)
        return rejects_file
    if rejects_file.exists() and not rejects_path:
        rejects_file.unlink()
    return None


@dataclass
class ConvertResult:
    """What ``convert`` wrote: records, their kind, the reader's report and the rejects file (if any)."""

    written: int
    kind: Kind
    report: LoadReport
    out: Path
    rejects_path: Path | None


def convert_files(
    files: Iterable[str],
    out: str | Path,
    kind: Literal["auto"] | Kind = "auto",
    fmt: ConversationFormat = "auto",
    text_field: str = "text",
    system_prompt: str | None = None,
    on_error: Literal["fail", "skip"] = "skip",
    rejects_path: str | Path | None = None,
) -> ConvertResult:
    """Convert data files to canonical JSONL at ``out``, each record with a ``provenance``.

    Rejected rows (with their reason and ``file:line``) go to ``rejects_path`` (default
    ``<out stem>.rejects.jsonl``), which is only written when something was rejected.

    Raises:
        DataError: see :func:`read_canonical`.
    """
    files = list(files)
    result = ReadResult([], LoadReport())
    result.records = list(iter_canonical(files, kind, fmt, text_field, system_prompt, on_error, result.report,
                                         result.rejects, result.kinds))
    rejects_file = write_rejects(result.rejects, out, rejects_path)
    check_read(files, result)
    rows = []
    for record in result.records:
        details: dict[str, Any] = {"kind": result.kind}
        if record.data.get("provenance") is not None:
            details["parent"] = record.data["provenance"]
        rows.append({**record.data, "provenance": provenance("convert", record.source, **details)})
    written = write_jsonl(out, rows)
    return ConvertResult(written, result.kind, result.report, Path(out), rejects_file)
