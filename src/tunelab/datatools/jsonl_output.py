"""Writing canonical JSONL: what every ``tunelab data`` command produces.

Canonical objects (each reads back with the normal readers, ``format: auto``):
``{"messages": [...]}`` (conversation), ``{"text": ...}``, ``{"messages": [...], "reference": ...}``
(prompt), ``{"prompt": [...], "chosen": [...], "rejected": [...]}`` (preference) and
``{"messages": [...], "label": true}`` (KTO feedback). Generated or transformed records carry a
``provenance`` object saying which tool made them from which source record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tunelab.outputs import atomic_output


def provenance(tool: str, source: str | None = None, **details: Any) -> dict[str, Any]:
    """The ``provenance`` object of a record made by ``tool`` from ``source`` (``file:line``).

    Args:
        tool: the command that made the record, e.g. ``augment/paraphrase``.
        source: where the record it was made from came from (``file:line``), if any.
        details: anything else worth keeping (backend, model, template, seed, ...).
    """
    return {"tool": tool, "source": source, "created": datetime.now(UTC).isoformat(timespec="seconds"), **details}


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line to ``path`` atomically; returns the number of rows.

    The file appears complete or not at all (written to a temporary file, flushed to disk, then
    renamed), so an interrupted job never leaves a half-written output that a later step would train
    on. A full disk or a permission error is an :class:`~tunelab.outputs.OutputError` naming the file.
    """
    path = Path(path)
    count = 0
    with atomic_output(path, directory=False, what="output file") as temporary:
        with temporary.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
    return count
