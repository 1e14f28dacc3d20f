"""Train/val/test splits: ``tunelab data split``.

Records are assigned by a seeded permutation, so the same inputs, ratios and seed always give
the same split; each split keeps the input order. Split sizes use largest remainders, so they
add up to the number of records and differ from ``ratio * n`` by less than one.

``stratify`` keeps each value of a field (``label``, ``task``, ``provenance.tool``: a dotted path
into the raw record) in the same proportions in every split, by splitting each stratum on its
own. ``group`` keeps the records that share a value together (all variants built from one
source, all turns of one dialogue), so no group leaks across splits.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tunelab.data.readers import ConversationFormat, Kind, read_canonical
from tunelab.datatools.jsonl_output import claim_job_outputs, write_jsonl
from tunelab.data.records import LoadReport
from tunelab.errors import DataError, TunelabError
from tunelab.progress import progress_bar

SPLIT_NAMES = ("train", "val", "test")
_MISSING = object()


def parse_ratios(text: str) -> tuple[float, ...]:
    """``"0.8,0.1,0.1"`` -> (0.8, 0.1, 0.1): two or three non-negative ratios that add up to 1.

    Raises:
        TunelabError: not numbers, a negative one, the wrong count, or a sum other than 1.
    """
    try:
        ratios = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise TunelabError(f"--ratios {text!r}: expected numbers like 0.8,0.1,0.1") from None
    return _checked_ratios(ratios, text)


def _checked_ratios(ratios: tuple[float, ...], text: str | None = None) -> tuple[float, ...]:
    """``ratios`` when they are two or three non-negative numbers adding up to 1 (``text``: as the user wrote them)."""
    text = text if text is not None else ",".join(f"{r:g}" for r in ratios)
    if len(ratios) not in (2, 3) or any(r < 0 for r in ratios) or ratios[0] <= 0:
        raise TunelabError(f"--ratios {text!r}: give train,val or train,val,test (non-negative, train above 0)")
    if abs(sum(ratios) - 1) > 1e-6:
        raise TunelabError(f"--ratios {text!r} add up to {sum(ratios):g}; they must add up to 1")
    return ratios


def allocate(count: int, ratios: tuple[float, ...]) -> list[int]:
    """Split ``count`` items by ``ratios`` with largest remainders (sizes add up to ``count``)."""
    exact = [count * r for r in ratios]
    sizes = [int(x) for x in exact]
    by_remainder = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in by_remainder[: count - sum(sizes)]:
        sizes[i] += 1
    return sizes


def field_value(raw: Any, path: str) -> Any:
    """The value at a dotted path (``provenance.tool``) of a raw record, or a sentinel when missing."""
    value = raw
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def allocate_strata(sizes: list[int], ratios: tuple[float, ...], rng: np.random.Generator) -> list[list[int]]:
    """Split sizes for each stratum: within one of ``ratio * size`` each, adding up to the unstratified sizes.

    Each stratum gets the floor of its quotas; the leftover units go to the splits with the
    largest fractional quotas, within the split totals a plain split would have, so rounding
    errors do not pile up on one split across many small strata.
    """
    totals = allocate(sum(sizes), ratios)
    table = [[int(size * r) for r in ratios] for size in sizes]
    room = [total - sum(row[k] for row in table) for k, total in enumerate(totals)]
    tiebreak = rng.random(len(sizes))
    wanted = sorted(
        ((size * r - int(size * r), tiebreak[s], s, k) for s, size in enumerate(sizes) for k, r in enumerate(ratios)),
        reverse=True,
    )
    missing = [size - sum(row) for size, row in zip(sizes, table)]
    for fraction, _, stratum, split in wanted:
        if missing[stratum] and room[split] and fraction > 0:
            table[stratum][split] += 1
            missing[stratum] -= 1
            room[split] -= 1
    for stratum in range(len(sizes)):  # rare: the splits this stratum leans to are full
        for split in range(len(ratios)):
            extra = min(missing[stratum], room[split])
            table[stratum][split] += extra
            missing[stratum] -= extra
            room[split] -= extra
    return table


def assign_splits(
    count: int,
    ratios: tuple[float, ...],
    seed: int,
    strata: list[Any] | None = None,
    groups: list[Any] | None = None,
) -> list[int]:
    """The split index (0 train, 1 val, 2 test) of each of ``count`` items.

    Args:
        count: number of items.
        ratios: share of each split.
        seed: seed of the permutation.
        strata: a hashable stratum per item (None: no stratification).
        groups: a hashable group per item (None: every item is its own group); a group's
            stratum is that of its first item. Sizes count groups, not items.
    """
    group_of = groups if groups is not None else list(range(count))
    units: dict[Any, list[int]] = {}
    for index, group in enumerate(group_of):
        units.setdefault(group, []).append(index)
    unit_list = list(units.values())
    by_stratum: dict[Any, list[int]] = defaultdict(list)
    for unit_index, members in enumerate(unit_list):
        by_stratum[strata[members[0]] if strata is not None else None].append(unit_index)
    rng = np.random.default_rng(seed)
    names = sorted(by_stratum, key=repr)  # a fixed order: the draws do not depend on the order records come in
    table = allocate_strata([len(by_stratum[name]) for name in names], ratios, rng)
    assignment = [0] * count
    for name, sizes in zip(names, table):
        unit_indices = by_stratum[name]
        order = rng.permutation(len(unit_indices))
        bounds = np.cumsum([0] + sizes)
        for split, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            for position in order[start:end]:
                for member in unit_list[unit_indices[position]]:
                    assignment[member] = split
    return assignment


@dataclass
class SplitReport:
    """How many records each split got, by stratum when stratified."""

    read: LoadReport
    counts: dict[str, int] = field(default_factory=dict)
    by_stratum: dict[str, dict[str, int]] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    groups: int | None = None

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        total = sum(self.counts.values())
        out = [", ".join(f"{name} {count:,} ({count / total:.1%})" for name, count in self.counts.items())
               + (f"; {self.groups:,} groups kept whole" if self.groups is not None else "")]
        for stratum, counts in self.by_stratum.items():
            out.append(f"  {stratum}: " + ", ".join(f"{name} {count:,}" for name, count in counts.items()))
        if self.read.skipped:
            out.append(self.read.summary())
        return out


def split_files(
    files: list[str],
    out_dir: str | Path,
    ratios: tuple[float, ...] | str = (0.8, 0.1, 0.1),
    seed: int = 0,
    *,
    stratify: str | None = None,
    group: str | None = None,
    kind: Literal["auto"] | Kind = "auto",
    fmt: ConversationFormat = "auto",
    text_field: str = "text",
    overwrite: bool = False,
    progress: bool = True,
) -> SplitReport:
    """Split data files into ``out_dir/{train,val,test}.jsonl`` (canonical JSONL; a 0 ratio writes no file).

    ``ratios`` may be the ``--ratios`` text (``"0.8,0.1,0.1"``, checked by :func:`parse_ratios`).
    The ratios are checked first, then a missing input is named and the three split files are
    claimed (existing ones refused unless ``overwrite``, an input always), then the work starts.

    Args:
        overwrite: replace the split files of an earlier run.
        progress: show a progress display on stderr.

    Raises:
        DataError: a missing or unreadable input, no usable record, or (``stratify``) a record
            without the field.
        TunelabError: bad ratios, or a split would be empty.
        OutputError: a split file exists (without ``overwrite``) or is an input.
    """
    ratios = parse_ratios(ratios) if isinstance(ratios, str) else _checked_ratios(tuple(ratios))
    files = list(files)
    claim_job_outputs(files, [Path(out_dir) / f"{name}.jsonl" for name in SPLIT_NAMES], overwrite)
    with progress_bar(f"splitting {', '.join(files)}", enabled=progress):
        return _split(files, Path(out_dir), ratios, seed, stratify, group, kind, fmt, text_field)


def _split(files: list[str], out_dir: Path, ratios: tuple[float, ...], seed: int, stratify: str | None,
           group: str | None, kind: Literal["auto"] | Kind, fmt: ConversationFormat, text_field: str) -> SplitReport:
    read = read_canonical(files, kind, fmt, text_field)
    records = read.records
    strata = None
    if stratify:
        strata = []
        for record in records:
            value = field_value(record.raw if isinstance(record.raw, dict) else record.data, stratify)
            if value is _MISSING:
                value = field_value(record.data, stratify)
            if value is _MISSING:
                raise DataError(f"{record.source}: no field '{stratify}' to stratify by; "
                                "every record needs it (or split without --stratify)")
            strata.append(_hashable(value))
    groups = None
    if group:
        groups = []
        for index, record in enumerate(records):
            value = field_value(record.raw if isinstance(record.raw, dict) else record.data, group)
            if value is _MISSING:
                value = field_value(record.data, group)
            groups.append(("group", _hashable(value)) if value is not _MISSING else ("record", index))
    assignment = assign_splits(len(records), ratios, seed, strata, groups)
    names = SPLIT_NAMES[: len(ratios)]
    report = SplitReport(read.report, groups=len(set(groups)) if groups is not None else None)
    buckets: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for record, split in zip(records, assignment):
        buckets[names[split]].append(record.data)
    for name, ratio in zip(names, ratios):
        if ratio > 0 and not buckets[name]:
            raise TunelabError(f"the {name} split would be empty ({len(records)} records, ratios "
                               f"{','.join(f'{r:g}' for r in ratios)}); use more data or a larger {name} ratio")
    for name, ratio in zip(names, ratios):
        path = out_dir / f"{name}.jsonl"
        if ratio > 0:
            write_jsonl(path, buckets[name])
            report.paths[name] = path
        elif path.exists():
            path.unlink()  # a split from an earlier run with other ratios would be taken for this one's
        report.counts[name] = len(buckets[name])
    if strata is not None:
        per_stratum: dict[Any, Counter] = defaultdict(Counter)
        for stratum, split in zip(strata, assignment):
            per_stratum[stratum][names[split]] += 1
        for stratum in sorted(per_stratum, key=lambda s: (-sum(per_stratum[s].values()), repr(s))):
            report.by_stratum[str(stratum)] = {name: per_stratum[stratum][name] for name in names}
    return report


def _hashable(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return value
