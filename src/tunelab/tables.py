"""Tables printed by listing commands: ``--format table|json|csv``.

``table`` is a rich table on a terminal and plain aligned text, never truncated or wrapped,
when stdout is a file or a pipe (cron and CI logs); ``csv`` and ``json`` are for programs.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

FORMATS = ("table", "json", "csv")


def add_format_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--format table|json|csv`` to a listing command."""
    parser.add_argument("--format", choices=FORMATS, default="table",
                        help="table: aligned columns (plain text when stdout is not a terminal); json; csv")


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """Columns padded with spaces, every cell whole: what a log file or ``grep`` wants."""
    cells = [[str(h) for h in headers], *[["" if v is None else str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [title] if title else []
    for index, row in enumerate(cells):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str = "table", title: str | None = None,
    records: Any = None, row_styles: Sequence[str | None] | None = None, right_align: Sequence[str] = (),
    out: TextIO | None = None,
) -> None:
    """Print rows in the chosen format.

    Args:
        headers: column names.
        rows: one sequence of cells per row (plain values; no rich markup).
        fmt: ``table``, ``json`` or ``csv``.
        title: printed above a table (not in json/csv).
        records: what ``json`` prints (default: the rows as objects keyed by header).
        row_styles: a rich style per row, on a terminal only (e.g. ``"bold red"`` for a drifted feature).
        right_align: columns to right-align in the rich table.
        out: where to print (default stdout).
    """
    out = out or sys.stdout
    if fmt == "json":
        data = records if records is not None else [dict(zip(headers, row)) for row in rows]
        print(json.dumps(data, indent=2, default=str), file=out)
    elif fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(headers)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    elif not out.isatty():
        print(plain_table(headers, rows, title), file=out)
    else:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(title=title)
        for header in headers:
            table.add_column(header, justify="right" if header in right_align else "left", overflow="fold")
        for index, row in enumerate(rows):
            table.add_row(*(Text("" if v is None else str(v)) for v in row),
                          style=row_styles[index] if row_styles else None)
        Console(file=out, soft_wrap=True).print(table, highlight=False)
