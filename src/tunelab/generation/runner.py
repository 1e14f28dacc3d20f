"""Running many generation requests through a backend: cache, concurrency, retries, failures.

:class:`Generator` is what every generation job uses (augment, synth, the LLM judge):

- **cache**: each usable reply is appended to a JSON-lines file as it arrives (see
  :mod:`tunelab.generation.cache`); a re-run, or a run resumed after Ctrl-C or a crash, asks only
  for what is missing. The key hashes the backend name (with its model), the messages and the
  sampling, so changing any of them asks again.
- **concurrency**: an OpenAI-compatible backend gets at most ``backend.concurrency`` requests in
  flight; a local model is fed ``batch_size`` prompts per ``generate``.
- **retries**: transport problems (timeouts, refused connections, 429/5xx, malformed responses)
  are retried with backoff inside the backend. A reply that arrives but cannot be used (the
  ``parse`` function raises :class:`GarbageReply`: not the JSON asked for, empty, ...) is asked
  again, up to ``attempts`` times in all, with another sampling seed when sampling.
- **failures**: a request that still fails becomes a :class:`Generation` with ``error`` set; the
  job goes on with the others. Only a backend that fails ``max_consecutive_failures`` calls in a
  row (a dead server) stops the job, with a message saying that re-running resumes it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from tunelab.errors import TunelabError
from tunelab.generation.backends import BackendError, BatchBackend, GenerationBackend, Sampling
from tunelab.generation.cache import CACHE_VERSION, ReplyCache, request_key
from tunelab.progress import progress_bar

T = TypeVar("T")
PROGRESS_MIN_CALLS = 16  # jobs with fewer calls show no progress bar
_RETRY_SEED_STRIDE = 7919  # a retry of a sampled request uses seed + attempt * stride


class GarbageReply(ValueError):
    """A reply arrived but cannot be used (empty, not the JSON asked for, missing fields, ...)."""


@dataclass
class Generation(Generic[T]):
    """The outcome of one request.

    Attributes:
        text: the reply ('' when the request failed).
        value: ``parse(text)`` (the text itself without a parse function); None when failed.
        error: why the request failed (None when it succeeded).
        cached: the reply came from the cache (no call made).
        attempts: calls made for it in this run (0 when cached).
    """

    text: str
    value: T | None
    error: str | None = None
    cached: bool = False
    attempts: int = 0

    @property
    def ok(self) -> bool:
        """Whether the request gave a usable reply."""
        return self.error is None


@dataclass
class GeneratorStats:
    """Counts over a generator's life.

    Attributes:
        requests: requests asked for (duplicates included).
        calls: calls sent to the backend (retries inside a backend call not counted).
        cached: requests served from the cache or by an identical request of the same batch.
        garbage: replies that arrived but could not be used (each was asked again or failed).
        failed: requests that ended without a usable reply.
    """

    requests: int = 0
    calls: int = 0
    cached: int = 0
    garbage: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counts as a plain dict (for reports)."""
        return dataclasses.asdict(self)


def describe_exception(exc: BaseException) -> str:
    """A one-line reason: the message of a tunelab error, else the exception type and message."""
    return str(exc) if isinstance(exc, TunelabError) else f"{type(exc).__name__}: {exc}"


