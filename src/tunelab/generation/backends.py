"""Generation backends: any OpenAI-compatible chat API, or a local Hugging Face model.

Both answer chat messages with one reply. :class:`OpenAIBackend` posts to
``{base_url}/chat/completions`` with ``urllib`` (no client library), retries connection errors,
timeouts, HTTP 429/5xx and malformed responses with exponential backoff (honouring
``Retry-After``), and reads its API key from an environment variable. :class:`HFBackend` runs a
local model directory (or a PEFT adapter directory) with batched ``generate`` and the model's
own chat template.

:func:`parse_backend_spec` turns the CLI strings ``openai:BASE_URL`` and ``hf:MODEL_DIR`` into a
backend. The batch machinery (cache, concurrency, retries of unusable replies) lives in
:mod:`tunelab.generation.runner`.
"""

from __future__ import annotations

import email.utils
import http.client
import ipaddress
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from tunelab.errors import TunelabError

DEFAULT_OPENAI_URL = "https://api.openai.com/v1"


class BackendError(TunelabError):
    """A generation backend cannot be used: bad spec, unreachable server, unusable response."""


@dataclass(frozen=True)
class Sampling:
    """How to sample one reply.

    Attributes:
        temperature: 0 is greedy; above 0 samples.
        top_p: nucleus sampling mass (1 keeps the whole distribution).
        max_tokens: longest reply in tokens; None leaves it to the backend's default.
        seed: sampling seed (sent to OpenAI-compatible servers, used by the local model), so a
            sampled job is reproducible where the backend supports it.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int | None = None
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (part of cache keys and provenance)."""
        return asdict(self)


class GenerationBackend(Protocol):
    """A chat model that answers messages.

    Attributes:
        name: identifies the backend *and* its model (part of cache keys), e.g.
            ``openai:qwen2.5-7b@http://127.0.0.1:8000/v1`` or ``hf:/models/tiny``.
        concurrency: how many ``complete`` calls may run at once.
    """

    name: str
    concurrency: int

    def complete(self, messages: list[dict], sampling: Sampling | None = None) -> str:
        """The assistant's reply to ``messages`` (greedy when ``sampling`` is None).

        Raises:
            BackendError (or any exception): the call failed.
        """
        ...


