"""Which kind of record each training objective reads, checked on the first records of every file.

Without this check, DPO on SFT conversations fails on the first record with "no 'chosen' field"
and suggests ``data.on_error: skip``, which would drop every record. A file none of whose first
records is of a kind the objective reads is a mismatch of data and objective, and is reported as
one, with the objectives that do read it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tunelab.data.readers import detect_kind
from tunelab.data.files import read_rows
from tunelab.errors import DataError

# an objective's data kind (its registry entry, tunelab.train.objectives.registry) -> the record kinds it reads
RECORD_KINDS: dict[str, tuple[str, ...]] = {
    "conversations": ("conversation",),
    "text": ("text", "conversation"),
    "pairs": ("preference",),
    "feedback": ("feedback",),
    "prompts": ("prompt", "conversation"),
}
DESCRIPTIONS = {
    "conversation": "conversations (messages, alpaca or sharegpt records with an answer)",
    "text": "plain text",
    "preference": "preference pairs (prompt, chosen, rejected)",
    "feedback": "answers labelled desirable or not (messages or prompt + completion, and a boolean label)",
    "prompt": "prompts (with an optional reference answer)",
}


def objectives_for(kind: str, data_kinds: Mapping[str, str]) -> list[str]:
    """The objectives that train on records of ``kind`` (``data_kinds``: objective -> its data kind)."""
    return [objective for objective, data in data_kinds.items() if kind in RECORD_KINDS[data]]


def check_data_kind(files: Iterable[str], objective: str, data_kinds: Mapping[str, str], sample: int = 100) -> None:
    """Fail when none of a file's first ``sample`` readable records is of a kind ``objective`` trains on.

    ``data_kinds`` maps every objective to its data kind (the caller has the registry: data does not
    import train).

    Only the kind is checked; bad records are left to the loaders (and ``data.on_error``): one
    record of the right kind among them (an alpaca record without its output reads as a prompt)
    leaves the file to the loader, which counts what it skips.

    Raises:
        DataError: naming the file and line of the first record, the kind found, the kind needed and
            the objectives that read this data.
    """
    wanted = RECORD_KINDS[data_kinds[objective]]
    for name in files:
        first: tuple[str, str] | None = None  # (source, kind) of the first record of a kind not wanted
        seen = 0
        for row in read_rows(name):
            if row.error is not None:
                continue
            try:
                kind = detect_kind(row.data, row.source)
            except DataError:
                kind = None  # a bad record: the loader reports it
            if kind in wanted:
                first = None
                break
            if kind is not None and first is None:
                first = (row.source, kind)
            seen += 1
            if seen >= sample:
                break
        if first is not None:
            source, kind = first
            raise DataError(
                f"{source}: this file holds {DESCRIPTIONS[kind]}, but train.objective {objective} trains on "
                f"{' or '.join(DESCRIPTIONS[k] for k in wanted)}: the data does not match the objective "
                f"(data.on_error: skip would drop every record). Use data of that kind, or an objective for this "
                f"data: {', '.join(objectives_for(kind, data_kinds))}")
