"""``tunelab serve``: the engine built, the app around it, monitoring, and the server run until stopped.

Cheap checks come first (vLLM installed, ``NAME=DIR`` adapters, the monitoring store's path), then
the model loads. The server returns after SIGTERM/SIGINT once the requests in flight are answered;
the engine, the request log and monitoring are closed on the way out. The command passes the
monitoring in (``monitor.serving``): monitor reads serve's request records, so serve does not import it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeOptions:
    """Everything ``tunelab serve`` takes (its options' defaults)."""

    model: str
    adapters: list[str] = field(default_factory=list)  # NAME=DIR: a LoRA adapter served as model NAME
    name: str | None = None  # the base model's name in the API (default: its directory name)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # default: $TUNELAB_API_KEY
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64
    timeout: float = 60.0
    max_prompt_tokens: int = 4096
    max_tokens_limit: int = 2048
    default_max_tokens: int = 256
    max_body_bytes: int = 4 * 1024 * 1024
    read_timeout: float = 10.0
    keep_alive: float = 5.0
    max_connections: int = 1000
    monitor_db: str | None = None
    monitor: bool = True
    monitor_max_age: str = "30d"
    monitor_max_rows: int | None = None
    alert_rules: str | None = None
    request_log: str | None = None
    record_text: bool = False
    engine: str = "builtin"  # builtin or vllm
    device: str = "auto"


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """``["name=dir", ...]`` -> ``{name: dir}``; a malformed one names the ``--adapter`` option."""
    adapters = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise TunelabError(f"--adapter {spec!r}: expected NAME=DIR")
        adapters[name] = directory
    return adapters


def serving_engine(options: ServeOptions, adapters: dict[str, str]) -> tuple[Any, Any, set[int]]:
    """The engine ``options`` ask for, the tokenizer the app uses and the stop ids (the model's EOS ids)."""
    from tunelab.models.precision import device_dtype
    from tunelab.models.load import generation_stop_ids, load_with_adapters
    from tunelab.models.precision import resolve_device

    device = resolve_device(options.device)
    if options.engine == "vllm":
        from tunelab.models.load import stop_token_ids
        from tunelab.serve.vllm_engine import VLLMEngine, load_serving_tokenizer, model_max_len

        tokenizer = load_serving_tokenizer(options.model, adapters)
        engine = VLLMEngine(options.model, tokenizer, adapters, max_queue=options.max_queue,
                            max_batch_size=options.max_batch_size,
                            max_model_len=model_max_len(options.model,
                                                        options.max_prompt_tokens + options.max_tokens_limit),
                            dtype=str(device_dtype(device)).removeprefix("torch."))
        return engine, tokenizer, stop_token_ids(options.model, tokenizer)
    from tunelab.serve.engine import GenerationEngine

    model, tokenizer = load_with_adapters(options.model, adapters, device, device_dtype(device))
    engine = GenerationEngine(model, tokenizer, options.max_batch_size, options.max_wait_ms, options.max_queue)
    return engine, tokenizer, generation_stop_ids(model.generation_config, tokenizer)


def serve_model(options: ServeOptions, start_monitoring: Callable[..., Any],
                on_ready: Callable[[str, str], None] | None = None) -> None:
    """Serve ``options.model`` (and its adapters) until SIGTERM/SIGINT.

    Args:
        start_monitoring: opens the request store and alert thread before the model loads, with
            the arguments of ``tunelab.monitor.serving.start_serve_monitoring`` (passed in: monitor
            reads serve's request records, so serve does not import monitor).
        on_ready: called with the served name and the URL once the server listens.
    """
    from tunelab.data.templates import resolve_template
    from tunelab.progress import progress_bar
    from tunelab.serve.app import ServeSettings, create_app
    from tunelab.serve.engine import model_context_length
    from tunelab.serve.request_log import RequestLog
    from tunelab.serve.server import GracefulServer, raise_open_file_limit, server_config

    if options.engine == "vllm":
        from tunelab.serve.vllm_engine import require_vllm

        require_vllm()  # before anything slow: a missing vLLM fails at once
    adapters = parse_adapters(options.adapters)
    name = options.name or Path(options.model).resolve().name
    monitoring = start_monitoring(options.model, name, options.monitor_db, options.monitor,
                                        options.monitor_max_age, options.monitor_max_rows,
                                        options.alert_rules)  # a bad path fails before loading
    settings = ServeSettings(
        model_name=name, adapters=tuple(adapters), api_key=options.api_key or os.environ.get("TUNELAB_API_KEY"),
        max_prompt_tokens=options.max_prompt_tokens, max_tokens_limit=options.max_tokens_limit,
        default_max_tokens=options.default_max_tokens, timeout=options.timeout, record_text=options.record_text,
        context_length=model_context_length(options.model), max_body_bytes=options.max_body_bytes,
    )
    with progress_bar(f"loading {options.model}" + (f" and {len(adapters)} adapter(s)" if adapters else "")):
        engine, tokenizer, stop_ids = serving_engine(options, adapters)
    request_log = RequestLog(options.request_log) if options.request_log else None
    app = create_app(engine, resolve_template(tokenizer, "auto", fallback="chatml"), stop_ids, settings, request_log,
                     monitoring.sinks, monitoring.metrics)
    if options.host not in LOOPBACK_HOSTS and not settings.api_key:
        print(f"warning: serving on {options.host} without an API key", file=sys.stderr)
    monitoring.register(options.model, adapters, {"name": name, "host": options.host, "port": options.port,
                                                  "adapters": adapters, "record_text": options.record_text,
                                                  "engine": options.engine})
    raise_open_file_limit()
    config = server_config(app, options.host, options.port, options.read_timeout, options.keep_alive,
                           options.max_connections, graceful_timeout=options.timeout + 5)
    try:  # returns after SIGTERM/SIGINT once the requests in flight are answered
        GracefulServer(config, on_ready=lambda url: on_ready(name, url) if on_ready else None).run()
    finally:
        engine.close()
        if request_log is not None:
            request_log.close()
        monitoring.close()
