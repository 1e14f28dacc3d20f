"""Reading raw rows from data files, each with the place it came from (``file:line``).

Supported: JSON (an array of objects, or one object per line), JSONL, CSV, Parquet and TXT
(one record per non-empty line), the text types also gzipped (``.jsonl.gz``), and a hub dataset
id (``owner/name`` or ``owner/name:split``)
when the network is reachable. Unreadable input raises :class:`DataError` naming file and line.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import DataError
from tunelab.hub import hub_unavailable, looks_like_hub_id

SUFFIXES = {".json", ".jsonl", ".csv", ".parquet", ".txt"}


@dataclass
class Row:
    """One raw record and where it came from; ``error`` says why a line could not be read as one.

    A line-level error (a malformed JSONL line, a CSV row with the wrong number of fields, a
    non-UTF-8 line in JSONL/TXT) leaves the rest of the file readable, so it is reported per
    row and ``data.on_error: skip`` can drop it. Errors that make the whole file unreadable
    (a broken JSON array, an unsupported type) raise :class:`DataError` at once.
    """

    data: Any
    source: str
    error: str | None = None


def _decode_lines(path: Path) -> tuple[list[str], dict[int, str]]:
    """The file's lines as text, and the line numbers (1-based) that are not UTF-8, with why."""
    lines: list[str] = []
    errors: dict[int, str] = {}
    try:
        raw = path.read_bytes()
        if path.suffix.lower() == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; a cut-off gzip an EOFError
        if path.suffix.lower() == ".gz" and not isinstance(exc, PermissionError | FileNotFoundError):
            raise DataError(f"{path}: not a readable gzip file ({exc}); is it really gzipped, and complete?") from None
        raise DataError(f"{path}: cannot read the file ({getattr(exc, 'strerror', None) or exc})") from None
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            lines.append(line.decode("utf-8").removesuffix("\r"))  # CRLF line ends, as text mode reads them
        except UnicodeDecodeError as exc:
            errors[number] = (
                f"not UTF-8 text (byte 0x{line[exc.start]:02x} at byte {exc.start + 1} of the line); "
                "re-encode the file as UTF-8"
            )
            lines.append("")
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]
    return lines, errors


def _fail_on_encoding(path: Path, errors: dict[int, str]) -> None:
    """JSON arrays and CSV cannot be read around a bad line: stop at the first one."""
    if errors:
        first = min(errors)
        raise DataError(f"{path}:{first}: {errors[first]}")


def _json_rows(path: Path, lines: list[str], errors: dict[int, str]) -> Iterator[Row]:
    text = "\n".join(lines)
    stripped = text.lstrip()
    if stripped.startswith("["):
        _fail_on_encoding(path, errors)
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON at column {exc.colno}: {exc.msg}") from None
        for index, line in _array_item_lines(text, len(items)):
            yield Row(items[index], f"{path}:{line}")
        return
    if stripped.startswith("{") and "\n" in stripped.rstrip():
        _reject_single_object(path, text)
    yield from _jsonl_rows(path, lines, errors)


def _reject_single_object(path: Path, text: str) -> None:
    """A whole file that is one multi-line JSON object reads as bad JSONL; say what it really is."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return  # JSONL (several objects) or broken JSON: the line-by-line reader names the line
    if isinstance(whole, dict):
        raise DataError(
            f"{path}:1: the file is one JSON object (keys {sorted(whole)}), not records; "
            "write a JSON array of records ([{...}, ...]) or one record per line (JSONL)"
        )


def _array_item_lines(text: str, count: int) -> Iterator[tuple[int, int]]:
    """Line number (1-based) where each top-level array element starts."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    line = text.count("\n", 0, position) + 1
    for index in range(count):
        while text[position] in " \t\r\n,":
            if text[position] == "\n":
                line += 1
            position += 1
        yield index, line
        _, end = decoder.raw_decode(text, position)
        line += text.count("\n", position, end)
        position = end


def _jsonl_rows(path: Path, lines: list[str], errors: dict[int, str]) -> Iterator[Row]:
    for number, line in enumerate(lines, start=1):
        source = f"{path}:{number}"
        if number in errors:
            yield Row(None, source, errors[number])
            continue
        if not line.strip():
            continue
        try:
            yield Row(json.loads(line), source)
        except json.JSONDecodeError as exc:
            yield Row(None, source, f"invalid JSON at column {exc.colno}: {exc.msg}")


