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
strings ``openai:BASE_URL`` and ``hf:MODEL_DIR`` into one.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import ipaddress
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol, runtime_checkable

from tunelab.errors import TunelabError, read_user_text

DEFAULT_OPENAI_URL = "https://api.openai.com/v1"
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
PROGRESS_MIN_CALLS = 16  # batches with fewer calls show no progress bar


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


@runtime_checkable
class BatchJudgeBackend(JudgeBackend, Protocol):
    """A backend that answers many prompts faster in one batch (a local model)."""

    batch_size: int

    def complete_batch(self, batch: list[list[dict]]) -> list[str]:
        """Replies to each conversation of ``batch``, in order."""
        ...


def _is_local(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OpenAIBackend:
    """A judge served by an OpenAI-compatible chat API (OpenAI, vLLM, tunelab serve, ...).

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``; requests go to
            ``{base_url}/chat/completions``.
        model: the model name the server knows.
        api_key_env: environment variable holding the API key; sent as a Bearer token when set
            (local servers usually need none).
        timeout: seconds to wait for one response.
        max_retries: retries after the first attempt on connection errors, timeouts, HTTP 429 and
            5xx; other HTTP errors fail at once.
        concurrency: requests the batch API runs at once.
        backoff: first retry delay in seconds, doubled each retry (a 429/503 ``Retry-After``
            header overrides it, at most ``max_backoff``).
        max_backoff: longest delay between two attempts.
        max_tokens: ``max_tokens`` sent to the server; None leaves it to the server.
    """

    def __init__(
        self,
        base_url: str,
        model: str = DEFAULT_OPENAI_MODEL,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 60,
        max_retries: int = 3,
        concurrency: int = 8,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_tokens: int | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise JudgeError(f"judge base URL {base_url!r}: must start with http:// or https://")
        if max_retries < 0 or concurrency < 1:
            raise JudgeError("judge: max_retries must be >= 0 and concurrency >= 1")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_tokens = max_tokens
        self.name = f"openai:{model}@{self.base_url}"
        # Loopback servers bypass any http_proxy from the environment; others honour it.
        handlers = [urllib.request.ProxyHandler({})] if _is_local(self.base_url) else []
        self._opener = urllib.request.build_opener(*handlers)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "tunelab-judge"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def complete(self, messages: list[dict]) -> str:
        """POST the messages at temperature 0 and return the reply's content.

        Raises:
            JudgeError: after the last retry (naming the URL and the cause), at once for other
                HTTP errors, or for a response without ``choices[0].message``.
        """
        body: dict = {"model": self.model, "messages": messages, "temperature": 0}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        data = json.dumps(body).encode("utf-8")
        cause = ""
        delay = self.backoff
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(self.url, data=data, headers=self._headers(), method="POST")
            retry_after: float | None = None
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    payload = response.read()
            except urllib.error.HTTPError as exc:
                detail = _error_detail(exc)
                if exc.code == 429 or exc.code >= 500:
                    cause = f"HTTP {exc.code}: {detail}"
                    retry_after = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
                else:
                    raise JudgeError(f"judge {self.url}: HTTP {exc.code}: {detail}{self._hint(exc.code)}") from None
            except urllib.error.URLError as exc:
                cause = f"cannot connect: {exc.reason}"
            except (TimeoutError, OSError, http.client.HTTPException) as exc:
                cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                return self._content(payload)
            if attempt < self.max_retries:
                wait = retry_after if retry_after is not None else delay
                if wait > 0:
                    time.sleep(min(wait, self.max_backoff))
                delay *= 2
        attempts = self.max_retries + 1
        raise JudgeError(f"judge {self.url}: {cause} (gave up after {attempts} attempt{'s' * (attempts > 1)})")

    def _hint(self, code: int) -> str:
        if code in (401, 403):
            where = f"set {self.api_key_env}" if self.api_key_env else "give an api_key_env"
            return f" (is the API key right? {where})"
        if code == 404:
            return f" (check the base URL, usually ending in /v1, and the judge model name {self.model!r})"
        return ""

    def _content(self, payload: bytes) -> str:
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            shown = payload[:200].decode("utf-8", "replace")
            raise JudgeError(f"judge {self.url}: not a chat completion response: {shown!r}") from None
        return content if isinstance(content, str) else ""


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        text = exc.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        text = ""
    try:
        error = json.loads(text).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return str(message)[:300]
    except (ValueError, AttributeError):
        pass
    return text.strip()[:300] or str(exc.reason)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        date = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, date.timestamp() - time.time())


class HFBackend:
    """A local Hugging Face chat model as the judge: greedy, batched, the model's own chat template.

    Args:
        model_dir: HF model directory (safetensors, a chat template in the tokenizer preferred;
            chatml otherwise).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
        max_new_tokens: longest judge reply; a reply cut before its verdict is unparsable.
        batch_size: prompts generated together.

    Raises:
        TunelabError: the directory is not a loadable model.
    """

    concurrency = 1

    def __init__(
        self, model_dir: str | Path, device: str = "auto", max_new_tokens: int = 512, batch_size: int = 8
    ) -> None:
        import torch

        from tunelab.config import ModelConfig
        from tunelab.data.templates import resolve_template
        from tunelab.models.load import load_model, load_tokenizer, resolve_device

        path = str(model_dir)
        self.tokenizer = load_tokenizer(path)
        self.device = resolve_device(device)
        bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else torch.float32
        self.model = load_model(ModelConfig(path=path), dtype, self.device, "sdpa")
        self.template = resolve_template(self.tokenizer, "auto")
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        local = Path(path).expanduser()
        self.name = f"hf:{local.resolve() if local.exists() else path}"
        self._lock = threading.Lock()

    def complete(self, messages: list[dict]) -> str:
        """The model's greedy reply to one conversation."""
        return self.complete_batch([messages])[0]

    def complete_batch(self, batch: list[list[dict]]) -> list[str]:
        """Greedy replies to several conversations, generated ``batch_size`` at a time."""
        from tunelab.eval.generate import generate_answers

        with self._lock:
            return generate_answers(
                self.model, self.tokenizer, self.template, batch,
                max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
            )


def parse_judge_spec(spec: str, judge_model: str | None = None, **options) -> JudgeBackend:
    """A backend from a CLI string.

    Args:
        spec: ``openai:BASE_URL`` (``openai`` alone means the OpenAI API), or ``hf:MODEL_DIR``.
        judge_model: model name for ``openai:`` judges (default ``gpt-4o-mini``); an ``hf:`` judge
            is named by its directory, so giving one there is an error.
        **options: passed to the backend (e.g. ``concurrency``, ``timeout`` / ``max_new_tokens``).

    Raises:
        JudgeError: an unknown kind or a missing URL/directory.
    """
    kind, _, target = spec.partition(":")
    target = target.strip()
    if kind == "openai":
        return OpenAIBackend(target or DEFAULT_OPENAI_URL, judge_model or DEFAULT_OPENAI_MODEL, **options)
    if kind == "hf":
        if not target:
            raise JudgeError(f"judge {spec!r}: name the model directory, as hf:MODEL_DIR")
        if judge_model is not None:
            raise JudgeError(
                f"judge {spec!r}: a judge model name is only for openai: judges; hf:MODEL_DIR names the model"
            )
        return HFBackend(target, **options)
    raise JudgeError(f"judge {spec!r}: expected openai:BASE_URL (e.g. openai:http://127.0.0.1:8000/v1) or hf:MODEL_DIR")


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


@dataclass
class _Reply:
    text: str = ""
    error: str | None = None


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
        self._cache: dict[str, str] = self._read_cache() if self.cache_path is not None else {}

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
        blob = json.dumps([_CACHE_VERSION, self.backend.name, messages], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _ask(self, requests: list[list[dict]]) -> list[_Reply]:
        """One reply per request: cached, or asked of the backend (each distinct prompt once)."""
        keys = [self.cache_key(messages) for messages in requests]
        todo: dict[str, list[dict]] = {}
        for key, messages in zip(keys, requests):
            if key not in self._cache and key not in todo:
                todo[key] = messages
        self.stats.cached += len(requests) - len(todo)
        self.stats.calls += len(todo)
        failures: dict[str, str] = {}
        if todo:
            with self._progress_bar(len(todo)) as advance:
                for key, text, error in self._run(list(todo.items())):
                    if error is None:
                        self._store(key, text)
                    else:
                        failures[key] = error
                        self.stats.failed += 1
                    advance()
        return [_Reply(error=failures[key]) if key in failures else _Reply(text=self._cache[key]) for key in keys]

    def _run(self, todo: list[tuple[str, list[dict]]]) -> Iterable[tuple[str, str, str | None]]:
        """Yield (key, reply, error) as calls finish; exceptions become errors."""
        backend = self.backend
        if isinstance(backend, BatchJudgeBackend):
            size = max(1, backend.batch_size)
            for start in range(0, len(todo), size):
                chunk = todo[start : start + size]
                try:
                    texts = backend.complete_batch([messages for _, messages in chunk])
                except Exception as exc:  # noqa: BLE001 - a failing judge must not crash the batch
                    yield from ((key, "", _describe(exc)) for key, _ in chunk)
                    continue
                yield from ((key, text, None) for (key, _), text in zip(chunk, texts))
            return
        workers = max(1, min(backend.concurrency, len(todo)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge") as pool:
            futures = {pool.submit(backend.complete, messages): key for key, messages in todo}
            for future in as_completed(futures):
                try:
                    yield futures[future], future.result(), None
                except Exception as exc:  # noqa: BLE001 - a failing judge must not crash the batch
                    yield futures[future], "", _describe(exc)

    def _progress_bar(self, total: int):
        from contextlib import contextmanager

        @contextmanager
        def bar():
            if not self.progress or total < PROGRESS_MIN_CALLS:
                yield lambda: None
                return
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            columns = (TextColumn("judging"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
                task = progress.add_task("judge", total=total)
                yield lambda: progress.advance(task)

        return bar()

    def _read_cache(self) -> dict[str, str]:
        assert self.cache_path is not None
        cache: dict[str, str] = {}
        if not self.cache_path.exists():
            return cache
        text = read_user_text(self.cache_path, "judge cache", JudgeError)
        for line in text.splitlines():
            try:
                entry = json.loads(line)
                cache[entry["key"]] = entry["reply"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash: that reply is asked again
        return cache

    def _store(self, key: str, text: str) -> None:
        self._cache[key] = text
        if self.cache_path is None:
            return
        line = json.dumps({"key": key, "judge": self.backend.name, "reply": text}, ensure_ascii=False) + "\n"
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.cache_path, "a+b") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":  # the last line was cut: start a fresh one
                    line = "\n" + line
            handle.write(line.encode("utf-8"))


def _describe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, TunelabError) else f"{type(exc).__name__}: {exc}"


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
