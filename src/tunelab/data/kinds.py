"""Which kind of record each training objective reads, checked on the first records of every file.

Without this check, DPO on SFT conversations fails on the first record with "no 'chosen' field"
and suggests ``data.on_error: skip``, which would drop every record. A file none of whose first
records is of a kind the objective reads is a mismatch of data and objective, and is reported as
one, with the objectives that do read it.
"""

from __future__ import annotations

from collections.abc import Iterable

from tunelab.data.convert import detect_kind
from tunelab.data.files import read_rows
from tunelab.errors import DataError

# objective -> the record kinds it trains on
OBJECTIVE_KINDS: dict[str, tuple[str, ...]] = {
    "sft": ("conversation",),
    "pretrain": ("text", "conversation"),
    "reward": ("preference",), "dpo": ("preference",), "simpo": ("preference",), "orpo": ("preference",),
    "kto": ("feedback",),
    "grpo": ("prompt", "conversation"), "ppo": ("prompt", "conversation"),
}
DESCRIPTIONS = {
    "conversation": "conversations (messages, alpaca or sharegpt records with an answer)",
    "text": "plain text",
    "preference": "preference pairs (prompt, chosen, rejected)",
    "feedback": "answers labelled desirable or not (messages or prompt + completion, and a boolean label)",
    "prompt": "prompts (with an optional reference answer)",
}


def objectives_for(kind: str) -> list[str]:
    """The objectives that train on records of ``kind``."""
    return [objective for objective, kinds in OBJECTIVE_KINDS.items() if kind in kinds]


def check_data_kind(files: Iterable[str], objective: str, sample: int = 100) -> None:
    """Fail when none of a file's first ``sample`` readable records is of a kind ``objective`` trains on.

    Only the kind is checked; bad records are left to the loaders (and ``data.on_error``): one
    record of the right kind among them (an alpaca record without its output reads as a prompt)
    leaves the file to the loader, which counts what it skips.

    Raises:
        DataError: naming the file and line of the first record, the kind found, the kind needed and
            the objectives that read this data.
    """
    wanted = OBJECTIVE_KINDS.get(objective)
    if wanted is None:
        return
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
                f"data: {', '.join(objectives_for(kind))}")
