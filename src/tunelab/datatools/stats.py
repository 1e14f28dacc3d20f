"""Dataset statistics: ``tunelab data stats``.

Writes a report directory: ``stats.json`` (every number), ``token_lengths.png`` (histogram),
``report.md`` (the tables and the terminal sketch). Lengths are in tokens of ``--tokenizer``
(a tokenizer or model directory) as the chat template renders each record, which is what
training sees (the tokenizer's own template, or ``--template``); without a tokenizer they are
whitespace words. A preference pair counts its longer side, a KTO record prompt + completion,
a prompt record the prompt with the generation prompt.

Token counting runs as a ``datasets`` map over worker processes and is cached by fingerprint
(file contents, tokenizer, template), so a second run over the same files is quick.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tunelab.datatools.cached_map import columns, directory_fingerprint, fingerprint, map_cached
from tunelab.data.readers import ConversationFormat, Kind, read_canonical
from tunelab.data.files import file_fingerprint
from tunelab.data.records import detect_format
from tunelab.datatools.jsonl_output import claim_job_outputs
from tunelab.errors import DataError, TunelabError

CACHE_VERSION = 1
SKETCH_WIDTH = 40
REPORT_FILES = ("stats.json", "report.md", "token_lengths.png")
"""What ``stats`` writes into its report directory (all three are claimed, even with ``png=False``)."""


class _LengthCounter:
    """The picklable map function: the token (or word) length of each canonical record."""

    def __init__(self, tokenizer_path: str | None, template: str | None) -> None:
        self.tokenizer_path = tokenizer_path
        self.template = template
        self._tokenizer = None

    def _texts(self, record: dict[str, Any]) -> tuple[list[str], bool]:
        """The texts to measure and whether the tokenizer should add its special tokens."""
        if "text" in record and "messages" not in record:
            return [record["text"]], True
        if self.tokenizer_path is None:
            return [_plain(record)], False
        render = self._tokenizer.apply_chat_template
        if "chosen" in record:
            return [render(record["prompt"] + side, chat_template=self.template, tokenize=False)
                    for side in (record["chosen"], record["rejected"])], False
        generation = "reference" in record and (not record["messages"] or record["messages"][-1]["role"] != "assistant")
        return [render(record["messages"], chat_template=self.template, tokenize=False,
                       add_generation_prompt=generation)], False

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self.tokenizer_path is not None and self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        lengths = []
        for raw in batch["record"]:
            texts, special = self._texts(json.loads(raw))
            if self._tokenizer is None:
                lengths.append(max(len(text.split()) for text in texts))
            else:
                ids = self._tokenizer(texts, add_special_tokens=special)["input_ids"]
                lengths.append(max(len(row) for row in ids))
        return {"length": lengths}


def _plain(record: dict[str, Any]) -> str:
    if "chosen" in record:
        sides = [record["prompt"] + record["chosen"], record["prompt"] + record["rejected"]]
        return max((" ".join(m["content"] for m in side) for side in sides), key=lambda t: len(t.split()))
    return " ".join(m["content"] for m in record["messages"])


def record_layout(kind: Kind, raw: Any, source: str) -> str:
    """The input layout of a raw record: its conversation format, or the preference/KTO layout."""
    if kind == "preference":
        if "chosen_messages" in raw:
            return "preference: full conversations"
        if "conversations" in raw:
            return "preference: sharegpt"
        if "prompt" in raw:
            return "preference: prompt/chosen/rejected"
        if isinstance(raw.get("chosen"), str) and raw["chosen"].startswith("\n\nHuman:"):
            return "preference: HH-RLHF transcripts"
        return "preference: chosen/rejected conversations"
    if kind == "feedback":
        return "feedback (KTO): " + ("messages" if "messages" in raw else "prompt/completion")
    try:
        return f"{kind}: {detect_format(raw, source)}"
    except DataError:
        return kind


def percentiles(lengths: np.ndarray) -> dict[str, float]:
    """min, mean, p50, p90, p95, p99 and max of the lengths."""
    return {"min": float(lengths.min()), "mean": float(lengths.mean()),
            **{f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 95, 99)}, "max": float(lengths.max())}


def histogram(lengths: np.ndarray, bins: int) -> tuple[list[int], list[float]]:
    """Counts and bin edges from 0 to the longest record (integer-aligned edges)."""
    top = max(int(lengths.max()), 1)
    width = max(1, int(np.ceil((top + 1) / bins)))
    edges = np.arange(0, top + width + 1, width, dtype=float)
    counts, edges = np.histogram(lengths, bins=edges)
    return counts.tolist(), edges.tolist()


def terminal_sketch(counts: list[int], edges: list[float], unit: str, width: int = SKETCH_WIDTH) -> str:
    """A horizontal bar chart of a histogram, one line per bin, for the terminal."""
    peak = max(counts) or 1
    label_width = len(f"{int(edges[-1]):,}")
    lines = []
    for count, low, high in zip(counts, edges[:-1], edges[1:]):
        exact = count / peak * width
        bar = "█" * int(exact) + ("▌" if exact - int(exact) >= 0.5 else "")
        if count and not bar:
            bar = "▏"
        lines.append(f"{int(low):>{label_width},}–{int(high) - 1:<{label_width},} {unit} │{bar} {count:,}")
    return "\n".join(lines)


@dataclass
class StatsReport:
    """Everything ``stats`` measured (written to ``stats.json``)."""

    files: list[str]
    kind: str
    records: int
    read: int
    skipped: dict[str, int]
    skipped_first_at: dict[str, str]
    layouts: dict[str, dict[str, int]]
    unit: str
    lengths: dict[str, float]
    histogram: dict[str, list]
    over_max_length: int | None = None
    max_length: int | None = None
    roles: dict[str, int] = field(default_factory=dict)
    turns: dict[str, float] = field(default_factory=dict)
    with_system_prompt: int = 0
    tasks: dict[str, int] = field(default_factory=dict)
    tools: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    from_cache: bool = False
    png: str | None = None

    def lines(self) -> list[str]:
        """The summary printed by ``tunelab data stats``."""
        out = [f"{self.records:,} {self.kind} records (of {self.read:,} read) from {len(self.files)} file(s)"]
        out += [f"{count:,} skipped: {reason} (first at {self.skipped_first_at[reason]})"
                for reason, count in self.skipped.items()]
        for name, layouts in self.layouts.items():
            out.append(f"{name}: " + ", ".join(f"{layout} {count:,}" for layout, count in layouts.items()))
        if self.turns:
            out.append(f"messages per record: mean {self.turns['mean']:.1f}, max {self.turns['max']:.0f}; "
                       f"{self.with_system_prompt:,} with a system prompt; roles: "
                       + ", ".join(f"{role} {count:,}" for role, count in self.roles.items()))
        for title, counts in (("tasks", self.tasks), ("made by", self.tools), ("labels", self.labels)):
            if counts:
                out.append(f"{title}: " + ", ".join(f"{name} {count:,}" for name, count in counts.items()))
        lengths = self.lengths
        out.append(f"length in {self.unit}: min {lengths['min']:.0f} · p50 {lengths['p50']:.0f}"
                   f" · p90 {lengths['p90']:.0f}"
                   f" · p95 {lengths['p95']:.0f} · p99 {lengths['p99']:.0f} · max {lengths['max']:.0f}"
                   f" · mean {lengths['mean']:.1f}")
        if self.max_length is not None:
            out.append(f"{self.over_max_length:,} records ({self.over_max_length / self.records:.1%}) are longer "
                       f"than {self.max_length:,} {self.unit}")
        return out


def _load_tokenizer(path: str, template_name: str) -> str:
    """Check the tokenizer loads and resolve the chat template (the tokenizer's own or a built-in)."""
    from tunelab.data.templates import resolve_template
    from tunelab.models.load import load_tokenizer

    try:
        tokenizer = load_tokenizer(path)
    except TunelabError as exc:
        raise TunelabError(str(exc).replace("model.path", "--tokenizer")) from None
    try:
        return resolve_template(tokenizer, template_name)  # type: ignore[arg-type]
    except DataError as exc:
        raise TunelabError(str(exc).replace("data.template", "--template")) from None


def stats_files(
    files: list[str],
    out_dir: str | Path,
    *,
    tokenizer: str | None = None,
    template: str = "auto",
    bins: int = 30,
    max_length: int | None = None,
    kind: Literal["auto"] | Kind = "auto",
    fmt: ConversationFormat = "auto",
    text_field: str = "text",
    num_proc: int | None = None,
    use_cache: bool = True,
    png: bool = True,
    overwrite: bool = False,
) -> tuple[StatsReport, str]:
    """Measure data files and write ``stats.json``, ``report.md`` and ``token_lengths.png`` to ``out_dir``.

    The options are checked first, then a missing input is named and the three report files are
    claimed (existing ones refused unless ``overwrite``, an input always), then the work starts.

    Returns:
        The report and the terminal sketch of the length histogram.

    Raises:
        DataError: a missing or unreadable input, or no usable record.
        TunelabError: the tokenizer or template cannot be used.
        OutputError: a report file exists (without ``overwrite``) or is an input.
    """
    if bins < 1:
        raise TunelabError("--bins must be at least 1")
    files = list(files)
    claim_job_outputs(files, [Path(out_dir) / name for name in REPORT_FILES], overwrite)
    chat_template = _load_tokenizer(tokenizer, template) if tokenizer else None
    read = read_canonical(files, kind, fmt, text_field)
    rows = [{"record": json.dumps(r.data, ensure_ascii=False)} for r in read.records]
    tokenizer_key = directory_fingerprint(tokenizer, "--tokenizer") if tokenizer else None
    key = fingerprint("stats", CACHE_VERSION, [file_fingerprint(f) for f in files], kind, fmt, text_field,
                      tokenizer_key, chat_template)
    mapped = map_cached(rows, _LengthCounter(tokenizer, chat_template), key=key, desc="Counting tokens",
                        num_proc=num_proc, use_cache=use_cache)
    lengths = np.asarray(columns(mapped, "length")[0], dtype=np.int64)
    unit = "tokens" if tokenizer else "words"
    counts, edges = histogram(lengths, bins)
    report = StatsReport(
        files=list(files), kind=read.kind, records=len(read.records), read=read.report.read,
        skipped=dict(read.report.skipped), skipped_first_at=dict(read.report.examples),
        layouts=_layouts(read), unit=unit, lengths=percentiles(lengths),
        histogram={"counts": counts, "edges": edges},
        over_max_length=int((lengths > max_length).sum()) if max_length is not None else None,
        max_length=max_length,
    )
    _count_contents(report, [r.data for r in read.records])
    sketch = terminal_sketch(counts, edges, unit)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if png:
        report.png = _write_png(out_dir / "token_lengths.png", lengths, edges, report, tokenizer)
    (out_dir / "stats.json").write_text(json.dumps(asdict(report), indent=2, ensure_ascii=False) + "\n")
    (out_dir / "report.md").write_text(_markdown(report, sketch, tokenizer, template))
    return report, sketch


def _layouts(read: Any) -> dict[str, dict[str, int]]:
    per_file: dict[str, Counter] = {}
    for record in read.records:
        name = record.source.rsplit(":", 1)[0]
        per_file.setdefault(name, Counter())[record_layout(read.kind, record.raw, record.source)] += 1
    return {name: dict(counts.most_common()) for name, counts in per_file.items()}


def _count_contents(report: StatsReport, records: list[dict[str, Any]]) -> None:
    roles: Counter = Counter()
    turns = []
    tasks: Counter = Counter()
    tools: Counter = Counter()
    labels: Counter = Counter()
    for record in records:
        messages = record.get("messages") or (record["prompt"] + record["chosen"] if "chosen" in record else [])
        if messages:
            turns.append(len(messages))
            roles.update(m["role"] for m in messages)
            report.with_system_prompt += messages[0]["role"] == "system"
        if "task" in record:
            tasks[str(record["task"])] += 1
        if isinstance(record.get("provenance"), dict):
            tools[str(record["provenance"].get("tool"))] += 1
        if isinstance(record.get("label"), bool):
            labels["desirable" if record["label"] else "undesirable"] += 1
    if turns:
        report.turns = {"mean": float(np.mean(turns)), "min": float(min(turns)), "max": float(max(turns))}
    report.roles = dict(roles.most_common())
    report.tasks, report.tools, report.labels = dict(tasks.most_common()), dict(tools.most_common()), dict(labels)


def _write_png(path: Path, lengths: np.ndarray, edges: list[float], report: StatsReport,
               tokenizer: str | None) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: token_lengths.png not written: matplotlib is not installed (pip install 'tunelab[data]')",
              file=sys.stderr)
        return None
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    axes.hist(lengths, bins=edges, color="#4C72B0", edgecolor="white", linewidth=0.5)
    for name, style in (("p50", "--"), ("p95", ":")):
        axes.axvline(report.lengths[name], color="#333333", linestyle=style, linewidth=1,
                     label=f"{name} = {report.lengths[name]:,.0f}")
    if report.max_length is not None:
        axes.axvline(report.max_length, color="#C44E52", linewidth=1.5,
                     label=f"max length {report.max_length:,} ({report.over_max_length:,} over)")
    axes.set_xlabel(f"{report.unit} per record" + (f" ({Path(tokenizer).name} tokenizer)" if tokenizer else ""))
    axes.set_ylabel("records")
    names = ", ".join(Path(f).name for f in report.files)
    axes.set_title(f"{names}: {report.records:,} {report.kind} records", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return str(path)


def _markdown(report: StatsReport, sketch: str, tokenizer: str | None, template: str) -> str:
    lines = ["# Data statistics", "", f"Files: {', '.join(report.files)}", ""]
    lines += [f"- {line}" for line in report.lines()]
    measure = f"tokens of `{tokenizer}` (chat template: {template})" if tokenizer else "whitespace words"
    lines += ["", f"## Length histogram ({measure})", ""]
    if report.png:
        lines += ["![token lengths](token_lengths.png)", ""]
    lines += ["```", sketch, "```", ""]
    return "\n".join(lines)
