"""``tunelab data preview|convert|build|cot|clean|stats|split`` (``augment|synth``: :mod:`.data_generate`).

``preview`` shows a training config's data as the run tokenizes it. The other commands read
positional input files and write canonical JSONL to ``--out`` (``split`` writes
``--out DIR/{train,val,test}.jsonl``, ``stats`` a report directory). Each command parses its
arguments (``convert``, ``clean``, ``stats`` and ``split`` also fill unset ones from ``--config``,
see :func:`_config_defaults`), calls one stage function of :mod:`tunelab.datatools`, which checks
the options, claims the outputs and does the work, and prints its result. Nothing heavy is
imported until a command runs (``tunelab --help`` stays fast).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from collections.abc import Callable
from typing import Any

from tunelab.errors import ConfigError, TunelabError

KIND_CHOICES = ["auto", "conversation", "prompt", "text", "preference", "feedback"]
FORMAT_CHOICES = ["auto", "alpaca", "sharegpt", "messages", "qa", "text"]


def _key_values(items: list[str] | None, flag: str) -> dict[str, str]:
    """``["a=b", "c=d"]`` -> ``{"a": "b", "c": "d"}``; a malformed item names the flag."""
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise TunelabError(f"{flag} {item!r}: expected NAME=VALUE")
        out[name.strip()] = value
    return out


def _count(minimum: int) -> Any:
    """An argparse ``type`` for a whole number of at least ``minimum`` (checked as the options are read)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value
    return parse


def _print_lines(lines: list[str]) -> None:
    for line in lines:
        print(line)


def _rejects_note(path: Path | None) -> None:
    if path is not None:
        print(f"rejected records and why: {path}")


def _print_written(result: Any, records: str, read: str) -> None:
    """What a convert/build/cot job wrote (and, in brackets, ``read``), what it skipped and where its rejects went."""
    print(f"wrote {result.written:,} {records} records to {result.out} ({read})")
    if result.report.skipped:
        print(result.report.summary())
    _rejects_note(result.rejects_path)


# What a training config says about reading its data: option name -> the config's value.
_READING_FROM_CONFIG: dict[str, Callable[[Any], Any]] = {
    "format": lambda config: config.data.format,
    "text_field": lambda config: config.data.text_field,
}


def _config_defaults(args: argparse.Namespace, command: str,
                     settings: dict[str, Callable[[Any], Any]] | None = None) -> Any:
    """Fill a data command's unset options from ``--config``; returns the config (None without ``--config``).

    The inputs are the config's ``data.train`` files unless INPUT files are given; each option
    named in ``settings`` (and ``--format``, ``--text-field``) that was not given takes the
    config's value. ``section.key=value`` items among the positional arguments (those that are
    not files) or after the options are the config's overrides. Explicit options and input files
    win over the config. Then ``--format`` and ``--text-field`` fall back to ``auto`` and ``text``.

    Raises:
        ConfigError: a missing or invalid config (named with its line), or overrides without ``--config``.
        TunelabError: neither INPUT files nor ``--config``.
    """
    overrides = [*getattr(args, "overrides", []),
                 *(item for item in args.inputs if "=" in item and not Path(item).exists())]
    config = None
    if args.config:
        from tunelab.config import load_config

        args.inputs = [item for item in args.inputs if item not in overrides]
        config = load_config(args.config, overrides)
        args.inputs = args.inputs or list(config.data.train)
        for name, value_of in {**_READING_FROM_CONFIG, **(settings or {})}.items():
            if getattr(args, name) is None:
                setattr(args, name, value_of(config))
    elif getattr(args, "overrides", []):
        raise ConfigError(f"{' '.join(args.overrides)}: section.key=value overrides need --config RUN.yaml")
    elif not args.inputs:
        raise TunelabError(f"tunelab data {command} needs INPUT files (or --config)")
    args.format = args.format or "auto"
    args.text_field = args.text_field or "text"
    return config


