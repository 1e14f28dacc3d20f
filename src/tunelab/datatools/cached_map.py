"""Per-record work at scale for the data tools: an Arrow ``map`` over worker processes, cached on disk.

The data tools (clean, build, cot, stats) turn each record into a few columns (hashes,
signatures, lengths, rendered text). :func:`map_cached` runs that function with
``datasets.Dataset.map`` (batched, ``num_proc`` workers for large inputs) and saves the result
under ``$TUNELAB_CACHE/data/<fingerprint>`` (the same root as the training tokenization cache),
so a second run with the same inputs and settings loads the Arrow files instead of recomputing.
The caller builds the fingerprint from everything that decides the output (file contents,
options, a version number).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PARALLEL_MIN_ROWS = 20_000  # below this, starting worker processes costs more than it saves
PROGRESS_MIN_ITEMS = 5_000  # loops shorter than this finish before a bar is worth drawing


def cache_root() -> Path:
    """``$TUNELAB_CACHE/data`` (default ``~/.cache/tunelab/data``): where tokenized data is cached too."""
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab")) / "data"


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of JSON-serialisable parts (file hashes, options, versions)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def directory_fingerprint(path: str | Path, option: str) -> str:
    """A hash of the tokenizer files in a directory, so an edited tokenizer misses the cache.

    Raises:
        TunelabError: ``path`` is not a directory (``option`` names the flag in the message).
    """
    from tunelab.data.files import file_fingerprint
    from tunelab.errors import TunelabError

    directory = Path(path)
    if not directory.is_dir():
        raise TunelabError(f"{option} {path}: not a directory (give a tokenizer or model directory)")
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and "token" in p.name)
    return fingerprint([(name, file_fingerprint(str(directory / name))) for name in names])


def resolve_num_proc(num_proc: int | None, rows: int) -> int:
    """Worker processes to use: ``num_proc`` if given, else one per core (at most 4) for large inputs."""
    if num_proc is not None:
        return max(1, num_proc)
    if rows < PARALLEL_MIN_ROWS:
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def map_cached(
    rows: list[dict[str, Any]],
    function: Callable[[dict[str, list]], dict[str, list]],
    *,
    key: str,
    desc: str,
    num_proc: int | None = None,
    batch_size: int = 500,
    use_cache: bool = True,
):
    """Apply a batched ``function`` to ``rows`` with ``datasets.map`` and cache the result by ``key``.

    Args:
        rows: flat records (the same keys in every row, plain values).
        function: a picklable batched map function (columns in, columns out); the input
            columns are dropped from the result.
        key: the cache key (see :func:`fingerprint`); equal keys must mean equal results.
        desc: progress bar label.
        num_proc: worker processes (default: see :func:`resolve_num_proc`).
        batch_size: rows per call of ``function``.
        use_cache: read and write the on-disk cache.

    Returns:
        A ``datasets.Dataset`` with the function's columns, in the order of ``rows``.
    """
    import datasets

    target = cache_root() / f"map-{key}"
    if use_cache and (target / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(target))
    dataset = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({})
    procs = resolve_num_proc(num_proc, len(rows))
    mapped = dataset.map(
        function, batched=True, batch_size=batch_size, num_proc=procs if procs > 1 else None,
        remove_columns=dataset.column_names, desc=desc,
    )
    if use_cache:
        temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(temporary, ignore_errors=True)
        was_enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            mapped.save_to_disk(str(temporary))
        finally:
            if was_enabled:
                datasets.enable_progress_bars()
        shutil.rmtree(target, ignore_errors=True)
        temporary.rename(target)
        mapped = datasets.load_from_disk(str(target))  # memory-mapped: the in-memory copy can go
    return mapped


def columns(dataset, *names: str) -> list[list[Any]]:
    """Whole columns of a ``datasets.Dataset`` as Python lists, read from Arrow in one go.

    (``dataset[name][i]`` in a loop goes through the row formatter each time: 100x slower.)
    """
    return [dataset.data.column(name).to_pylist() for name in names]


def batch_rows(batch: dict[str, list], indices: list[int] | None) -> tuple[list[dict[str, Any]], list[str]]:
    """The raw rows of a batched ``map`` call, and where each came from.

    The data tools map a ``raw`` (JSON text) and ``source`` column; a user's own dataset maps its
    own columns, whose rows are named ``row N``.
    """
    if "raw" in batch:
        return [json.loads(raw) for raw in batch["raw"]], batch["source"]
    names = list(batch)
    rows = [dict(zip(names, values)) for values in zip(*(batch[n] for n in names))]
    return rows, [f"row {i + 1}" for i in (indices or range(len(rows)))]


def progress(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    """Iterate with a progress bar on stderr when there are enough items to be worth one."""
    if total < PROGRESS_MIN_ITEMS:
        yield from items
        return
    from rich.console import Console
    from rich.progress import track

    yield from track(items, description=description, total=total, transient=True, console=Console(stderr=True))