def run_calls(
    backend: GenerationBackend, todo: Sequence[tuple[str, list[dict]]], sampling: Sampling | None = None
) -> Iterator[tuple[str, str, str | None]]:
    """Yield ``(key, reply, error)`` as calls finish; a call's exception becomes its error.

    A :class:`~tunelab.generation.backends.BatchBackend` gets ``batch_size`` prompts per call;
    any other backend gets at most ``concurrency`` calls at once, from a thread pool. Closing the
    iterator early (an exception in the caller, Ctrl-C) cancels the calls not yet started.
    """
    args: tuple = () if sampling is None else (sampling,)
    if isinstance(backend, BatchBackend):
        size = max(1, backend.batch_size)
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            try:
                texts = backend.complete_batch([messages for _, messages in chunk], *args)
            except Exception as exc:  # noqa: BLE001 - one failing batch must not stop the job
                yield from ((key, "", describe_exception(exc)) for key, _ in chunk)
                continue
            yield from ((key, text, None) for (key, _), text in zip(chunk, texts, strict=True))
        return
    workers = max(1, min(backend.concurrency, len(todo)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="generate") as pool:
        futures: dict[Future, str] = {pool.submit(backend.complete, messages, *args): key for key, messages in todo}
        try:
            for future in as_completed(futures):
                try:
                    yield futures[future], future.result(), None
                except Exception as exc:  # noqa: BLE001 - one failing request must not stop the job
                    yield futures[future], "", describe_exception(exc)
        finally:
            for future in futures:
                future.cancel()


class Generator:
    """Runs generation requests through a backend with a reply cache, retries and failure reports.

    Args:
        backend: the model (see :func:`~tunelab.generation.backends.parse_backend_spec`).
        cache: a :class:`~tunelab.generation.cache.ReplyCache`, a cache file path, or None for
            an in-memory cache (this generator only).
        attempts: replies asked for per request when they come back unusable (at least 1).
        progress: show a rich progress bar (on stderr) for jobs of ``PROGRESS_MIN_CALLS`` calls
            or more.
        description: the progress bar's label.
        max_consecutive_failures: stop the job (raise) when this many calls fail in a row; 0
            never stops.
        key_version: the version string hashed into cache keys.

    Example:
        >>> generator = Generator(parse_backend_spec("openai:http://127.0.0.1:8000/v1", "qwen"), "cache.jsonl")
        >>> results = generator.generate([[{"role": "user", "content": "Say hi"}]], Sampling(0.7, seed=1))
        >>> [r.text for r in results if r.ok]
    """

    def __init__(
        self,
        backend: GenerationBackend,
        cache: ReplyCache | str | Path | None = None,
        attempts: int = 3,
        progress: bool = True,
        description: str = "generating",
        max_consecutive_failures: int = 50,
        key_version: str = CACHE_VERSION,
    ) -> None:
        if attempts < 1:
            raise BackendError("generation: attempts must be at least 1")
        self.backend = backend
        self.cache = cache if isinstance(cache, ReplyCache) else ReplyCache(cache, error=BackendError)
        self.attempts = attempts
        self.progress = progress
        self.description = description
        self.max_consecutive_failures = max_consecutive_failures
        self.key_version = key_version
        self.stats = GeneratorStats()
        self._consecutive_failures = 0

    def key(self, messages: list[dict], sampling: Sampling | None = None) -> str:
        """The cache key of a request."""
        params = sampling.as_dict() if sampling is not None else None
        return request_key(self.backend.name, messages, params, self.key_version)

    def generate(
        self,
        requests: Sequence[list[dict]],
        sampling: Sampling | None = None,
        parse: Callable[[str], T] | Sequence[Callable[[str], T]] | None = None,
        description: str | None = None,
    ) -> list[Generation[T]]:
        """One :class:`Generation` per request, in order; never raises for a single request's failure.

        Args:
            requests: chat messages, one list per request.
            sampling: how to sample (None: the backend's greedy default).
            parse: turns a reply into the value the job needs (one function for all requests, or
                one per request); raising :class:`GarbageReply` marks the reply unusable (asked
                again; never cached).
            description: the progress bar's label for this batch.

        Raises:
            BackendError: ``max_consecutive_failures`` calls failed in a row.
        """
        keys = [self.key(messages, sampling) for messages in requests]
        if parse is None or callable(parse):
            parsers: Sequence[Callable[[str], Any]] = [parse or _unchanged] * len(keys)
        elif len(parse) != len(keys):
            raise ValueError(f"generate: {len(parse)} parse functions for {len(keys)} requests")
        else:
            parsers = parse
        self.stats.requests += len(keys)
        unique: dict[str, tuple[list[dict], Callable[[str], Any]]] = {}
        for key, messages, parser in zip(keys, requests, parsers):
            unique.setdefault(key, (messages, parser))  # identical requests are asked (and parsed) once
        done: dict[str, Generation] = {}
        for key, (_, parser) in unique.items():
            text = self.cache.get(key)
            if text is not None:
                try:
                    done[key] = Generation(text, parser(text), cached=True)
                except GarbageReply:
                    pass  # the parser became stricter than when it was cached: ask again
        self.stats.cached += len(keys) - (len(unique) - len(done))
        todo = {key: request for key, request in unique.items() if key not in done}
        with self._progress_bar(len(todo), description or self.description) as advance:
            done.update(self._ask(todo, sampling, advance))
        return [done[key] for key in keys]

    def _ask(
        self, todo: dict[str, tuple[list[dict], Callable[[str], Any]]], sampling: Sampling | None,
        advance: Callable[[], None],
    ) -> dict[str, Generation]:
        """Ask the backend until each request has a usable reply, an error, or no attempt left."""
        done: dict[str, Generation] = {}
        calls: Counter[str] = Counter()
        unusable: dict[str, str] = {}
        pending = list(todo)
        for attempt in range(self.attempts):
            if not pending:
                break
            retry: list[str] = []
            replies = run_calls(self.backend, [(key, todo[key][0]) for key in pending], _for_attempt(sampling, attempt))
            with closing(replies):  # on an exception here, calls not yet started are cancelled
                for key, text, error in replies:
                    calls[key] += 1
                    self.stats.calls += 1
                    if error is not None:
                        done[key] = Generation("", None, error, attempts=calls[key])
                        self._count_failure(error)
                        advance()
                        continue
                    self._consecutive_failures = 0
                    try:
                        value = todo[key][1](text)
                    except GarbageReply as exc:
                        self.stats.garbage += 1
                        unusable[key] = f"{exc} (reply: {text.strip()[:120]!r})"
                        retry.append(key)
                        continue
                    self.cache.put(key, self.backend.name, text)
                    done[key] = Generation(text, value, attempts=calls[key])
                    advance()
            pending = retry
        for key in pending:
            count = calls[key]
            why = f"{count} unusable repl{'ies' if count > 1 else 'y'}; last: {unusable[key]}"
            done[key] = Generation("", None, why, attempts=count)
            self.stats.failed += 1
            advance()
        return done

    def _count_failure(self, error: str) -> None:
        self.stats.failed += 1
        self._consecutive_failures += 1
        if self.max_consecutive_failures and self._consecutive_failures >= self.max_consecutive_failures:
            if self.cache.path is not None:
                resume = (f"Everything generated so far is kept in the cache ({self.cache.path}): fix the backend "
                          "and run the same command again to resume.")
            else:
                resume = "There is no cache file, so running again asks for everything again."
            raise BackendError(f"stopping: the last {self._consecutive_failures} calls to {self.backend.name} failed; "
                               f"last error: {error}\n{resume}")

    @contextmanager
    def _progress_bar(self, total: int, description: str) -> Iterator[Callable[[], None]]:
        with progress_bar(f"{description} ({self.backend.name})", total,
                          enabled=self.progress and total >= PROGRESS_MIN_CALLS) as advance:
            yield advance


def _unchanged(text: str) -> str:
    return text


def _for_attempt(sampling: Sampling | None, attempt: int) -> Sampling | None:
    """The sampling of a retry: another seed when sampling (greedy requests are asked as they were)."""
    if sampling is None or attempt == 0 or sampling.temperature <= 0:
        return sampling
    return dataclasses.replace(sampling, seed=sampling.seed + attempt * _RETRY_SEED_STRIDE)
