"""LLM-as-judge: single-answer grading (1-10) and pairwise comparison with position swap.

Two kinds of judging, MT-bench style:

- **Grading** (:meth:`Judge.grade`): the judge rates one answer 1-10 following a rubric and ends
  with ``[[N]]``; with a ``reference`` answer the reference-guided template is used (math,
  reasoning). The last ``[[N]]`` in the reply is the score (N from 1 to 10, decimals such as
  ``[[7.5]]`` accepted); anything else is unparsable (score None).
- **Comparison** (:meth:`Judge.compare`): the judge sees the question and answers A and B and ends
  with ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie). It is asked twice, with the answers in both
  orders, so a judge that prefers a position cannot turn that preference into wins: the outcome is
  +1 when both orders prefer ``answer_a``, -1 when both prefer ``answer_b``, 0 when the orders
  disagree or either says tie, and None when either reply has no verdict or the call failed.

Prompt templates are UTF-8 text files (``single.txt``, ``single_reference.txt``,
``pairwise.txt``, ``pairwise_reference.txt``; the shipped ones live in
``tunelab/resources/judge``). A line that is exactly ``---`` separates the system message (above)
from the user message (below); a file without that line is the user message alone. The
placeholders ``{question}``, ``{answer}``, ``{answer_a}``, ``{answer_b}`` and ``{reference}`` are
replaced in one pass; every other brace is literal text (no ``{{`` escaping as with str.format)
and the inserted answers are never scanned for placeholders. ``Judge(templates_dir=DIR)`` takes
each of those files from DIR when it is there and the shipped one otherwise.

Judge replies are cached in a JSON-lines file (``cache_path``), one object per reply:
``{"key": sha256, "judge": backend name, "reply": text}``, the key hashing the backend name
(which names the model) and the full messages. Judging runs at temperature 0, so a re-run costs
no calls. Failed calls are not cached; unparsable replies are (asking again would give the same).

Backends implement :class:`JudgeBackend`: :class:`OpenAIBackend` (any OpenAI-compatible
``/chat/completions`` server, through ``urllib``) and :class:`HFBackend` (a local Hugging Face
model, greedy, batched with tunelab's own generation). :func:`parse_judge_spec` turns the CLI
strings ``openai:BASE_URL`` and ``hf:MODEL_DIR`` into one. They are the generation backends of
:mod:`tunelab.generation` (shared with the data tools), and the calls run through its
:class:`~tunelab.generation.runner.Generator` (concurrency, batching, the cache file).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

from tunelab.errors import TunelabError, read_user_text
from tunelab.generation import backends as _backends
from tunelab.generation.backends import DEFAULT_OPENAI_URL, BatchBackend, HFBackend, parse_backend_spec
from tunelab.generation.cache import ReplyCache
from tunelab.generation.runner import PROGRESS_MIN_CALLS, Generation, Generator

# Re-exported: these names were defined here before the backends moved to tunelab.generation.
__all__ = [
    "DEFAULT_OPENAI_MODEL", "DEFAULT_OPENAI_URL", "PROGRESS_MIN_CALLS", "BatchJudgeBackend", "Grade", "HFBackend",
    "Judge", "JudgeBackend", "JudgeError", "JudgeStats", "OpenAIBackend", "PairVerdict", "PromptTemplate",
    "combine_verdicts", "load_templates", "parse_judge_spec", "parse_pair_verdict", "parse_score", "parse_template",
]

DEFAULT_OPENAI_MODEL = "gpt-4o-mini"
TEMPLATE_NAMES = ("single", "single_reference", "pairwise", "pairwise_reference")
PLACEHOLDERS = ("question", "answer", "answer_a", "answer_b", "reference")
_REQUIRED = {
    "single": ("question", "answer"),
    "single_reference": ("question", "answer", "reference"),
    "pairwise": ("question", "answer_a", "answer_b"),
    "pairwise_reference": ("question", "answer_a", "answer_b", "reference"),
}
_SEPARATOR = re.compile(r"^---[ \t]*$", re.MULTILINE)
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
_NAME_IN_BRACES = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SCORE = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_PAIR = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_CACHE_VERSION = "tunelab-judge-1"


class JudgeError(TunelabError):
    """The judge cannot be used: unreachable server, bad reply, bad template or judge spec."""


# ---------------------------------------------------------------------------------------------
# Backends


class JudgeBackend(Protocol):
    """A chat model that answers judge prompts.

    Attributes:
        name: identifies the backend *and* its model (part of the cache key), e.g.
            ``openai:gpt-4o-mini@https://api.openai.com/v1``.
        concurrency: how many ``complete`` calls the batch API may run at once.
    """

    name: str
    concurrency: int

    def complete(self, messages: list[dict]) -> str:
        """The assistant's reply to ``messages`` (greedy / temperature 0).

        Raises:
            JudgeError (or any exception): the call failed; the batch API records it per item.
        """
        ...


BatchJudgeBackend = BatchBackend  # a judge that answers many prompts in one batch (a local model)


class OpenAIBackend(_backends.OpenAIBackend):
    """A judge served by an OpenAI-compatible chat API (OpenAI, vLLM, tunelab serve, ...).

    The generic :class:`tunelab.generation.backends.OpenAIBackend` (same arguments; retries with
    backoff, ``Retry-After``, API key from ``api_key_env``) with ``gpt-4o-mini`` as the default
    model and :class:`JudgeError` for its failures.
    """

    label = "judge"
    error = JudgeError

    def __init__(self, base_url: str, model: str = DEFAULT_OPENAI_MODEL, **options) -> None:
        super().__init__(base_url, model, **options)


def parse_judge_spec(spec: str, judge_model: str | None = None, **options) -> JudgeBackend:
    """A judge backend from a CLI string.

    Args:
        spec: ``openai:BASE_URL`` (``openai`` alone means the OpenAI API), or ``hf:MODEL_DIR``.
        judge_model: model name for ``openai:`` judges (default ``gpt-4o-mini``); an ``hf:`` judge
            is named by its directory, so giving one there is an error.
        **options: passed to the backend (e.g. ``concurrency``, ``timeout`` / ``max_new_tokens``).

    Raises:
        JudgeError: an unknown kind or a missing URL/directory.
    """
    return parse_backend_spec(spec, judge_model, default_model=DEFAULT_OPENAI_MODEL, openai_class=OpenAIBackend,
                              **options)


# ---------------------------------------------------------------------------------------------
# Templates and verdicts


@dataclass(frozen=True)
class PromptTemplate:
    """A judge prompt: an optional system message and a user message with placeholders."""

    name: str
    source: str
    system: str | None
    user: str

    def render(self, **values: str) -> list[dict]:
        """Chat messages with the placeholders replaced (one pass; other braces stay literal)."""

        def fill(text: str) -> str:
            return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)

        messages = [{"role": "system", "content": fill(self.system)}] if self.system else []
        return messages + [{"role": "user", "content": fill(self.user)}]


def parse_template(text: str, name: str, source: str = "<text>") -> PromptTemplate:
    """Split a template file's text at its ``---`` line and check its placeholders.

    Raises:
        JudgeError: a placeholder the kind needs is missing, or an unknown ``{name}`` is used.
    """
    parts = _SEPARATOR.split(text, maxsplit=1)
    system, user = (parts[0].strip() or None, parts[1].strip()) if len(parts) == 2 else (None, text.strip())
    body = f"{system or ''}\n{user}"
    unknown = sorted({m.group(1) for m in _NAME_IN_BRACES.finditer(body)} - set(PLACEHOLDERS))
    if unknown:
        raise JudgeError(
            f"{source}: unknown placeholder {{{unknown[0]}}} in the judge template; the placeholders are "
            + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
        )
    missing = [p for p in _REQUIRED.get(name, ()) if f"{{{p}}}" not in body]
    if missing:
        raise JudgeError(f"{source}: the {name} judge template needs " + ", ".join(f"{{{p}}}" for p in missing))
    return PromptTemplate(name=name, source=source, system=system, user=user)


def load_templates(templates_dir: str | Path | None = None) -> dict[str, PromptTemplate]:
    """The four judge templates: each from ``templates_dir`` when it has the file, else shipped.

    Raises:
        JudgeError: ``templates_dir`` is not a directory, holds a ``.txt`` file that is not a
            judge template name (a typo would otherwise be ignored), or a template is invalid.
    """
    user_dir = Path(templates_dir).expanduser() if templates_dir is not None else None
    if user_dir is not None:
        if not user_dir.is_dir():
            raise JudgeError(f"{user_dir}: judge templates directory not found")
        strays = sorted(p.name for p in user_dir.glob("*.txt") if p.stem not in TEMPLATE_NAMES)
        if strays:
            raise JudgeError(
                f"{user_dir / strays[0]}: not a judge template name; expected "
                + ", ".join(f"{n}.txt" for n in TEMPLATE_NAMES)
            )
    shipped = resources.files("tunelab.resources").joinpath("judge")
    templates: dict[str, PromptTemplate] = {}
    for name in TEMPLATE_NAMES:
        user_file = user_dir / f"{name}.txt" if user_dir is not None else None
        if user_file is not None and user_file.is_file():
            text, source = read_user_text(user_file, "judge template", JudgeError), str(user_file)
        else:
            text, source = shipped.joinpath(f"{name}.txt").read_text(encoding="utf-8"), f"tunelab:judge/{name}.txt"
        templates[name] = parse_template(text, name, source)
    return templates


def parse_score(reply: str) -> float | None:
    """The last ``[[N]]`` of a grading reply, N in 1..10 (decimals allowed); None otherwise."""
    matches = _SCORE.findall(reply or "")
    if not matches:
        return None
    score = float(matches[-1])
    return score if 1 <= score <= 10 else None


def parse_pair_verdict(reply: str) -> str | None:
    """The last ``[[A]]``/``[[B]]``/``[[C]]`` of a comparison reply; None when there is none."""
    matches = _PAIR.findall(reply or "")
    return matches[-1] if matches else None


def combine_verdicts(verdict_ab: str | None, verdict_ba: str | None) -> int | None:
    """Outcome for the first answer from the verdicts of both orders.

    ``verdict_ab`` judged (A=first, B=second), ``verdict_ba`` judged (A=second, B=first).
    +1: both prefer the first; -1: both prefer the second; 0: a tie or the orders disagree;
    None: either verdict is missing.
    """
    if verdict_ab is None or verdict_ba is None:
        return None
    first = {"A": 1, "B": -1, "C": 0}[verdict_ab]
    swapped = {"A": -1, "B": 1, "C": 0}[verdict_ba]
    return first if first == swapped and first != 0 else 0


@dataclass
class Grade:
    """A graded answer.

    ``score`` is None when the reply had no valid ``[[N]]`` (``error`` None, ``raw`` holds the
    reply) or when the call failed (``error`` holds why, ``raw`` is empty).
    """

    score: float | None
    raw: str
    error: str | None = None


@dataclass
class PairVerdict:
    """A comparison of ``answer_a`` (first) with ``answer_b`` (second), asked in both orders.

    Attributes:
        outcome: +1 first better, -1 second better, 0 tie or inconsistent, None no verdict.
        raw_ab: the reply with the answers in the given order (A=first).
        raw_ba: the reply with the answers swapped (A=second).
        error: why a call failed (None when both calls returned).
        verdict_ab, verdict_ba: the letters parsed from each reply (None when unparsable).
    """

    outcome: int | None
    raw_ab: str
    raw_ba: str
    error: str | None = None
    verdict_ab: str | None = None
    verdict_ba: str | None = None


@dataclass
class JudgeStats:
    """Counts over the judge's life, per judge call (a comparison makes two).

    Attributes:
        calls: calls sent to the backend (retries inside a call not counted).
        cached: replies served from the cache (or a duplicate prompt in the same batch).
        unparsable: replies without a valid verdict (cached ones included).
        failed: calls that raised (unreachable server, HTTP error, ...).
    """

    calls: int = 0
    cached: int = 0
    unparsable: int = 0
    failed: int = 0


# ---------------------------------------------------------------------------------------------
# The judge


class Judge:
    """Grades and compares answers with a judge backend, caching every reply.

    Args:
        backend: the judge model (see :func:`parse_judge_spec`).
        templates_dir: a directory with your own ``single.txt``, ``single_reference.txt``,
            ``pairwise.txt``, ``pairwise_reference.txt`` (any subset; the rest are shipped ones).
        cache_path: JSON-lines file of replies, created when missing; None keeps replies in memory
            for this Judge only.
        progress: show a rich progress bar for batches of at least ``PROGRESS_MIN_CALLS`` calls.

    Example:
        >>> judge = Judge(parse_judge_spec("openai:http://127.0.0.1:8000/v1", "qwen"), cache_path="judge.jsonl")
        >>> verdicts = judge.compare_many([{"question": q, "answer_a": a, "answer_b": b} for q, a, b in rows])
        >>> wins = sum(v.outcome == 1 for v in verdicts)

    Backend failures and unparsable replies never raise from :meth:`grade_many` /
    :meth:`compare_many` (nor from :meth:`grade` / :meth:`compare`): they give entries with
    ``error`` set or a None score/outcome, counted in :attr:`stats`.
    """

    def __init__(
        self,
        backend: JudgeBackend,
        templates_dir: str | Path | None = None,
        cache_path: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        self.backend = backend
        self.templates = load_templates(templates_dir)
        self.cache_path = Path(cache_path).expanduser() if cache_path is not None else None
        self.progress = progress
        self.stats = JudgeStats()
        self.failures: list[str] = []  # why each failed call failed, in order (see tunelab.failures)
        # Every reply that arrives is cached, parsable or not (asking again at temperature 0 would
        # give the same); failed calls are not. A dead judge gives error entries, never an exception.
        cache = ReplyCache(self.cache_path, name_field="judge", error=JudgeError)
        self._generator = Generator(backend, cache, attempts=1, progress=progress, description="judging",
                                    max_consecutive_failures=0, key_version=_CACHE_VERSION)

    # -- public API ------------------------------------------------------------------------

    def grade(self, question: str, answer: str, reference: str | None = None) -> Grade:
        """Rate one answer 1-10 (reference-guided when ``reference`` is given)."""
        return self.grade_many([{"question": question, "answer": answer, "reference": reference}])[0]

    def compare(self, question: str, answer_a: str, answer_b: str, reference: str | None = None) -> PairVerdict:
        """Compare two answers in both orders (reference-guided when ``reference`` is given)."""
        item = {"question": question, "answer_a": answer_a, "answer_b": answer_b, "reference": reference}
        return self.compare_many([item])[0]

    def grade_many(self, items: Iterable[Mapping | Sequence]) -> list[Grade]:
        """Grade many answers, calls running concurrently.

        Args:
            items: mappings with ``question``, ``answer`` and optional ``reference``, or tuples
                ``(question, answer[, reference])``.
        """
        requests = []
        for index, item in enumerate(items):
            question, answer, reference = _fields(item, ("question", "answer"), index)
            if reference is None:
                requests.append(self.templates["single"].render(question=question, answer=answer))
            else:
                template = self.templates["single_reference"]
                requests.append(template.render(question=question, answer=answer, reference=reference))
        grades = []
        for reply in self._ask(requests):
            if reply.error is not None:
                grades.append(Grade(score=None, raw="", error=reply.error))
                continue
            score = parse_score(reply.text)
            self.stats.unparsable += score is None
            grades.append(Grade(score=score, raw=reply.text))
        return grades

    def compare_many(self, items: Iterable[Mapping | Sequence]) -> list[PairVerdict]:
        """Compare many answer pairs, each in both orders, calls running concurrently.

        Args:
            items: mappings with ``question``, ``answer_a``, ``answer_b`` and optional
                ``reference``, or tuples ``(question, answer_a, answer_b[, reference])``.
        """
        requests = []
        for index, item in enumerate(items):
            question, first, second, reference = _fields(item, ("question", "answer_a", "answer_b"), index)
            template = self.templates["pairwise" if reference is None else "pairwise_reference"]
            extra = {} if reference is None else {"reference": reference}
            requests.append(template.render(question=question, answer_a=first, answer_b=second, **extra))
            requests.append(template.render(question=question, answer_a=second, answer_b=first, **extra))
        replies = self._ask(requests)
        verdicts = []
        for ab, ba in zip(replies[0::2], replies[1::2]):
            orders = (("A/B order", ab), ("B/A order", ba))
            errors = [f"{order}: {reply.error}" for order, reply in orders if reply.error is not None]
            verdict_ab = parse_pair_verdict(ab.text) if ab.error is None else None
            verdict_ba = parse_pair_verdict(ba.text) if ba.error is None else None
            self.stats.unparsable += (ab.error is None and verdict_ab is None) + (
                ba.error is None and verdict_ba is None
            )
            verdicts.append(
                PairVerdict(
                    outcome=None if errors else combine_verdicts(verdict_ab, verdict_ba),
                    raw_ab=ab.text,
                    raw_ba=ba.text,
                    error="; ".join(errors) or None,
                    verdict_ab=verdict_ab,
                    verdict_ba=verdict_ba,
                )
            )
        return verdicts

    # -- calls and cache -------------------------------------------------------------------

    def cache_key(self, messages: list[dict]) -> str:
        """sha256 of the backend name (with its model) and the full messages."""
        return self._generator.key(messages)

    def _ask(self, requests: list[list[dict]]) -> list[Generation]:
        """One reply per request: cached, or asked of the backend (each distinct prompt once)."""
        counts = self._generator.stats
        calls, cached, failed = counts.calls, counts.cached, counts.failed
        replies = self._generator.generate(requests)
        self.failures += [reply.error for reply in replies if reply.error is not None]
        self.stats.calls += counts.calls - calls
        self.stats.cached += counts.cached - cached
        self.stats.failed += counts.failed - failed
        return replies


def _fields(item: Mapping | Sequence, names: tuple[str, ...], index: int) -> tuple:
    """The named fields of a batch item plus its optional reference."""
    if isinstance(item, Mapping):
        missing = [n for n in names if item.get(n) is None]
        if missing:
            has = ", ".join(map(str, item)) or "nothing"
            raise JudgeError(f"judge item {index}: missing {', '.join(missing)} (has {has})")
        return (*(item[n] for n in names), item.get("reference"))
    if isinstance(item, (list, tuple)) and len(item) in (len(names), len(names) + 1):
        values = tuple(item)
        return values if len(values) == len(names) + 1 else (*values, None)
    raise JudgeError(
        f"judge item {index}: expected a mapping with {', '.join(names)} or a tuple of them, got {item!r:.80}"
    )