def _text_rows(path: Path, lines: list[str], errors: dict[int, str]) -> Iterator[Row]:
    for number, line in enumerate(lines, start=1):
        if number in errors:
            yield Row(None, f"{path}:{number}", errors[number])
        elif line.strip():
            yield Row(line, f"{path}:{number}")


def _csv_rows(path: Path, lines: list[str], errors: dict[int, str]) -> Iterator[Row]:
    _fail_on_encoding(path, errors)
    reader = csv.reader(io.StringIO("\n".join(lines)))
    try:
        header = next(reader, None)
        if header is None:
            return
        previous = reader.line_num
        for values in reader:
            start, previous = previous + 1, reader.line_num
            if not values:
                continue
            if len(values) != len(header):
                yield Row(None, f"{path}:{start}", f"{len(values)} fields where the header has {len(header)}")
                continue
            yield Row(dict(zip(header, values)), f"{path}:{start}")
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: invalid CSV: {exc}") from None


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: cannot read Parquet: {exc}") from None
    for index, row in enumerate(table.to_pylist()):
        yield Row(row, f"{path}:row {index + 1}")


def _hub_rows(name: str) -> Iterator[Row]:
    import datasets

    dataset_id, _, split = name.partition(":")
    problem = hub_unavailable(dataset_id, "data file", ("README.md", ".gitattributes"), repo_type="dataset")
    if problem:
        raise DataError(problem)
    try:
        dataset = datasets.load_dataset(dataset_id, split=split or "train")
    except Exception as exc:  # network, auth and missing-dataset errors all end here
        raise DataError(
            f"{name}: not a local file, and loading it as a hub dataset failed ({type(exc).__name__}: {exc}). "
            "Offline? Download the data and point data.train at the file."
        ) from None
    for index, row in enumerate(dataset):
        yield Row(row, f"{name}:row {index + 1}")


def _is_hub_id(name: str) -> bool:
    return ("/" in name and looks_like_hub_id(name.partition(":")[0])
            and Path(name).suffix not in (*SUFFIXES, ".gz"))


def check_inputs_exist(names: list[str]) -> None:
    """Raise :class:`DataError` for the first input that is neither a file nor a hub dataset id (before any work)."""
    for name in names:
        if not Path(name).expanduser().exists() and not _is_hub_id(name):
            raise DataError(f"{name}: data file not found")


def read_rows(name: str) -> Iterator[Row]:
    """Yield the raw rows of one data file (or hub dataset id), each with its ``file:line``.

    Rows whose line cannot be read carry an ``error`` (see :class:`Row`).

    Raises:
        DataError: missing file, unknown extension, a broken JSON array or CSV, or no records.
    """
    path = Path(name).expanduser()
    if not path.exists():
        if _is_hub_id(name):
            yield from _hub_rows(name)
            return
        raise DataError(f"{name}: data file not found")
    if path.is_dir():
        raise DataError(f"{name}: is a directory; name the data file(s) inside it")
    suffix = path.suffix.lower()
    if suffix == ".gz":  # data.jsonl.gz: gzip around a supported type
        suffix = Path(path.stem).suffix.lower()
    if suffix not in SUFFIXES or (path.suffix.lower() == ".gz" and suffix == ".parquet"):
        raise DataError(f"{name}: unsupported file type {suffix!r}; use one of {', '.join(sorted(SUFFIXES))} "
                        "(optionally gzipped: .jsonl.gz)")
    count = 0
    if suffix == ".parquet":
        rows: Iterator[Row] = _parquet_rows(path)
    else:
        lines, errors = _decode_lines(path)
        if suffix in (".json", ".jsonl"):
            rows = _json_rows(path, lines, errors)
        elif suffix == ".csv":
            rows = _csv_rows(path, lines, errors)
        else:
            rows = _text_rows(path, lines, errors)
    for row in rows:
        count += 1
        yield row
    if count == 0:
        raise DataError(f"{name}: no records (the file is empty or holds only blank lines or an empty array)")


def file_fingerprint(name: str) -> str:
    """A content hash of a data file (or the id itself for a hub dataset)."""
    path = Path(name).expanduser()
    if not path.is_file():
        return hashlib.sha256(name.encode()).hexdigest()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