@runtime_checkable
class BatchBackend(GenerationBackend, Protocol):
    """A backend that answers many prompts faster in one batch (a local model)."""

    batch_size: int

    def complete_batch(self, batch: list[list[dict]], sampling: Sampling | None = None) -> list[str]:
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
    """A model served by an OpenAI-compatible chat API (OpenAI, vLLM, llama.cpp, tunelab serve, ...).

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``; requests go to
            ``{base_url}/chat/completions``.
        model: the model name the server knows.
        api_key_env: environment variable holding the API key; sent as a Bearer token when set
            (local servers usually need none). The key itself is never stored or logged.
        timeout: seconds to wait for the server (connecting, and each read of the response).
        max_retries: retries after the first attempt on connection errors, timeouts, HTTP 429 and
            5xx, and responses that are not a chat completion; other HTTP errors fail at once.
        concurrency: requests the batch runner sends at once.
        backoff: first retry delay in seconds, doubled each retry (a 429/503 ``Retry-After``
            header overrides it, at most ``max_backoff``).
        max_backoff: longest delay between two attempts.
        max_tokens: ``max_tokens`` sent when the request's sampling gives none; None leaves it to
            the server.

    Raises:
        BackendError: the URL is not http(s) or a limit is out of range.
    """

    label: ClassVar[str] = "backend"  # names this kind of backend in messages
    error: ClassVar[type[TunelabError]] = BackendError  # the error type it raises

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 60,
        max_retries: int = 3,
        concurrency: int = 8,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_tokens: int | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise self.error(f"{self.label} base URL {base_url!r}: must start with http:// or https://")
        if max_retries < 0 or concurrency < 1 or timeout <= 0:
            raise self.error(f"{self.label}: max_retries must be >= 0, concurrency >= 1 and timeout > 0")
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
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "User-Agent": f"tunelab-{self.label}"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def request_body(self, messages: list[dict], sampling: Sampling | None = None) -> dict[str, Any]:
        """The JSON body sent for ``messages``: temperature 0 unless ``sampling`` says otherwise."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0}
        max_tokens = self.max_tokens
        if sampling is not None:
            body["temperature"] = sampling.temperature
            if sampling.top_p != 1.0:
                body["top_p"] = sampling.top_p
            body["seed"] = sampling.seed
            max_tokens = sampling.max_tokens if sampling.max_tokens is not None else max_tokens
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        return body

    def complete(self, messages: list[dict], sampling: Sampling | None = None) -> str:
        """POST the messages and return the reply's content.

        Raises:
            BackendError: after the last retry (naming the URL and the cause), or at once for an
                HTTP error that retrying cannot fix (400, 401, 404, ...).
        """
        data = json.dumps(self.request_body(messages, sampling)).encode("utf-8")
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
                    message = f"{self.label} {self.url}: HTTP {exc.code}: {detail}{self._hint(exc.code)}"
                    raise self.error(message) from None
            except urllib.error.URLError as exc:
                cause = f"cannot connect: {exc.reason}"
            except (TimeoutError, OSError, http.client.HTTPException) as exc:
                cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                content = _content(payload)
                if content is not None:
                    return content
                cause = f"not a chat completion response: {payload[:200].decode('utf-8', 'replace')!r}"
            if attempt < self.max_retries:
                wait = retry_after if retry_after is not None else delay
                if wait > 0:
                    time.sleep(min(wait, self.max_backoff))
                delay *= 2
        attempts = self.max_retries + 1
        raise self.error(f"{self.label} {self.url}: {cause} (gave up after {attempts} attempt{'s' * (attempts > 1)})")

    def _hint(self, code: int) -> str:
        if code in (401, 403):
            where = f"set {self.api_key_env}" if self.api_key_env else "give an api_key_env"
            return f" (is the API key right? {where})"
        if code == 404:
            return f" (check the base URL, usually ending in /v1, and the model name {self.model!r})"
        return ""


def _content(payload: bytes) -> str | None:
    """The reply text of a chat completion response; None when it is not one."""
    try:
        content = json.loads(payload)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
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
    """A local Hugging Face chat model: batched ``generate``, the model's own chat template.

    Args:
        model_dir: HF model directory (safetensors; a chat template in the tokenizer preferred,
            chatml otherwise), or a PEFT adapter directory (its base comes from its config).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
        max_new_tokens: longest reply when the request's sampling gives no ``max_tokens``.
        batch_size: prompts generated together.

    Raises:
        TunelabError: the directory is not a loadable model.
    """

    concurrency = 1

    def __init__(
        self, model_dir: str | Path, device: str = "auto", max_new_tokens: int = 512, batch_size: int = 8
    ) -> None:
        from tunelab.data.templates import resolve_template
        from tunelab.models.load import load_for_inference
        from tunelab.models.precision import device_dtype, resolve_device

        path = str(model_dir)
        self.device = resolve_device(device)
        self.model, self.tokenizer = load_for_inference(path, device=self.device, dtype=device_dtype(self.device))
        self.template = resolve_template(self.tokenizer, "auto", fallback="chatml")
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        local = Path(path).expanduser()
        self.name = f"hf:{local.resolve() if local.exists() else path}"
        self._lock = threading.Lock()

    def complete(self, messages: list[dict], sampling: Sampling | None = None) -> str:
        """The model's reply to one conversation."""
        return self.complete_batch([messages], sampling)[0]

    def complete_batch(self, batch: list[list[dict]], sampling: Sampling | None = None) -> list[str]:
        """Replies to several conversations, generated ``batch_size`` at a time (greedy by default)."""
        from tunelab.generation.local import generate_answers

        sampling = sampling or Sampling()
        max_new_tokens = sampling.max_tokens if sampling.max_tokens is not None else self.max_new_tokens
        with self._lock:
            return generate_answers(
                self.model, self.tokenizer, self.template, batch,
                max_new_tokens=max_new_tokens, batch_size=self.batch_size,
                temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
            )


def parse_backend_spec(
    spec: str,
    model: str | None = None,
    *,
    default_model: str | None = None,
    openai_class: type[OpenAIBackend] = OpenAIBackend,
    **options: Any,
) -> GenerationBackend:
    """A backend from a CLI string.

    Args:
        spec: ``openai:BASE_URL`` (``openai`` alone means the OpenAI API) or ``hf:MODEL_DIR``.
        model: model name for ``openai:`` backends; an ``hf:`` backend is named by its directory,
            so giving one there is an error.
        default_model: the model an ``openai:`` backend uses when ``model`` is None; with no
            default, leaving the model out is an error.
        openai_class: the OpenAI-compatible class to build (its ``label`` and ``error`` shape the
            messages; the LLM judge passes its own).
        **options: passed to the backend (``concurrency``, ``timeout`` / ``max_new_tokens``,
            ``batch_size``, ...).

    Raises:
        BackendError (or ``openai_class.error``): an unknown kind, a missing URL, directory or
            model name.
    """
    label, error = openai_class.label, openai_class.error
    kind, _, target = spec.partition(":")
    target = target.strip()
    if kind == "openai":
        model = model or default_model
        if not model:
            raise error(f"{label} {spec!r}: name the model the server serves (--backend-model NAME)")
        return openai_class(target or DEFAULT_OPENAI_URL, model, **options)
    if kind == "hf":
        if not target:
            raise error(f"{label} {spec!r}: name the model directory, as hf:MODEL_DIR")
        if model is not None:
            raise error(
                f"{label} {spec!r}: a {label} model name is only for openai: {label}s; hf:MODEL_DIR names the model"
            )
        return HFBackend(target, **options)
    raise error(f"{label} {spec!r}: expected openai:BASE_URL (e.g. openai:http://127.0.0.1:8000/v1) or hf:MODEL_DIR")
