"""Writing canonical JSONL: what every ``tunelab data`` command produces.

Canonical objects (each reads back with the normal readers, ``format: auto``):
``{"messages": [...]}`` (conversation), ``{"text": ...}``, ``{"messages": [...], "reference": ...}``
(prompt), ``{"prompt": [...], "chosen": [...], "rejected": [...]}`` (preference) and
``{"messages": [...], "label": true}`` (KTO feedback). Generated or transformed records carry a
``provenance`` object saying which tool made them from which source record.

Every data job claims its outputs with :func:`claim_job_outputs` before it reads anything, so a
library caller gets the same protection as the command line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tunelab.data.files import check_inputs_exist
from tunelab.outputs import atomic_output, claim_files


def claim_job_outputs(inputs: Sequence[str | Path], outputs: Sequence[str | Path], overwrite: bool = False) -> None:
    """Check, before any work, that a data job may read ``inputs`` and write ``outputs``.

    A missing input is named first; then an output that already exists is refused unless
    ``overwrite``, and an output that is one of the inputs is refused always.

    Raises:
        DataError: an input is neither a file nor a hub dataset id.
        OutputError: an output exists (without ``overwrite``), is a directory, or is an input.
    """
    check_inputs_exist([str(name) for name in inputs])
    claim_files(outputs, overwrite, "--out", inputs)


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
