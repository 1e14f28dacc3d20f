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

    out = create_tiny_model(
        args.out_dir, arch=args.arch, hidden=args.hidden, layers=args.layers, heads=args.heads,
        kv_heads=args.kv_heads, vocab=args.vocab, tokenizer_corpus=args.tokenizer_corpus, seed=args.seed,
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
    data = prepare_data(config.data, config.train.objective, config.train.seed, tokenizer, stop_ids)
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
    from tunelab.eval.exact_match import ExactMatchEvaluator
    from tunelab.train.engine import train

    config = load_config(args.config, args.overrides)
    evaluators = [ExactMatchEvaluator(config.eval)] if config.eval.generate_samples else []
    result = train(config, resume=args.resume, overwrite=args.overwrite, evaluators=evaluators)
    before = result.start_metrics
    shown = ", ".join(
        f"{k} {before[k]:.4g} -> {v:.4g}" if k in before else f"{k} {v:.4g}"
        for k, v in result.final_metrics.items() if isinstance(v, float)
    )
    print(f"done: {result.steps} steps; " + (f"{shown}; " if shown else "") + f"final model in {result.final_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tunelab`` command."""
    from tunelab import __version__

    parser = argparse.ArgumentParser(prog="tunelab", description="Fine-tune, align, evaluate and ship open LLMs.")
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
    tiny.add_argument("--arch", default="llama")
    tiny.add_argument("--hidden", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--heads", type=int, default=4)
    tiny.add_argument("--kv-heads", type=int, default=None)
    tiny.add_argument("--vocab", type=int, default=1024)
    tiny.add_argument("--tokenizer-corpus", default=None, help="text/JSON(L) file to train the tokenizer on")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_cmd_models_tiny)

    data = commands.add_parser("data", help="data tools")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    preview = data_commands.add_parser("preview", help="print rendered examples with trained tokens marked")
    preview.add_argument("config")
    preview.add_argument("overrides", nargs="*", help="section.key=value")
    preview.add_argument("-n", type=int, default=3, help="examples to show")
    preview.add_argument("--style", choices=["auto", "color", "brackets"], default="auto")
    preview.set_defaults(func=_cmd_data_preview)

    train = commands.add_parser("train", help="fine-tune a model from a config")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", help="section.key=value, applied after the file")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    train.set_defaults(func=_cmd_train)
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
