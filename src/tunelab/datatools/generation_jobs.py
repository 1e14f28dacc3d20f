"""What the generation-backed data tools (``data augment``, ``data synth``) share.

Reading their inputs (through :func:`tunelab.data.readers.read_canonical`, the data tools'
reader), stable record ids, the generator with its default on-disk cache, and the files a job
writes beside ``--out``: ``<stem>.report.json`` (always), ``<stem>.failed.jsonl`` (requests that
gave no usable reply) and ``<stem>.rejects.jsonl`` (generated items a filter refused). A job claims
them all with :func:`claim_generation_outputs` before its backend loads, and takes the backend as
an object or as a :class:`BackendSpec` that it loads only after that.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunelab.data.readers import Kind, read_canonical
from tunelab.datatools.jsonl_output import claim_job_outputs, write_jsonl
from tunelab.data.records import LoadReport
from tunelab.errors import DataError
from tunelab.generation.backends import GenerationBackend, parse_backend_spec
from tunelab.generation.cache import ReplyCache, default_cache_path
from tunelab.generation.runner import Generator


@dataclass
class SourceItem:
    """One input record in canonical form, where it came from and its id."""

    data: dict[str, Any]
    source: str
    id: str
    kind: Kind


def content_id(data: Any) -> str:
    """A stable id from a record's content: 16 hex digits of the sha256 of its canonical JSON."""
    blob = json.dumps(data, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def read_sources(
    files: Iterable[str], kinds: tuple[Kind, ...], kind: Literal["auto"] | Kind = "auto", text_field: str = "text",
    what: str = "this tool", limit: int | None = None,
) -> tuple[list[SourceItem], LoadReport]:
    """Read input files into canonical records; bad rows are skipped and counted.

    A record keeps its own ``id`` when it has one; otherwise its id is :func:`content_id` of
    its canonical form (the same record gets the same id in every run).

    Args:
        files: data files.
        kinds: the kinds of record the tool works on.
        kind: read every file as this kind, or ``auto`` to decide per file.
        text_field: the field holding text for ``text`` records (e.g. ``dialogue``).
        what: the tool's name, for the error message.
        limit: keep only the first this many records (to try a job on a few first).

    Raises:
        DataError: unreadable files, a mix of kinds, no usable record, or a kind the tool does
            not take.
    """
    files = list(files)
    result = read_canonical(files, kind, text_field=text_field)
    if result.kind not in kinds:
        raise DataError(f"{', '.join(files)}: {result.kind} records; {what} works on {' or '.join(kinds)} records"
                        + (" (pass --kind text --text-field FIELD to read a field as text)" if "text" in kinds else ""))
    items = []
    for record in result.records[:limit]:
        data = {key: value for key, value in record.data.items() if key not in ("id", "provenance")}
        own_id = record.data.get("id")
        record_id = str(own_id) if own_id not in (None, "") else content_id(data)
        items.append(SourceItem(data, record.source, record_id, result.kind))
    return items, result.report


def side_path(out: str | Path, suffix: str) -> Path:
    """``data.jsonl`` + ``report.json`` -> ``data.report.json``, beside the output."""
    out = Path(out)
    stem = out.name.removesuffix(".gz").removesuffix(".jsonl").removesuffix(".json")
    return out.with_name(f"{stem}.{suffix}")


def claim_generation_outputs(files: Iterable[str], out: str | Path, suffixes: tuple[str, ...],
                             overwrite: bool = False) -> None:
    """Claim ``out`` and the ``<stem>.SUFFIX`` files beside it before any work (see :func:`claim_job_outputs`)."""
    claim_job_outputs(list(files), [out, *(side_path(out, suffix) for suffix in suffixes)], overwrite)


@dataclass(frozen=True)
class BackendSpec:
    """A generation backend as the command line names it, loaded by the job only once its outputs are claimed.

    Attributes:
        spec: ``hf:MODEL_DIR`` or ``openai:BASE_URL`` (see :func:`parse_backend_spec`).
        model: the model name on an ``openai:`` server.
        options: passed to the backend (``concurrency``, ``timeout``, ``batch_size``, ...).
    """

    spec: str
    model: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def load(self) -> GenerationBackend:
        """The backend (an ``hf:`` one loads its model now)."""
        return parse_backend_spec(self.spec, self.model, **self.options)


def load_backend(backend: GenerationBackend | BackendSpec) -> GenerationBackend:
    """``backend`` itself, or the backend a :class:`BackendSpec` names, loaded now."""
    return backend.load() if isinstance(backend, BackendSpec) else backend


def make_generator(
    backend: GenerationBackend, cache: str | Path | None | Literal[False] = None, attempts: int = 3,
    progress: bool = True, description: str = "generating",
) -> Generator:
    """A generator for a data job.

    Args:
        backend: the model.
        cache: the reply cache file; None: the default one for this backend under
            ``$TUNELAB_CACHE/generations``; False: no cache file (nothing survives the run).
        attempts: replies asked for per request when they come back unusable.
        progress: show progress bars.
        description: the progress bar's label.
    """
    if cache is False:
        path = None
    else:
        path = Path(cache) if cache is not None else default_cache_path(backend.name)
    return Generator(backend, ReplyCache(path, error=DataError), attempts=attempts, progress=progress,
                     description=description)


def write_side_file(out: str | Path, suffix: str, rows: list[dict[str, Any]]) -> Path | None:
    """Write ``rows`` to ``<stem>.<suffix>`` beside ``out``; with no rows, remove a stale file from an earlier run."""
    path = side_path(out, suffix)
    if rows:
        write_jsonl(path, rows)
        return path
    path.unlink(missing_ok=True)
    return None


def write_report(out: str | Path, report: dict[str, Any]) -> Path:
    """Write the job's report as ``<stem>.report.json`` beside ``out``."""
    path = side_path(out, "report.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
