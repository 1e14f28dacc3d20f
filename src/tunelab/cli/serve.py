"""``tunelab serve``: an OpenAI-compatible HTTP server with batched generation."""

from __future__ import annotations

import argparse

from tunelab.errors import TunelabError


def _serve_config_run(args: argparse.Namespace) -> None:
    """Fill ``--model`` (and ``--adapter``) from the run ``--config`` describes; explicit options win."""
    from tunelab.config import load_config
    from tunelab.train.run_models import run_models

    if not args.config:
        if args.overrides:
            raise TunelabError(f"{' '.join(args.overrides)}: section.key=value overrides need --config")
        if args.model is None:
            raise TunelabError("tunelab serve needs --model (or --config)")
        return
    run = run_models(load_config(args.config, args.overrides))
    if args.model is not None:
        return  # the explicit model wins; --adapter stays as given
    if not run.adapter:
        args.model = str(run.trained_final(args.config))
        return
    args.model = run.base
    args.adapter = [*(args.adapter or []), f"{run.name}={run.trained_final(args.config)}"]


def _cmd_serve(args: argparse.Namespace) -> int:
    from tunelab.monitor.serving import start_serve_monitoring
    from tunelab.serve.run import ServeOptions, serve_model

    _serve_config_run(args)
    options = ServeOptions(
        model=args.model, adapters=args.adapter or [], name=args.name, host=args.host, port=args.port,
        api_key=args.api_key, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, timeout=args.timeout, max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
        max_body_bytes=args.max_body_bytes, read_timeout=args.read_timeout, keep_alive=args.keep_alive,
        max_connections=args.max_connections, monitor_db=args.monitor_db, monitor=not args.no_monitor,
        monitor_max_age=args.monitor_max_age, monitor_max_rows=args.monitor_max_rows, alert_rules=args.alert_rules,
        request_log=args.request_log, record_text=args.record_text, engine=args.engine, device=args.device,
    )
    serve_model(options, start_serve_monitoring,
                on_ready=lambda name, url: print(f"tunelab serve: {name} ready at {url}", flush=True))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``tunelab serve``."""
    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server with batched generation")
    serve.add_argument("overrides", nargs="*", help="section.key=value for --config")
    serve.add_argument("--model", help="HF model directory (e.g. a merged model)")
    serve.add_argument("--config", help="a training config: serve its run (a full/freeze run's output_dir/final; "
                                        "an adapter run's model.path with output_dir/final as adapter OUTPUT_DIR_NAME)")
    serve.add_argument("--adapter", action="append", metavar="NAME=DIR", help="a LoRA adapter served as model NAME")
    serve.add_argument("--name", help="the base model's name in the API (default: its directory name)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set TUNELAB_API_KEY)")
    serve.add_argument("--max-batch-size", type=int, default=8)
    serve.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits to fill")
    serve.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    serve.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    serve.add_argument("--max-prompt-tokens", type=int, default=4096)
    serve.add_argument("--max-tokens-limit", type=int, default=2048, help="the largest max_tokens allowed")
    serve.add_argument("--default-max-tokens", type=int, default=256)
    serve.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger request bodies get 413")
    serve.add_argument("--read-timeout", type=float, default=10.0,
                       help="seconds a client has to send a whole request (headers and body)")
    serve.add_argument("--keep-alive", type=float, default=5.0, help="seconds an idle connection stays open")
    serve.add_argument("--max-connections", type=int, default=1000, help="connections at once (then 503)")
    serve.add_argument("--monitor-db", help="SQLite store of per-request records for tunelab monitor "
                                            "(default: $TUNELAB_HOME/monitor/NAME.db, TUNELAB_HOME=~/.tunelab)")
    serve.add_argument("--no-monitor", action="store_true", help="do not record requests in the monitoring store")
    serve.add_argument("--monitor-max-age", default="30d", metavar="DURATION",
                       help="delete stored requests older than this (default 30d)")
    serve.add_argument("--monitor-max-rows", type=int, help="keep at most this many stored requests (the newest)")
    serve.add_argument("--alert-rules", metavar="FILE", help="YAML alert rules checked while serving (docs/monitor.md)")
    serve.add_argument("--request-log", help="also write per-request records to this JSONL file")
    serve.add_argument("--record-text", action="store_true", help="also record prompts and completions")
    serve.add_argument("--engine", choices=["builtin", "vllm"], default="builtin",
                       help="builtin: tunelab's batching engine (CPU or GPU); vllm: vLLM's engine (needs vLLM and a "
                            "CUDA GPU), same API, adapters and records (docs/deploy.md)")
    serve.add_argument("--device", default="auto")
    serve.set_defaults(func=_cmd_serve)