def _cmd_preview(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tunelab.config import load_config
    from tunelab.data.preview import mark_trained
    from tunelab.train.run_data import prepare_run_data

    config = load_config(args.config, args.overrides)
    console = Console(soft_wrap=True, force_terminal=True if args.style == "color" else None)
    style = args.style if args.style != "auto" else ("color" if console.is_terminal else "brackets")
    tokenizer, data = prepare_run_data(config)
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


def _cmd_convert(args: argparse.Namespace) -> int:
    from tunelab.datatools.convert import convert_files

    _config_defaults(args, "convert", {"system": lambda config: config.data.system_prompt})
    result = convert_files(args.inputs, args.out, args.kind, args.format, args.text_field, args.system,
                           args.on_error, args.rejects, overwrite=args.overwrite)
    _print_written(result, result.kind, f"{result.report.read:,} read")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from tunelab.datatools.builders import build_files, builtin_templates_path, load_template_library

    if args.show_templates:
        library = load_template_library(args.templates)
        extended = f", extended by {args.templates}" if args.templates else ""
        print(f"# built-in library: {builtin_templates_path()}{extended}")
        for name, spec in library.items():
            print(f"\n{name}: fields {sorted(spec.inputs)} (optional {sorted(spec.optional)}) -> {spec.answer_field}")
            print(f"  system: {spec.system}")
            for index, template in enumerate(spec.templates):
                print(f"  {name}/{index}: {template!r}")
        return 0
    if not args.inputs or not args.out or not args.task:
        raise TunelabError("tunelab data build needs INPUT files, --task and --out (or --show-templates)")
    result = build_files(
        args.inputs, args.out, args.task, templates=args.templates, seed=args.seed, variants=args.variants,
        fields=_key_values(args.field, "--field"), params=_key_values(args.param, "--param"),
        system="" if args.no_system else args.system, limit=args.limit, num_proc=args.num_proc,
        use_cache=not args.no_cache, rejects_path=args.rejects, overwrite=args.overwrite,
    )
    _print_written(result, f"{args.task} instruction", f"from {result.report.read:,} raw records")
    return 0


def _cmd_cot(args: argparse.Namespace) -> int:
    from tunelab.datatools.cot import CotOptions, cot_files

    options = CotOptions(fmt=args.format, calculator=args.calculator, check_arithmetic=not args.no_check_arithmetic,
                         step_format=args.step_format, answer_format=args.answer_format, system=args.system,
                         kind=args.kind)
    result = cot_files(args.inputs, args.out, options, limit=args.limit, num_proc=args.num_proc,
                       use_cache=not args.no_cache, rejects_path=args.rejects, overwrite=args.overwrite)
    _print_written(result, f"chain-of-thought {args.kind}", f"{result.report.read:,} problems read")
    return 0


def _cmd_clean(args: argparse.Namespace) -> int:
    from tunelab.datatools.quality import CleanOptions, clean_files

    config = _config_defaults(args, "clean")
    args.length_unit = args.length_unit or ("tokens" if config else "words")
    if config is not None and args.length_unit == "tokens":  # lengths as the run counts them
        args.tokenizer = args.tokenizer or config.model.path
        args.max_length = args.max_length if args.max_length is not None else config.data.max_length
    options = CleanOptions(
        exact_dedup=not args.no_dedup, near_dedup=not (args.no_dedup or args.no_near_dedup),
        near_dup_threshold=args.near_dup_threshold, dedup_on=args.dedup_on, min_length=args.min_length,
        max_length=args.max_length, min_answer_length=args.min_answer_length, length_unit=args.length_unit,
        tokenizer=args.tokenizer, garbled_filter=not args.keep_garbled, max_repetition=args.max_repetition,
        redact_pii=args.redact_pii, seed=args.seed,
        languages=tuple(code.strip().lower() for code in args.lang.split(",")) if args.lang else None,
    )
    report = clean_files(args.inputs, args.out, options, kind=args.kind, fmt=args.format, text_field=args.text_field,
                         rejects_path=args.rejects, use_cache=not args.no_cache, num_proc=args.num_proc,
                         overwrite=args.overwrite)
    print(f"wrote {report.kept:,} records to {args.out}")
    _print_lines(report.lines())
    _rejects_note(report.rejects_path)
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from tunelab.datatools.stats import stats_files

    _config_defaults(args, "stats", {"tokenizer": lambda config: config.model.path,
                                     "template": lambda config: config.data.template,
                                     "max_length": lambda config: config.data.max_length})
    report, sketch = stats_files(
        args.inputs, args.out, tokenizer=args.tokenizer, template=args.template or "auto", bins=args.bins,
        max_length=args.max_length, kind=args.kind, fmt=args.format, text_field=args.text_field,
        num_proc=args.num_proc, use_cache=not args.no_cache, overwrite=args.overwrite,
    )
    _print_lines(report.lines())
    print(sketch)
    print(f"report: {Path(args.out) / 'report.md'}, {Path(args.out) / 'stats.json'}"
          + (f", {report.png}" if report.png else ""))
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    from tunelab.datatools.split import split_files

    _config_defaults(args, "split")
    report = split_files(args.inputs, args.out, args.ratios, args.seed, stratify=args.stratify, group=args.group,
                         kind=args.kind, fmt=args.format, text_field=args.text_field, overwrite=args.overwrite)
    print("wrote " + ", ".join(str(path) for path in report.paths.values()))
    _print_lines(report.lines())
    return 0


def _reading_options(parser: argparse.ArgumentParser, kind: bool = True, config: bool = False) -> None:
    """--kind, --format, --text-field (``config``: unset, they default to the --config's data.format and text_field)."""
    if kind:
        parser.add_argument("--kind", choices=KIND_CHOICES, default="auto",
                            help="what the records are (default: decided per file from its first record)")
    parser.add_argument("--format", choices=FORMAT_CHOICES, default=None if config else "auto",
                        help="conversation format of the input (default: "
                             + ("the config's data.format, else " if config else "") + "detected)")
    parser.add_argument("--text-field", default=None if config else "text",
                        help="field holding text for text records (default: "
                             + ("the config's data.text_field, else " if config else "") + "text)")


def _common(parser: argparse.ArgumentParser, out_help: str, inputs_required: bool = True,
            config_help: str | None = None) -> None:
    """INPUT files, --out and --overwrite; with ``config_help`` also --config (then INPUT may be left out)."""
    parser.add_argument("inputs", nargs="+" if inputs_required and not config_help else "*", metavar="INPUT",
                        help="data files: JSON, JSONL, CSV, Parquet, TXT (also .gz)"
                             + ("; with --config also section.key=value overrides" if config_help else ""))
    parser.add_argument("--out", required=inputs_required or bool(config_help), help=out_help)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace outputs of an earlier run (refused otherwise; an input is never replaced)")
    if config_help:
        parser.add_argument("--config", help=config_help)
        parser.set_defaults(overrides=[])  # section.key=value after the options land here (tunelab.cli.main)


def _map_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-proc", type=_count(1), default=None,
                        help="worker processes (default: one per core, at most 4, for 20,000+ records)")
    parser.add_argument("--no-cache", action="store_true", help="recompute instead of using the on-disk cache")


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``tunelab data`` and its subcommands."""
    from tunelab.cli.data_generate import add_generation_commands

    data = commands.add_parser("data", help="data tools")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    preview = data_commands.add_parser("preview", help="print rendered examples with trained tokens marked")
    preview.add_argument("config")
    preview.add_argument("overrides", nargs="*", help="section.key=value")
    preview.add_argument("-n", type=int, default=3, help="examples to show")
    preview.add_argument("--style", choices=["auto", "color", "brackets"], default="auto")
    preview.set_defaults(func=_cmd_preview)
    convert = data_commands.add_parser("convert", help="any supported format -> canonical JSONL, with a rejects report")
    _common(convert, "output JSONL file", config_help="a training config: its data.train files, data.format, "
                                                      "data.text_field and data.system_prompt by default")
    _reading_options(convert, config=True)
    convert.add_argument("--system", help="system prompt for conversations and prompts that have none (default: "
                                          "the config's data.system_prompt)")
    convert.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                         help="skip bad records and list them (default), or stop at the first")
    convert.add_argument("--rejects", help="where rejected records go (default: OUT's name + .rejects.jsonl)")
    convert.set_defaults(func=_cmd_convert)

    build = data_commands.add_parser("build", help="task records (qa, summarization, ...) -> instruction records")
    _common(build, "output JSONL file", inputs_required=False)
    build.add_argument("--task", help="qa, summarization, translation, classification, general, "
                                      "or a task from --templates")
    build.add_argument("--templates", help="YAML file that extends the built-in template library")
    build.add_argument("--show-templates", action="store_true", help="print the template library and exit")
    build.add_argument("--field", action="append", metavar="NAME=KEY", help="read field NAME from raw key KEY")
    build.add_argument("--param", action="append", metavar="NAME=VALUE", help="field NAME is VALUE for every record")
    build.add_argument("--variants", type=_count(1), default=1, help="records per input, each with another phrasing")
    build.add_argument("--seed", type=int, default=0, help="seed of the phrasing choice")
    build.add_argument("--system", help="system prompt instead of the task's")
    build.add_argument("--no-system", action="store_true", help="no system prompt")
    build.add_argument("--limit", type=_count(1), help="first N raw records")
    build.add_argument("--rejects", help="where unusable records go (default: OUT's name + .rejects.jsonl)")
    _map_options(build)
    build.set_defaults(func=_cmd_build)

    cot = data_commands.add_parser("cot", help="problems with solution steps -> chain-of-thought records (GSM8K too)")
    _common(cot, "output JSONL file")
    cot.add_argument("--format", choices=["auto", "gsm8k", "steps"], default="auto", help="input layout")
    cot.add_argument("--calculator", choices=["strip", "keep"], default="strip",
                     help="GSM8K <<expr=result>> annotations: remove (default) or keep")
    cot.add_argument("--no-check-arithmetic", action="store_true",
                     help="keep GSM8K records whose calculator annotations are wrong")
    cot.add_argument("--step-format", default="{n}. {step}", help="how a step is written")
    cot.add_argument("--answer-format", default="answer: {answer}", help="the final line")
    cot.add_argument("--system", help="system prompt for every record")
    cot.add_argument("--kind", choices=["conversation", "prompt"], default="conversation",
                     help="conversation (training) or prompt with the answer as reference (eval, RL)")
    cot.add_argument("--limit", type=_count(1), help="first N problems")
    cot.add_argument("--rejects", help="where unusable problems go (default: OUT's name + .rejects.jsonl)")
    _map_options(cot)
    cot.set_defaults(func=_cmd_cot)

    clean = data_commands.add_parser("clean", help="dedup (exact + MinHash near-dup), length/garbled/language "
                                                   "filters, PII redaction")
    _common(clean, "output JSONL file", config_help="a training config: its data.train files, data.format, "
                                                  "data.text_field by default, and lengths in tokens of model.path's "
                                                  "tokenizer up to data.max_length")
    _reading_options(clean, config=True)
    clean.add_argument("--no-dedup", action="store_true", help="keep duplicates")
    clean.add_argument("--no-near-dedup", action="store_true", help="remove exact duplicates only")
    clean.add_argument("--near-dup-threshold", type=float, default=0.8, help="Jaccard similarity (default 0.8)")
    clean.add_argument("--dedup-on", choices=["all", "prompt", "answer"], default="all",
                       help="text compared for duplicates (system prompts never count)")
    clean.add_argument("--min-length", type=_count(0), help="drop records shorter than this (--length-unit)")
    clean.add_argument("--max-length", type=_count(1), help="drop records longer than this (--length-unit; "
                                                             "default with --config: data.max_length tokens)")
    clean.add_argument("--min-answer-length", type=_count(0), help="drop records whose answer is shorter")
    clean.add_argument("--length-unit", choices=["words", "chars", "tokens"], default=None,
                       help="(default: words; with --config, tokens)")
    clean.add_argument("--tokenizer", help="tokenizer or model directory (for --length-unit tokens; default: the "
                                           "config's model.path)")
    clean.add_argument("--keep-garbled", action="store_true", help="do not drop empty or garbled texts")
    clean.add_argument("--max-repetition", type=float, default=0.5,
                       help="share of repeated word 3-grams that marks a looping text (default 0.5)")
    clean.add_argument("--redact-pii", action="store_true", help="replace e-mail addresses and phone numbers")
    clean.add_argument("--lang", help="keep only these languages (ISO 639-1, comma-separated: en,de)")
    clean.add_argument("--seed", type=int, default=0, help="seed of the MinHash permutations")
    clean.add_argument("--rejects", help="where removed records go, with why (default: OUT's name + .rejects.jsonl)")
    _map_options(clean)
    clean.set_defaults(func=_cmd_clean)

    stats = data_commands.add_parser("stats", help="counts, token-length histogram (PNG + terminal), formats")
    _common(stats, "report directory (stats.json, report.md, token_lengths.png)",
            config_help="a training config: its data.train files, model.path's tokenizer, data.template, "
                        "data.max_length, data.format by default")
    _reading_options(stats, config=True)
    stats.add_argument("--tokenizer", help="tokenizer or model directory (default: the config's model.path, "
                                           "else lengths in words)")
    stats.add_argument("--template", choices=["auto", "tokenizer", "chatml", "gemma", "llama3", "alpaca", "plain"],
                       default=None, help="chat template used to render conversations (default: the config's "
                                          "data.template, else auto)")
    stats.add_argument("--bins", type=_count(1), default=20, help="histogram bins")
    stats.add_argument("--max-length", type=_count(1), help="also count records longer than this (default: the "
                                                             "config's data.max_length)")
    _map_options(stats)
    stats.set_defaults(func=_cmd_stats)

    split = data_commands.add_parser("split", help="train/val/test by ratios with a seed, optionally stratified")
    _common(split, "output directory (train.jsonl, val.jsonl, test.jsonl)",
            config_help="a training config: its data.train files, data.format and data.text_field by default")
    _reading_options(split, config=True)
    split.add_argument("--ratios", default="0.8,0.1,0.1", help="train,val[,test] (default 0.8,0.1,0.1)")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--stratify", metavar="FIELD", help="keep this field's values in the same proportions "
                                                          "(dotted path: label, task, provenance.tool)")
    split.add_argument("--group", metavar="FIELD", help="keep records sharing this field's value in one split")
    split.set_defaults(func=_cmd_split)

    add_generation_commands(data_commands)
