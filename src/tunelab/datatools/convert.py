"""Any supported data file -> canonical JSONL: ``tunelab data convert``.

Records are read through :func:`tunelab.data.readers.iter_canonical` (the same readers training
uses), so what ``convert`` accepts is exactly what training accepts; a record they refuse is
rejected with the reader's reason and its ``file:line`` and listed in a rejects file.
:func:`convert_files` is the whole job: it claims ``out`` and the rejects file before it reads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tunelab.data.readers import ConversationFormat, Kind, ReadResult, check_read, iter_canonical
from tunelab.data.records import LoadReport
from tunelab.datatools.jsonl_output import claim_job_outputs, provenance, write_jsonl
from tunelab.progress import progress_bar


def rejects_path_for(out: str | Path, rejects_path: str | Path | None = None) -> Path:
    """The rejects file of ``--out data.jsonl``: ``rejects_path`` when given, else ``data.rejects.jsonl`` beside it."""
    if rejects_path:
        return Path(rejects_path)
    out = Path(out)
    stem = out.name.removesuffix(".gz").removesuffix(".jsonl").removesuffix(".json")
    return out.with_name(f"{stem}.rejects.jsonl")


def write_rejects(rejects: list[dict[str, Any]], out: str | Path, rejects_path: str | Path | None) -> Path | None:
    """Write rejected rows beside ``out`` (or to ``rejects_path``); returns the file, or None if nothing was rejected.

    With nothing rejected, a default rejects file left by an earlier run is removed: a stale list
    would mislead.
    """
    rejects_file = rejects_path_for(out, rejects_path)
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
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> ConvertResult:
    """Convert data files to canonical JSONL at ``out``, each record with a ``provenance``.

    Rejected rows (with their reason and ``file:line``) go to ``rejects_path`` (default
    ``<out stem>.rejects.jsonl``), which is only written when something was rejected. Before
    anything is read, a missing input is named and ``out`` and the rejects file are claimed:
    existing ones are refused unless ``overwrite``, an input always.

    Args:
        overwrite: replace ``out`` and the rejects file of an earlier run.
        progress: show a progress display on stderr.

    Raises:
        DataError: a missing input; otherwise see :func:`read_canonical`.
        OutputError: an output exists (without ``overwrite``) or is an input.
    """
    files = list(files)
    claim_job_outputs(files, [out, rejects_path_for(out, rejects_path)], overwrite)
    with progress_bar(f"converting {', '.join(files)}", enabled=progress):
        return _convert(files, out, kind, fmt, text_field, system_prompt, on_error, rejects_path)


def _convert(files: list[str], out: str | Path, kind: Literal["auto"] | Kind, fmt: ConversationFormat,
             text_field: str, system_prompt: str | None, on_error: Literal["fail", "skip"],
             rejects_path: str | Path | None) -> ConvertResult:
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
