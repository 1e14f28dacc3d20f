"""Augmenting instruction data with a generation backend: ``tunelab data augment``.

Four operations, each making new records from every input record (``variants`` per record):

- ``paraphrase``: the instruction (the last user message; the whole text of a text record)
  rewritten in other words, same meaning; the answer is kept.
- ``backtranslate``: the instruction translated into a pivot language and back (two calls); the
  round trip rewords it the way a translator would. The pivot text is kept in the provenance. A
  round trip that gives the source back unchanged adds nothing and is dropped (counted).
- ``restyle``: the instruction rewritten in a style (``formal``, ``casual``, ``detailed``,
  ``concise``); each variant takes another style, chosen per record with the seed.
- ``constrain``: a constraint appended to the instruction ("Answer in one sentence.", ...) and
  the answer generated again for it. The built-in constraints are verifiable (IFEval style): an
  answer that breaks its constraint is an unusable reply, asked again, then reported as failed.

With ``answers="regenerate"`` every new instruction gets a new answer from the backend (by
default paraphrases, round trips and restyles keep the source's answer; ``constrain`` always
generates one). Prompt records (``{"messages", "reference"}``) are augmented the same way, the
new answer becoming the reference.

Every new record carries ``id`` (``<parent id>-<operation><variant>``) and ``provenance``: the
tool (``augment/<operation>``), the source ``file:line``, the parent record's id, the backend,
sampling and seed, and what the operation used (pivot language and text, style, constraint).
Requests whose replies stay unusable after the retries are listed in ``<stem>.failed.jsonl``
and counted in ``<stem>.report.json``; the job goes on. Replies are cached, so running the same
job again (or resuming it after an interruption) costs no calls for what was already generated.

The rewriting prompts can be replaced with a YAML file (``prompts_file``), mapping
``paraphrase``, ``translate`` and ``restyle`` to ``{system, user}``; the placeholders are
``{text}``, ``{kind}``, ``{language}``, ``{source_language}`` and ``{style}``.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from tunelab.data.readers import Kind
from tunelab.datatools.generation_jobs import (
    BackendSpec,
    SourceItem,
    claim_generation_outputs,
    load_backend,
    make_generator,
    read_sources,
    write_report,
    write_side_file,
)
from tunelab.datatools.jsonl_output import provenance, write_jsonl
from tunelab.errors import ConfigError, read_user_text
from tunelab.failures import failure_reasons, reason_lines
from tunelab.generation.backends import GenerationBackend, Sampling
from tunelab.generation.runner import GarbageReply, Generator

T = TypeVar("T")
OPERATIONS = ("paraphrase", "backtranslate", "restyle", "constrain")
KINDS: tuple[Kind, ...] = ("conversation", "prompt", "text")
STYLES = {
    "formal": "formal and polite, as in a professional email",
    "casual": "casual and conversational, as someone would ask a friend",
    "detailed": "detailed: it spells out the context and what a good answer should cover",
    "concise": "as short as possible while keeping every requirement",
}


def _one_sentence(answer: str) -> str | None:
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", answer.strip()) if s]
    return None if len(sentences) == 1 and "\n" not in answer.strip() else f"{len(sentences)} sentences"


def _max_words(limit: int) -> Callable[[str], str | None]:
    def check(answer: str) -> str | None:
        words = len(answer.split())
        return None if words <= limit else f"{words} words"

    return check


def _bullets(answer: str) -> str | None:
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    bulleted = [line for line in lines if re.match(r"^([-*\u2022]|\d+[.)])\s", line)]
    return None if len(bulleted) >= 2 and len(bulleted) >= len(lines) - 1 else "not a list of bullet points"


def _lowercase(answer: str) -> str | None:
    return None if answer == answer.lower() else "has capital letters"


def _no_commas(answer: str) -> str | None:
    return None if "," not in answer else "has commas"


def _json_object(answer: str) -> str | None:
    text = _strip_fence(answer.strip())
    try:
        return None if isinstance(json.loads(text), dict) else "not a JSON object"
    except ValueError:
        return "not valid JSON"


@dataclass(frozen=True)
class Constraint:
    """An instruction added to a prompt, and (for built-ins) a check that the answer keeps it.

    ``check`` returns None when the answer keeps the constraint, else why it does not.
    """

    text: str
    check: Callable[[str], str | None] | None = None


CONSTRAINTS: dict[str, Constraint] = {
    "one-sentence": Constraint("Answer in one sentence.", _one_sentence),
    "max-50-words": Constraint("Answer in at most 50 words.", _max_words(50)),
    "bullet-points": Constraint("Answer as a list of bullet points.", _bullets),
    "lowercase": Constraint("Write your whole answer in lowercase letters.", _lowercase),
    "no-commas": Constraint("Do not use any commas in your answer.", _no_commas),
    "json": Constraint("Answer with a JSON object only.", _json_object),
}

# -- prompts ------------------------------------------------------------------------------------

PLACEHOLDERS = ("text", "kind", "language", "source_language", "style")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
_NAME_IN_BRACES = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class RewritePrompt:
    """The messages asking a model to rewrite ``{text}``; other placeholders as the prompt needs."""

    system: str | None
    user: str

    def render(self, **values: str) -> list[dict]:
        """Chat messages with the placeholders replaced in one pass (other braces stay literal)."""

        def fill(text: str) -> str:
            return _PLACEHOLDER.sub(lambda m: str(values.get(m.group(1), m.group(0))), text)

        messages = [{"role": "system", "content": fill(self.system)}] if self.system else []
        return messages + [{"role": "user", "content": fill(self.user)}]


_ONLY = "Reply with the rewritten {kind} only, with no introduction, quotes or comments."
DEFAULT_PROMPTS: dict[str, RewritePrompt] = {
    "paraphrase": RewritePrompt(
        "You rewrite text for a training data set. " + _ONLY,
        "Paraphrase the {kind} below: keep its full meaning and every requirement in it, but use different "
        "words and sentence structure.\n\n{text}",
    ),
    "translate": RewritePrompt(
        "You are a professional translator. Reply with the translation only, with no notes.",
        "Translate the text below from {source_language} into {language}.\n\n{text}",
    ),
    "restyle": RewritePrompt(
        "You rewrite text for a training data set. " + _ONLY,
        "Rewrite the {kind} below so that it is {style}. Keep what it asks for unchanged.\n\n{text}",
    ),
}


def load_rewrite_prompts(path: str | Path | None) -> dict[str, RewritePrompt]:
    """The rewriting prompts: the built-in ones, replaced by those a YAML file gives.

    The file maps ``paraphrase``, ``translate`` and/or ``restyle`` to ``{system, user}`` (system
    optional); the user message must contain ``{text}``.

    Raises:
        ConfigError: unreadable YAML, an unknown prompt name or placeholder, a missing ``{text}``.
    """
    prompts = dict(DEFAULT_PROMPTS)
    if path is None:
        return prompts
    try:
        data = yaml.safe_load(read_user_text(path, "augment prompts file", ConfigError))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of prompt name to {{system, user}}")
    for name, entry in data.items():
        if name not in DEFAULT_PROMPTS:
            raise ConfigError(f"{path}: unknown prompt {name!r}; the prompts are {', '.join(DEFAULT_PROMPTS)}")
        if not isinstance(entry, dict) or not isinstance(entry.get("user"), str) or set(entry) - {"system", "user"}:
            raise ConfigError(f"{path}: {name} must be a mapping with a 'user' text and an optional 'system' text")
        system = entry.get("system")
        if system is not None and not isinstance(system, str):
            raise ConfigError(f"{path}: {name}.system must be text")
        body = f"{system or ''}\n{entry['user']}"
        unknown = sorted({m.group(1) for m in _NAME_IN_BRACES.finditer(body)} - set(PLACEHOLDERS))
        if unknown:
            raise ConfigError(f"{path}: {name}: unknown placeholder {{{unknown[0]}}}; the placeholders are "
                              + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS))
        if "{text}" not in entry["user"]:
            raise ConfigError(f"{path}: {name}: the user message must contain {{text}}")
        prompts[name] = RewritePrompt(system, entry["user"])
    return prompts


# -- replies ------------------------------------------------------------------------------------

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_LABEL = re.compile(
    r"^(?:here(?: is|'s)[^\n:]*|(?:the )?(?:paraphrased?|rewritten|restyled|translated|translation|revised)"
    r"(?: (?:instruction|text|version|question|request))?)\s*:\s*",
    re.IGNORECASE,
)
_QUOTES = {'"': '"', "\u201c": "\u201d", "'": "'", "\u00ab": "\u00bb", "\u201e": "\u201c"}


def _strip_fence(text: str) -> str:
    match = re.fullmatch(r"```[\w-]*\n(.*?)\n?```", text, re.DOTALL)
    return match.group(1).strip() if match else text


def clean_rewrite(reply: str, original: str = "") -> str:
    """A model's rewrite without the wrapping models add: reasoning blocks, code fences, a
    "Here is the paraphrase:" label, quotes around the whole text (unless the original had them)."""
    text = _strip_fence(_THINK.sub("", reply).strip())
    text = _LABEL.sub("", text, count=1).strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1] and not original.strip().startswith(text[0]):
        text = text[1:-1].strip()
    return text


def _normalised(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def rewrite_parser(original: str, must_differ: bool) -> Callable[[str], str]:
    """A parse function for rewrites of ``original``: empty replies (and, with ``must_differ``,
    replies that only repeat the original) are unusable."""

    def parse(reply: str) -> str:
        text = clean_rewrite(reply, original)
        if not text:
            raise GarbageReply("empty reply")
        if must_differ and _normalised(text) == _normalised(original):
            raise GarbageReply("the reply repeats the input unchanged")
        return text

    return parse


def answer_parser(constraint: Constraint | None) -> Callable[[str], str]:
    """A parse function for answers: empty ones, and ones that break ``constraint``, are unusable."""

    def parse(reply: str) -> str:
        text = _THINK.sub("", reply).strip()
        if not text:
            raise GarbageReply("empty answer")
        if constraint is not None and constraint.check is not None:
            why = constraint.check(text)
            if why is not None:
                raise GarbageReply(f"the answer breaks the constraint {constraint.text!r} ({why})")
        return text

    return parse


# -- the job ------------------------------------------------------------------------------------


@dataclass
class AugmentOptions:
    """What ``augment_files`` makes.

    Attributes:
        operations: any of ``paraphrase``, ``backtranslate``, ``restyle``, ``constrain``.
        variants: new records per source record and operation.
        pivot: the pivot language of back-translation.
        source_language: the language of the data.
        styles: the styles ``restyle`` draws from.
        constraints: the built-in constraints ``constrain`` draws from (names in ``CONSTRAINTS``).
        custom_constraints: your own constraint sentences (not checked), drawn from with the
            built-ins.
        answers: ``keep`` the source's answer for rewritten instructions, or ``regenerate`` it.
        sampling: temperature, top_p, max_tokens and base seed (variant k uses seed + k).
        prompts_file: a YAML file replacing the rewriting prompts.
        kind: read inputs as this record kind (``auto`` decides per file).
        text_field: the field holding text for text records.
        include_sources: write each source record (with its id) before its new records.
        limit: augment only the first this many records.
    """

    operations: tuple[str, ...] = ("paraphrase",)
    variants: int = 1
    pivot: str = "German"
    source_language: str = "English"
    styles: tuple[str, ...] = tuple(STYLES)
    constraints: tuple[str, ...] = tuple(CONSTRAINTS)
    custom_constraints: tuple[str, ...] = ()
    answers: Literal["keep", "regenerate"] = "keep"
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.7, max_tokens=512))
    prompts_file: str | None = None
    kind: Literal["auto"] | Kind = "auto"
    text_field: str = "text"
    include_sources: bool = False
    limit: int | None = None

    def check(self) -> None:
        """Raise :class:`ConfigError` for options that cannot work together."""
        unknown = [op for op in self.operations if op not in OPERATIONS]
        if unknown or not self.operations:
            raise ConfigError(f"augment: unknown operation {unknown[0] if unknown else '(none)'}; "
                              f"choose from {', '.join(OPERATIONS)}")
        if self.variants < 1 or (self.limit is not None and self.limit < 1):
            raise ConfigError("augment: variants and limit must be at least 1")
        bad = [s for s in self.styles if s not in STYLES] + [c for c in self.constraints if c not in CONSTRAINTS]
        if bad:
            raise ConfigError(f"augment: unknown style or constraint {bad[0]!r}; styles: {', '.join(STYLES)}; "
                              f"constraints: {', '.join(CONSTRAINTS)}")
        if "restyle" in self.operations and not self.styles:
            raise ConfigError("augment: restyle needs at least one style")
        if "constrain" in self.operations and not (self.constraints or self.custom_constraints):
            raise ConfigError("augment: constrain needs at least one constraint")
        rewrites = {"paraphrase", "backtranslate"} & set(self.operations)
        if self.variants > 1 and self.sampling.temperature <= 0 and rewrites:
            raise ConfigError("augment: several variants of a paraphrase or round trip need a temperature above 0 "
                              "(greedy decoding gives the same rewrite every time)")
        if self.answers not in ("keep", "regenerate"):
            raise ConfigError(f"augment: answers must be keep or regenerate, not {self.answers!r}")


@dataclass
class AugmentResult:
    """What an augment job wrote and what happened on the way (also in ``report.json``)."""

    out: Path
    written: int
    report: dict[str, Any]
    report_path: Path
    failed_path: Path | None

    def summary(self) -> str:
        """A few lines for the terminal."""
        r = self.report
        made = ", ".join(f"{op} {n}" for op, n in r["made"].items()) or "none"
        lines = [f"wrote {self.written} records to {self.out} (new: {made})",
                 f"read {r['read']} records ({sum(r['skipped'].values())} unreadable), augmented {r['sources']}"]
        if r["failed"]:
            lines.append(f"{sum(r['failed'].values())} failed after retries ("
                         + ", ".join(f"{op} {n}" for op, n in r["failed"].items()) + f"): see {self.failed_path}")
            lines += reason_lines(r["failure_reasons"])
        if r["dropped"]:
            lines.append("dropped: " + ", ".join(f"{n} {why}" for why, n in r["dropped"].items()))
        g = r["generator"]
        lines.append(f"backend {r['backend']}: {g['calls']} calls, {g['cached']} from the cache, "
                     f"{g['garbage']} unusable replies asked again; report {self.report_path}")
        return "\n".join(lines)


@dataclass
class _Draft:
    """A new record on its way: the source, what to do, and the results so far."""

    item: SourceItem
    operation: str
    variant: int
    text: str  # the instruction (or text) being rewritten; then the rewrite
    details: dict[str, Any] = field(default_factory=dict)
    constraint: Constraint | None = None
    answer: str | None = None
    error: tuple[str, str] | None = None  # (stage, why)
    dropped: str | None = None

    @property
    def alive(self) -> bool:
        return self.error is None and self.dropped is None


def _instruction_index(messages: list[dict]) -> int | None:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] == "user":
            return index
    return None


def _instruction(item: SourceItem) -> str | None:
    if item.kind == "text":
        return item.data["text"]
    index = _instruction_index(item.data["messages"])
    return None if index is None else item.data["messages"][index]["content"]


def _choose(options: Sequence[T], count: int, seed: int, record_id: str) -> list[T]:
    """``count`` distinct options (cycling when there are fewer), chosen per record with the seed."""
    order = list(options)
    random.Random(f"{seed}:{record_id}").shuffle(order)
    return [order[k % len(order)] for k in range(count)]


def augment_files(
    files: Iterable[str],
    out: str | Path,
    backend: GenerationBackend | BackendSpec,
    options: AugmentOptions | None = None,
    cache: str | Path | None | Literal[False] = None,
    attempts: int = 3,
    progress: bool = True,
    overwrite: bool = False,
) -> AugmentResult:
    """Augment data files with a generation backend and write canonical JSONL to ``out``.

    The options are checked first, then a missing input is named and ``out``, its report and
    failures files are claimed (existing ones refused unless ``overwrite``, an input always),
    then the backend loads and the work starts.

    Args:
        files: input data files (conversations, prompts or text, any supported format).
        out: the output JSONL; ``<stem>.report.json`` and (when something failed)
            ``<stem>.failed.jsonl`` are written beside it.
        backend: the model that rewrites, or a :class:`BackendSpec` naming it (see
            :func:`~tunelab.generation.backends.parse_backend_spec`).
        options: what to make.
        cache: the reply cache file (None: the default one for the backend; False: none).
        attempts: replies asked for per request when they come back unusable.
        progress: show progress bars.
        overwrite: replace the outputs of an earlier run.

    Returns:
        What was written and the report.

    Raises:
        ConfigError: bad options. DataError: missing or unreadable inputs, or no usable record.
        OutputError: an output exists (without ``overwrite``) or is an input.
        BackendError: the backend failed many calls in a row (re-run to resume).
    """
    options = options or AugmentOptions()
    options.check()
    prompts = load_rewrite_prompts(options.prompts_file)
    files = list(files)
    claim_generation_outputs(files, out, ("report.json", "failed.jsonl"), overwrite)
    backend = load_backend(backend)
    started = time.monotonic()
    items, load_report = read_sources(files, KINDS, options.kind, options.text_field, "augment",
                                      options.limit)
    if items[0].kind == "text" and {"restyle", "constrain"} & set(options.operations):
        raise ConfigError(f"{', '.join(files)}: text records have no instruction to restyle or constrain; "
                          "use paraphrase or backtranslate on text")
    generator = make_generator(backend, cache, attempts, progress, "augmenting")
    drafts = _plan(items, options)
    _rewrite(generator, drafts, options, prompts)
    _answer(generator, drafts, options)

    by_parent: dict[str, list[_Draft]] = defaultdict(list)
    for draft in drafts:
        by_parent[draft.item.id].append(draft)
    rows: list[dict[str, Any]] = []
    made: Counter[str] = Counter()
    failed_rows: list[dict[str, Any]] = []
    failed: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    for item in items:
        if options.include_sources:
            rows.append({"id": item.id, **item.data, "provenance": provenance("augment/source", item.source)})
        for draft in by_parent.pop(item.id, []):
            if draft.error is not None:
                stage, why = draft.error
                failed[draft.operation] += 1
                failed_rows.append({"parent": item.id, "source": item.source, "operation": draft.operation,
                                    "variant": draft.variant, "stage": stage, "error": why})
            elif draft.dropped is not None:
                dropped[draft.dropped] += 1
            else:
                made[draft.operation] += 1
                rows.append(_record(draft, backend.name, options))
    written = write_jsonl(out, rows)
    failed_path = write_side_file(out, "failed.jsonl", failed_rows)
    report = {
        "tool": "augment", "inputs": files, "output": str(out), "kind": items[0].kind, "backend": backend.name,
        "operations": list(options.operations), "variants": options.variants, "answers": options.answers,
        "sampling": options.sampling.as_dict(), "read": load_report.read, "skipped": dict(load_report.skipped),
        "sources": len(items), "made": dict(made), "failed": dict(failed),
        "failure_reasons": failure_reasons(row["error"] for row in failed_rows), "dropped": dict(dropped),
        "written": written, "generator": generator.stats.as_dict(),
        "cache": str(generator.cache.path) if generator.cache.path else None,
        "seconds": round(time.monotonic() - started, 2),
    }
    report_path = write_report(out, report)
    return AugmentResult(Path(out), written, report, report_path, failed_path)


def _plan(items: list[SourceItem], options: AugmentOptions) -> list[_Draft]:
    """One draft per source record, operation and variant."""
    constraints = [CONSTRAINTS[name] for name in options.constraints]
    constraints += [Constraint(text) for text in options.custom_constraints]
    constraint_names = {c.text: name for name, c in CONSTRAINTS.items()}
    drafts: list[_Draft] = []
    for item in items:
        instruction = _instruction(item)
        for operation in options.operations:
            if operation == "restyle":
                picks: list[Any] = _choose(options.styles, options.variants, options.sampling.seed, item.id)
            elif operation == "constrain":
                picks = _choose(constraints, options.variants, options.sampling.seed, item.id)
            else:
                picks = [None] * options.variants
            for variant, pick in enumerate(picks):
                draft = _Draft(item, operation, variant, instruction or "")
                if instruction is None:
                    draft.dropped = "records without a user message"
                elif operation == "restyle":
                    draft.details["style"] = pick
                elif operation == "constrain":
                    draft.constraint = pick
                    draft.details["constraint"] = constraint_names.get(pick.text, pick.text)
                    draft.text = f"{instruction.rstrip()}\n\n{pick.text}"
                elif operation == "backtranslate":
                    draft.details["pivot"] = options.pivot
                drafts.append(draft)
    return drafts


def _run(generator: Generator, drafts: list[_Draft], stage: str, sampling: Sampling,
         request: Callable[[_Draft], list[dict]], parse: Callable[[_Draft], Callable[[str], Any]],
         apply: Callable[[_Draft, Any], None]) -> None:
    """Ask for one reply per live draft (grouped by variant: variant k samples with seed + k)."""
    by_variant: dict[int, list[_Draft]] = defaultdict(list)
    for draft in drafts:
        if draft.alive:
            by_variant[draft.variant].append(draft)
    for variant, group in sorted(by_variant.items()):
        results = generator.generate([request(d) for d in group], replace(sampling, seed=sampling.seed + variant),
                                     [parse(d) for d in group], description=f"augment: {stage}")
        for draft, result in zip(group, results):
            if result.ok:
                apply(draft, result.value)
            else:
                draft.error = (stage, result.error or "")


def _rewrite(generator: Generator, drafts: list[_Draft], options: AugmentOptions,
             prompts: dict[str, RewritePrompt]) -> None:
    """Rewrite the instructions: paraphrase, restyle, and the two legs of back-translation."""
    sampling = options.sampling

    def kind_of(draft: _Draft) -> str:
        return "text" if draft.item.kind == "text" else "instruction"

    def set_text(draft: _Draft, text: str) -> None:
        draft.text = text

    paraphrases = [d for d in drafts if d.operation == "paraphrase"]
    _run(generator, paraphrases, "paraphrase", sampling,
         lambda d: prompts["paraphrase"].render(text=d.text, kind=kind_of(d)),
         lambda d: rewrite_parser(d.text, must_differ=True), set_text)
    restyles = [d for d in drafts if d.operation == "restyle"]
    _run(generator, restyles, "restyle", sampling,
         lambda d: prompts["restyle"].render(text=d.text, kind=kind_of(d), style=STYLES[d.details["style"]]),
         lambda d: rewrite_parser(d.text, must_differ=True), set_text)

    trips = [d for d in drafts if d.operation == "backtranslate"]

    def set_pivot(draft: _Draft, text: str) -> None:
        draft.details["pivot_text"] = text

    _run(generator, trips, f"translate to {options.pivot}", sampling,
         lambda d: prompts["translate"].render(text=d.text, language=options.pivot,
                                               source_language=options.source_language),
         lambda d: rewrite_parser(d.text, must_differ=True), set_pivot)

    def set_round_trip(draft: _Draft, text: str) -> None:
        if _normalised(text) == _normalised(draft.text):
            draft.dropped = "round trips that gave the source back"
        else:
            draft.text = text

    _run(generator, trips, f"translate back to {options.source_language}", sampling,
         lambda d: prompts["translate"].render(text=d.details["pivot_text"], language=options.source_language,
                                               source_language=options.pivot),
         lambda d: rewrite_parser(d.details["pivot_text"], must_differ=False), set_round_trip)


def _answer(generator: Generator, drafts: list[_Draft], options: AugmentOptions) -> None:
    """Generate answers for constrained instructions (and all new instructions with ``regenerate``)."""
    todo = [d for d in drafts
            if d.item.kind != "text" and (d.operation == "constrain" or options.answers == "regenerate")]

    def request(draft: _Draft) -> list[dict]:
        messages = [dict(m) for m in draft.item.data["messages"]]
        index = _instruction_index(messages)
        assert index is not None  # drafts without a user message were dropped
        messages[index]["content"] = draft.text
        return messages[: index + 1]

    def set_answer(draft: _Draft, text: str) -> None:
        draft.answer = text

    _run(generator, todo, "answer", options.sampling, request, lambda d: answer_parser(d.constraint), set_answer)


def _record(draft: _Draft, backend_name: str, options: AugmentOptions) -> dict[str, Any]:
    """The canonical JSON object of a finished draft, with its id and provenance."""
    item = draft.item
    details = {
        "parent": item.id, "operation": draft.operation, "variant": draft.variant, "backend": backend_name,
        "temperature": options.sampling.temperature, "seed": options.sampling.seed + draft.variant,
        "prompt": options.prompts_file or "built-in", **draft.details,
    }
    if item.kind == "text":
        data: dict[str, Any] = {"text": draft.text}
    else:
        messages = [dict(m) for m in item.data["messages"]]
        index = _instruction_index(messages)
        assert index is not None
        messages[index]["content"] = draft.text
        data = {"messages": messages}
        if draft.answer is not None:
            details["answer"] = "generated"
            if item.kind == "conversation":
                data["messages"] = messages[: index + 1] + [{"role": "assistant", "content": draft.answer}]
            else:
                data["messages"] = messages[: index + 1]
                data["reference"] = draft.answer
        else:
            details["answer"] = "kept"
            if item.kind == "prompt":
                data["reference"] = item.data.get("reference")
    record = {"id": f"{item.id}-{draft.operation}{draft.variant}", **data}
    record["provenance"] = provenance(f"augment/{draft.operation}", item.source, **details)
    return record
