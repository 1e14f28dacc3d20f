"""The ``tunelab`` command: one subcommand per stage.

User mistakes (:class:`~tunelab.errors.TunelabError`) print one readable message and exit
non-zero; only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

# Quiet third-party noise before they are imported.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from tunelab.errors import TunelabError  # noqa: E402


def _cmd_env(args: argparse.Namespace) -> int:
    import platform

    import torch

    from tunelab.models.load import cpu_has_fast_bf16, resolve_device, resolve_precision
    from tunelab.train.run_info import package_versions

    for name, version in package_versions().items():
        print(f"{name:14s} {version or 'not installed'}")
    device = resolve_device("auto")
    if device.type == "cuda":
        detail = torch.cuda.get_device_name(device)
    else:
        detail = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, " \
                 f"native bf16: {'yes' if cpu_has_fast_bf16() else 'no'}"
    print(f"{'device':14s} {device} ({detail})")
    print(f"{'precision':14s} {resolve_precision('auto', device)} (what train.precision: auto picks)")
    return 0


def _cmd_config_validate(args: argparse.Namespace) -> int:
    from tunelab.config import dump_config, load_config

    config = load_config(args.file, args.overrides)
    print(f"{args.file}: valid")
    if args.show:
        print(dump_config(config), end="")
    return 0


def _cmd_config_reference(args: argparse.Namespace) -> int:
    from tunelab.docs import config_reference

    text = config_reference()
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def _cmd_models_tiny(args: argparse.Namespace) -> int:
    from tunelab.models.tiny import create_tiny_model
    from tunelab.outputs import atomic_output, claim_output

    out = claim_output(args.out_dir, args.overwrite, "OUT_DIR", [("tokenizer corpus", args.tokenizer_corpus)])
    with atomic_output(out, what="tiny model") as tmp:
        create_tiny_model(
            tmp, arch=args.arch, hidden=args.hidden, layers=args.layers, heads=args.heads,
            kv_heads=args.kv_heads, vocab=args.vocab, tokenizer_corpus=args.tokenizer_corpus, seed=args.seed,
            head_dim=args.head_dim, sliding_window=args.sliding_window,
        )
    print(f"wrote a tiny {args.arch} model to {out}")
    return 0


def _cmd_data_preview(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tunelab.config import load_config
    from tunelab.data.preview import mark_trained
    from tunelab.data.tokenize import prepare_data
    from tunelab.models.load import load_tokenizer, stop_token_ids

    config = load_config(args.config, args.overrides)
    console = Console(soft_wrap=True, force_terminal=True if args.style == "color" else None)
    style = args.style if args.style != "auto" else ("color" if console.is_terminal else "brackets")
    tokenizer = load_tokenizer(config.model.path, config.model.trust_remote_code, config.model.revision)
    stop_ids = stop_token_ids(config.model.path, tokenizer, config.model.trust_remote_code)
    from tunelab.data.kinds import check_data_kind
    from tunelab.train.objectives.registry import objective_data_kinds, objective_spec

    check_data_kind([*config.data.train, *(config.data.eval or [])], config.train.objective, objective_data_kinds())
    data = prepare_data(config.data, objective_spec(config.train.objective).data, config.train.seed, tokenizer,
                        stop_ids)
    legend = "trained tokens in [bold green]green[/], masked tokens dim" if style == "color" else \
        "trained tokens inside [[...]], masked tokens plain"
    console.print(f"{args.config}: {legend}", highlight=False)
    for index in range(min(args.n, len(data.train))):
        row = data.train[index]
        console.rule(f"example {index + 1} ({len(row['input_ids'])} tokens)")
        console.print(mark_trained(tokenizer, row["input_ids"], row["labels"], style), highlight=False)
    console.rule("statistics")
    for line in data.train_report.lines():
        console.print(f"train: {line}", highlight=False)
    for line in data.eval_report.lines() if data.eval_report else []:
        console.print(f"eval: {line}", highlight=False)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.train.launch import check_engine_installed, check_launch, relaunch

    config = load_config(args.config, args.overrides)
    from tunelab.train.run_dir import check_config_location

    check_config_location(args.config, config.output_dir)
    from tunelab.models.source import check_start_model

    check_start_model(config.model.path, config.model.tiny is not None, args.config)
    if args.nproc is not None:  # re-run this command under torchrun; does not return
        relaunch(args.nproc, config.distributed,
                 [args.config, *args.overrides, *(["--resume"] if args.resume else []),
                  *(["--overwrite"] if args.overwrite else [])])
    check_launch(config.distributed, os.environ)  # before the heavy imports: a wrong launch fails at once
    check_engine_installed(config.distributed)
    from tunelab.eval.generation_eval import GenerationEvaluator
    from tunelab.train.engine import train

    evaluators = [GenerationEvaluator(config.eval)] if config.eval.generate_samples else []
    result = train(config, resume=args.resume, overwrite=args.overwrite, evaluators=evaluators)
    if os.environ.get("RANK", "0") != "0":
        return 0  # rank 0 reports for the run
    before = result.start_metrics
    shown = ", ".join(
        f"{k} {before[k]:.4g} -> {v:.4g}" if k in before else f"{k} {v:.4g}"
        for k, v in result.final_metrics.items() if isinstance(v, float)
    )
    print(f"done: {result.steps} steps; " + (f"{shown}; " if shown else "") + f"final model in {result.final_dir}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.eval.report import markdown_table
    from tunelab.eval.suite import EvalOptions, check_thresholds, device_dtype, run_eval
    from tunelab.models.load import generation_stop_ids, load_for_inference, resolve_device
    from tunelab.progress import progress_bar

    defaults: dict = {}
    model_path, files = args.model, args.data or []
    if args.config:
        config = load_config(args.config, args.overrides)
        model_path = model_path or str(Path(config.output_dir) / "final")
        files = files or list(config.data.eval or [])
        defaults = {"template": config.data.template, "max_length": config.data.max_length,
                    "answer_pattern": config.eval.answer_pattern, "max_new_tokens": config.eval.max_new_tokens}
    if not model_path or not files or not args.out:
        raise TunelabError("tunelab eval needs --model (or --config), --data (or data.eval in the config) and --out")
    _check_answer_pattern(args.answer_pattern)
    options = EvalOptions(
        metrics=[m.strip() for m in args.metrics.split(",")] if args.metrics else None,
        max_new_tokens=args.max_new_tokens or defaults.get("max_new_tokens", 256),
        batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        max_length=args.max_length or defaults.get("max_length", EvalOptions.max_length), packing=not args.no_packing,
        template=args.template or defaults.get("template", "auto"),
        answer_pattern=args.answer_pattern or defaults.get("answer_pattern", EvalOptions.answer_pattern),
        max_samples=args.max_samples,
    )
    if args.judge:
        from tunelab.eval.judge import Judge, parse_judge_spec

        options.judge = Judge(parse_judge_spec(args.judge, judge_model=args.judge_model),
                              cache_path=str(Path(args.out) / "judge_cache.jsonl"))
    # The options first, then the outputs, then the model.
    _claim_report_dir(args, ("results.json", "predictions.jsonl", "report.md", "report.html"), files)
    device = resolve_device(args.device)
    with progress_bar(f"loading {model_path}" + (f" + {args.adapter}" if args.adapter else "")):
        model, tokenizer = load_for_inference(model_path, args.adapter, device, device_dtype(device))
    description = {"model": model_path, "adapter": args.adapter, "device": str(device)}
    stop_ids = generation_stop_ids(model.generation_config, tokenizer)
    from tunelab.outputs import write_errors

    with write_errors(args.out, "evaluation report", kept="the model and data are untouched"):
        results = run_eval(model, tokenizer, files, args.out, options, stop_ids, description)
    _explain_judge_failures([s["accounting"] for s in results["sets"]])
    rows = [[name, value] for name, value in results["metrics"].items()]
    print(markdown_table(["metric", "value"], rows))
    print(f"wrote {args.out}/results.json, predictions.jsonl, report.md, report.html")
    failures = check_thresholds(results["metrics"], args.fail_below or [])
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _check_answer_pattern(pattern: str | None) -> None:
    from tunelab.data.answers import check_answer_pattern

    if pattern is not None:
        try:
            check_answer_pattern(pattern)
        except ValueError as exc:
            raise TunelabError(f"--answer-pattern {pattern!r}: {exc}") from None


def _claim_report_dir(args: argparse.Namespace, names: tuple[str, ...], inputs: list[str]) -> None:
    """Refuse to replace an earlier report in ``--out`` (without --overwrite) or an input file (ever)."""
    from tunelab.outputs import claim_files

    claim_files([Path(args.out) / name for name in names], args.overwrite, "--out", inputs)


def _explain_judge_failures(accountings: list[dict]) -> None:
    """Print how many judge calls failed and the first reason of each kind (stderr)."""
    from tunelab.failures import reason_lines

    for accounting in accountings:
        reasons = accounting.get("judge_failure_reasons") or {}
        if reasons:
            count = sum(entry["count"] for entry in reasons.values())
            print(f"warning: {count} judge call(s) failed (counted as no verdict); first reason of each kind:",
                  file=sys.stderr)
            print("\n".join(reason_lines(reasons)), file=sys.stderr)


def _cmd_compare(args: argparse.Namespace) -> int:
    from tunelab.eval.compare import run_compare
    from tunelab.eval.report import markdown_table, write_compare_report
    from tunelab.eval.suite import check_thresholds

    _check_answer_pattern(args.answer_pattern)
    _claim_report_dir(args, ("results.json", "verdicts.jsonl", "report.md", "report.html"),
                      [spec.partition("=")[2] or spec for spec in args.predictions or []])

    from tunelab.outputs import write_errors

    with write_errors(args.out, "comparison report", kept="the predictions are untouched"):
        results = run_compare(args.predictions or [], args.judge, args.out, judge_model=args.judge_model,
                              labels_path=args.labels, resamples=args.resamples, seed=args.seed,
                              answer_pattern=args.answer_pattern)
        write_compare_report(args.out, results)
    _explain_judge_failures([results["accounting"]])
    if results["matched_by"] == "prompt":
        print("note: not every prediction has an id: examples matched by prompt text", file=sys.stderr)
    rows = [[p["model_a"], p["model_b"], p["wins"], p["ties"], p["losses"], p["no_verdict"], p["win_rate"],
             p["ci_low"], p["ci_high"], p["p_value"]] for p in results["pairs"]]
    print(markdown_table(["A", "B", "wins", "ties", "losses", "no verdict", "win rate", "ci_low", "ci_high", "p"], rows))
    print(f"wrote {args.out}/results.json, verdicts.jsonl, report.md, report.html")
    first = results["pairs"][0]
    failures = check_thresholds({k: first[k] for k in ("win_rate", "ci_low", "ci_high")}, args.fail_below or [])
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _cmd_reward_score(args: argparse.Namespace) -> int:
    from tunelab.eval.reward_score import score_file, write_scores
    from tunelab.models.load import resolve_device
    from tunelab.train.rl.rewards import RewardModelScorer

    if args.out:
        from tunelab.outputs import claim_files

        outs = ([args.out] if len(args.data) == 1
                else [Path(args.out) / f"{Path(p).stem}.scores.jsonl" for p in args.data])
        claim_files(outs, args.overwrite, "--out", args.data)
    scorer = RewardModelScorer(args.model, resolve_device(args.device), batch_size=args.batch_size)
    for path in args.data:
        rows, summary = score_file(scorer, path, "skip" if args.skip_bad else "fail")
        print(f"{path}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in summary.items()))
        if args.out:
            out = Path(args.out) if len(args.data) == 1 else Path(args.out) / f"{Path(path).stem}.scores.jsonl"
            write_scores(rows, out)
            print(f"wrote {out}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from tunelab.deploy.merge import merge_adapter
    from tunelab.progress import progress_bar

    with progress_bar(f"merging {args.adapter} into its base ({args.dtype})"):
        out = merge_adapter(args.adapter, args.out, args.dtype, args.base, overwrite=args.overwrite)
    print(f"merged {args.adapter} into {out} ({args.dtype})")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from tunelab.data.templates import resolve_template
    from tunelab.monitor.serving import start_serve_monitoring
    from tunelab.progress import progress_bar
    from tunelab.serve.app import ServeSettings, create_app
    from tunelab.serve.engine import model_context_length
    from tunelab.serve.request_log import RequestLog
    from tunelab.serve.server import GracefulServer, raise_open_file_limit, server_config

    if args.engine == "vllm":
        from tunelab.serve.vllm_engine import require_vllm

        require_vllm()  # before anything slow: a missing vLLM fails at once
    adapters = {}
    for spec in args.adapter or []:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise TunelabError(f"--adapter {spec!r}: expected NAME=DIR")
        adapters[name] = directory
    name = args.name or Path(args.model).resolve().name
    monitoring = start_serve_monitoring(args.model, name, args.monitor_db, not args.no_monitor, args.monitor_max_age,
                                        args.monitor_max_rows, args.alert_rules)  # a bad path fails before loading
    settings = ServeSettings(
        model_name=name, adapters=tuple(adapters), api_key=args.api_key or os.environ.get("TUNELAB_API_KEY"),
        max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens, timeout=args.timeout, record_text=args.record_text,
        context_length=model_context_length(args.model), max_body_bytes=args.max_body_bytes,
    )
    with progress_bar(f"loading {args.model}" + (f" and {len(adapters)} adapter(s)" if adapters else "")):
        engine, tokenizer, stop_ids = _serving_engine(args, adapters)
    request_log = RequestLog(args.request_log) if args.request_log else None
    app = create_app(engine, resolve_template(tokenizer, "auto", fallback="chatml"), stop_ids, settings, request_log,
                     monitoring.sinks,
                     monitoring.metrics)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"warning: serving on {args.host} without an API key", file=sys.stderr)
    monitoring.register(args.model, adapters, {"name": name, "host": args.host, "port": args.port,
                                               "adapters": adapters, "record_text": args.record_text,
                                               "engine": args.engine})
    raise_open_file_limit()
    config = server_config(app, args.host, args.port, args.read_timeout, args.keep_alive, args.max_connections,
                           graceful_timeout=args.timeout + 5)
    try:  # returns after SIGTERM/SIGINT once the requests in flight are answered
        GracefulServer(config, on_ready=lambda url: print(f"tunelab serve: {name} ready at {url}", flush=True)).run()
    finally:
        engine.close()
        if request_log is not None:
            request_log.close()
        monitoring.close()
    return 0


def _serving_engine(args: argparse.Namespace, adapters: dict[str, str]):
    """The engine ``tunelab serve`` asked for, the tokenizer the app uses and the stop ids (the model's EOS ids)."""
    from tunelab.eval.suite import device_dtype
    from tunelab.models.load import generation_stop_ids, load_with_adapters, resolve_device

    device = resolve_device(args.device)
    if args.engine == "vllm":
        from tunelab.models.load import stop_token_ids
        from tunelab.serve.vllm_engine import VLLMEngine, load_serving_tokenizer, model_max_len

        tokenizer = load_serving_tokenizer(args.model, adapters)
        engine = VLLMEngine(args.model, tokenizer, adapters, max_queue=args.max_queue,
                            max_batch_size=args.max_batch_size,
                            max_model_len=model_max_len(args.model, args.max_prompt_tokens + args.max_tokens_limit),
                            dtype=str(device_dtype(device)).removeprefix("torch."))
        return engine, tokenizer, stop_token_ids(args.model, tokenizer)
    from tunelab.serve.engine import GenerationEngine

    model, tokenizer = load_with_adapters(args.model, adapters, device, device_dtype(device))
    engine = GenerationEngine(model, tokenizer, args.max_batch_size, args.max_wait_ms, args.max_queue)
    return engine, tokenizer, generation_stop_ids(model.generation_config, tokenizer)


def _cmd_export(args: argparse.Namespace) -> int:
    from tunelab.progress import progress_bar
    from tunelab.track.record import record_export

    if args.prompts:  # the parity report is claimed before the export is written
        from tunelab.deploy.parity.cli import claim_report

        claim_report(args, [args.model, args.out])
    if args.format == "onnx":
        from tunelab.deploy.onnx import export_onnx, verify_onnx

        with progress_bar(f"exporting {args.model} to ONNX"):
            out = export_onnx(args.model, args.out, with_past=not args.no_past, dtype=args.dtype or "float32",
                              overwrite=args.overwrite)
        print(f"wrote {out}")
        if not args.no_verify:
            atol = 1e-4 if (args.dtype or "float32") == "float32" else 1e-2
            with progress_bar("verifying with onnxruntime (logits and greedy generations)"):
                result = verify_onnx(args.model, out, atol=atol)
            print(f"verified with onnxruntime: max |logit difference| {result['max_abs_diff']:.2e}, "
                  f"greedy generations equal: {result['generations_equal']}")
        record_export(args.model, out, {"format": "onnx", "dtype": args.dtype or "float32", "past": not args.no_past},
                      None if args.no_verify else result)
        return _export_parity(args, out)
    from tunelab.deploy.gguf import export_gguf, verify_gguf

    with progress_bar(f"exporting {args.model} to GGUF ({args.outtype})"):
        out = export_gguf(args.model, args.out, args.outtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    if not args.no_verify:
        with progress_bar("verifying the GGUF file by reading it back"):
            summary = verify_gguf(args.model, out)
        errors = ", ".join(f"{kind} {error:.2e}" for kind, error in summary["max_abs_error"].items())
        print(f"verified by reading it back: {summary['n_tensors']} tensors (max |error| {errors}); "
              "tokenizer and chat template match")
        for note in summary["notes"]:
            print(f"note: {note}")
    record_export(args.model, out, {"format": "gguf", "outtype": args.outtype}, None if args.no_verify else summary)
    return _export_parity(args, out)


def _export_parity(args: argparse.Namespace, out: Path) -> int:
    """The parity gate step of ``tunelab export --prompts FILE`` (0 without --prompts)."""
    if not args.prompts:
        return 0
    from tunelab.deploy.parity.cli import export_parity_step

    return export_parity_step(args, Path(out))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tunelab`` command."""
    from tunelab import __version__

    from tunelab.cli_help import TunelabParser, add_examples

    parser = TunelabParser(prog="tunelab", description="Fine-tune, align, evaluate and ship open LLMs.")
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    env = commands.add_parser("env", help="print package versions and the device")
    env.set_defaults(func=_cmd_env)

    config = commands.add_parser("config", help="validate a config or print the config reference")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    validate = config_commands.add_parser("validate", help="check a config file (and overrides)")
    validate.add_argument("file")
    validate.add_argument("overrides", nargs="*", help="section.key=value")
    validate.add_argument("--show", action="store_true", help="print the resolved config")
    validate.set_defaults(func=_cmd_config_validate)
    reference = config_commands.add_parser("reference", help="the config reference in Markdown")
    reference.add_argument("--out", help="write it to this file")
    reference.set_defaults(func=_cmd_config_reference)

    models = commands.add_parser("models", help="model utilities")
    models_commands = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    tiny = models_commands.add_parser("tiny", help="write a tiny random model with a real tokenizer (offline)")
    tiny.add_argument("out_dir")
    tiny.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2", "qwen3", "gemma3"])
    tiny.add_argument("--hidden", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--heads", type=int, default=4)
    tiny.add_argument("--kv-heads", type=int, default=None)
    tiny.add_argument("--vocab", type=int, default=1024)
    tiny.add_argument("--head-dim", type=int, default=None,
                      help="head size (default: the family's; qwen3 128, gemma3 256)")
    tiny.add_argument("--sliding-window", type=int, default=None,
                      help="mistral/gemma3 attention window (default: the family's, 4096 / 512)")
    tiny.add_argument("--tokenizer-corpus", default=None, help="text/JSON(L) file to train the tokenizer on")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    tiny.set_defaults(func=_cmd_models_tiny)
    from tunelab.models.cli import add_commands as add_model_import

    add_model_import(models_commands)

    data = commands.add_parser("data", help="data tools")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    preview = data_commands.add_parser("preview", help="print rendered examples with trained tokens marked")
    preview.add_argument("config")
    preview.add_argument("overrides", nargs="*", help="section.key=value")
    preview.add_argument("-n", type=int, default=3, help="examples to show")
    preview.add_argument("--style", choices=["auto", "color", "brackets"], default="auto")
    preview.set_defaults(func=_cmd_data_preview)
    from tunelab.data.cli_tools import add_commands as add_data_tools

    add_data_tools(data_commands)
    from tunelab.data.cli_generate import add_commands as add_data_generation

    add_data_generation(data_commands)

    evaluate = commands.add_parser("eval", help="evaluate a model (or base + adapter) on eval sets")
    evaluate.add_argument("overrides", nargs="*", help="section.key=value for --config")
    evaluate.add_argument("--model", help="HF model directory, or a PEFT adapter directory")
    evaluate.add_argument("--adapter", help="PEFT adapter directory on top of --model")
    evaluate.add_argument("--config", help="a training config: its output_dir/final and data.eval by default")
    evaluate.add_argument("--data", action="append", help="eval file (repeat for several sets)")
    evaluate.add_argument("--out", help="output directory")
    evaluate.add_argument("--metrics", help="comma-separated metric names (default: all)")
    evaluate.add_argument("--max-new-tokens", type=int, default=None,
                          help="longest answer in tokens (default: eval.max_new_tokens of --config, else 256)")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); >0: seeded sampling")
    evaluate.add_argument("--top-p", type=float, default=1.0)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--max-length", type=int, default=None,
                          help="longest prompt + answer in tokens (default: the config's data.max_length, else 1024)")
    evaluate.add_argument("--no-packing", action="store_true", help="padded batches for the perplexity pass")
    evaluate.add_argument("--template", choices=["auto", "tokenizer", "chatml", "gemma", "llama3", "alpaca", "plain"])
    evaluate.add_argument("--max-samples", type=int, default=None, help="first N examples of each set")
    evaluate.add_argument("--answer-pattern", default=None, help="regex whose group 1 is the final answer")
    evaluate.add_argument("--fail-below", action="append", metavar="METRIC=VALUE",
                          help="exit 1 when a metric is below the value (CI regression gate)")
    evaluate.add_argument("--judge", help="grade answers 1-10 with openai:BASE_URL or hf:MODEL_DIR (judge_score)")
    evaluate.add_argument("--judge-model", help="model name for an OpenAI-compatible judge")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    evaluate.set_defaults(func=_cmd_eval)

    compare = commands.add_parser("compare", help="A/B test models' predictions: win rates with CIs")
    compare.add_argument("--predictions", action="append", metavar="[NAME=]FILE",
                         help="predictions.jsonl of one model (tunelab eval); give two or more")
    compare.add_argument("--judge", default="metric:exact_match",
                         help="metric:NAME, openai:BASE_URL, hf:MODEL_DIR or labels (default metric:exact_match)")
    compare.add_argument("--judge-model", help="model name for an OpenAI-compatible judge")
    compare.add_argument("--labels", help="human labels JSONL {id, model_a, model_b, winner} for --judge labels")
    compare.add_argument("--out", required=True, help="output directory")
    compare.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--answer-pattern", default=None, help="regex whose group 1 is the final answer")
    compare.add_argument("--fail-below", action="append", metavar="METRIC=VALUE",
                         help="exit 1 when win_rate/ci_low/ci_high of the first pair is below the value")
    compare.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    compare.set_defaults(func=_cmd_compare)

    reward = commands.add_parser("reward", help="reward model utilities")
    reward_commands = reward.add_subparsers(dest="reward_command", metavar="ACTION", required=True)
    score = reward_commands.add_parser("score", help="score answers (or preference pairs) with a reward model")
    score.add_argument("--model", required=True, help="reward model or adapter directory (train.objective: reward)")
    score.add_argument("--data", required=True, action="append", help="preference pairs or conversations (repeat)")
    score.add_argument("--out", help="JSONL of scores (a directory when several --data are given)")
    score.add_argument("--batch-size", type=int, default=8)
    score.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")
    score.add_argument("--device", default="auto")
    score.add_argument("--overwrite", action="store_true", help="replace existing score files")
    score.set_defaults(func=_cmd_reward_score)

    merge = commands.add_parser("merge", help="merge a LoRA adapter into its base model")
    merge.add_argument("--adapter", required=True, help="PEFT adapter directory (e.g. runs/x/final)")
    merge.add_argument("--out", required=True, help="output model directory")
    merge.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    merge.add_argument("--base", help="base model directory (default: the adapter's base_model_name_or_path)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    merge.set_defaults(func=_cmd_merge)

    export = commands.add_parser("export", help="export a model to ONNX (onnxruntime) or GGUF (llama.cpp/Ollama)")
    export.add_argument("--format", required=True, choices=["onnx", "gguf"])
    export.add_argument("--model", required=True, help="HF model directory (merge adapters first: tunelab merge)")
    export.add_argument("--out", required=True, help="output directory (onnx) or file (gguf)")
    export.add_argument("--outtype", default="f16", choices=["f32", "f16", "q8_0"], help="gguf: weight type")
    export.add_argument("--dtype", choices=["float32", "float16"], help="onnx: weight dtype (default float32)")
    export.add_argument("--no-past", action="store_true", help="onnx: export without KV-cache inputs/outputs")
    export.add_argument("--no-verify", action="store_true", help="skip the readback / onnxruntime parity check")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    export.set_defaults(func=_cmd_export)
    from tunelab.deploy.parity.cli import add_commands as add_verify_command
    from tunelab.deploy.parity.cli import add_gate_options

    add_gate_options(export, for_export=True)
    add_verify_command(commands)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server with batched generation")
    serve.add_argument("--model", required=True, help="HF model directory (e.g. a merged model)")
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

    train = commands.add_parser("train", help="fine-tune a model from a config")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", help="section.key=value, applied after the file")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    train.add_argument("--nproc", type=int, metavar="N",
                       help="train with N processes on this machine (runs torchrun; needs distributed.strategy)")
    train.set_defaults(func=_cmd_train)

    from tunelab.monitor.cli import add_monitor_commands
    from tunelab.track.cli import add_runs_commands

    add_monitor_commands(commands)
    add_runs_commands(commands)
    from tunelab.ui.cli import add_ui_command

    add_ui_command(commands)
    add_examples(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tunelab`` command; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options too: `train run.yaml --resume train.lr=1e-4`.
    if extra:
        if "overrides" in args and all("=" in item and not item.startswith("-") for item in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return args.func(args)
    except TunelabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
