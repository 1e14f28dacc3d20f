"""``tunelab merge``, ``tunelab export`` and ``tunelab verify``: ship a model, check that it answers alike."""

from __future__ import annotations

import argparse

from tunelab.errors import TunelabError


def _run_models(args: argparse.Namespace):
    """The models of the run ``--config`` describes (with its overrides)."""
    from tunelab.config import load_config
    from tunelab.train.run_models import run_models

    if not args.config:
        raise TunelabError(f"{' '.join(args.overrides)}: section.key=value overrides need --config")
    return run_models(load_config(args.config, args.overrides))


def _cmd_merge(args: argparse.Namespace) -> int:
    from tunelab.deploy.merge import merge_adapter
    from tunelab.progress import progress_bar

    if args.config or args.overrides:
        run = _run_models(args)
        if not run.adapter and args.adapter is None:
            raise TunelabError(f"--config {args.config}: a {run.method} run saves a whole model, there is no adapter "
                               f"to merge (use {run.final} as is: tunelab export --config {args.config} ...)")
        args.adapter = args.adapter or str(run.trained_final(args.config))
        args.base = args.base or run.base
    elif args.adapter is None:
        raise TunelabError("tunelab merge needs --adapter (or --config) and --out")
    with progress_bar(f"merging {args.adapter} into its base ({args.dtype})"):
        out = merge_adapter(args.adapter, args.out, args.dtype, args.base, overwrite=args.overwrite)
    print(f"merged {args.adapter} into {out} ({args.dtype})")
    return 0


def _gate_options(args: argparse.Namespace):
    """The parity gate's options from ``verify``'s (or ``export --prompts``') arguments."""
    from tunelab.deploy.parity.verify import GateOptions

    return GateOptions(prompts=args.prompts, limit=args.limit, max_new_tokens=args.max_new_tokens,
                       thresholds=args.threshold or [], gguf_reader=args.gguf_reader, api_key_env=args.api_key_env,
                       report=args.report, overwrite=args.overwrite)


def _cmd_export(args: argparse.Namespace) -> int:
    from tunelab.deploy.export import export_model

    if args.config or args.overrides:
        run = _run_models(args)
        if args.model is None and run.adapter:
            raise TunelabError(f"--config {args.config}: a {run.method} run saves an adapter, and an export needs a "
                               f"whole model: merge it first (tunelab merge --config {args.config} --out DIR), "
                               "then pass --model DIR")
        args.model = args.model or str(run.trained_final(args.config))
    elif args.model is None:
        raise TunelabError("tunelab export needs --model (or --config), --format and --out")
    passed = export_model(args.format, args.model, args.out, outtype=args.outtype, dtype=args.dtype,
                          past=not args.no_past, verify=not args.no_verify, overwrite=args.overwrite,
                          parity=_gate_options(args) if args.prompts else None)
    return 0 if passed else 1


def _cmd_verify(args: argparse.Namespace) -> int:
    from tunelab.deploy.parity.verify import verify_models

    return 0 if verify_models(args.model, _gate_options(args)) else 1


def _add_gate_options(parser: argparse.ArgumentParser, for_export: bool = False) -> None:
    """The options the gate shares between ``verify`` and ``export`` (where ``--prompts`` turns the step on)."""
    parser.add_argument("--prompts", required=not for_export,
                        help="prompts: a .txt file (one user message a line) or a prompt data file (JSONL, ...)"
                             + ("; after writing, run the parity gate (tunelab verify) of the export against "
                                "--model on them" if for_export else ""))
    parser.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest greedy answer (default 32)")
    parser.add_argument("--threshold", action="append", metavar="CLASS_OR_NAME.METRIC=VALUE",
                        help="override a limit, e.g. q8_0.min_answers=0.9 (metrics: max_abs_logit, min_top1, "
                             "min_answers, min_stops; classes: f32, f16, bf16, q8_0, quantized, served)")
    parser.add_argument("--gguf-reader", choices=["both", "transformers", "llama.cpp"], default="both",
                        help="read GGUF files back with transformers and/or llama.cpp (llama.cpp is skipped, "
                             "with the reason, where llama-cpp-python is not installed)")
    if for_export:
        parser.set_defaults(api_key_env=None)
    else:
        parser.add_argument("--api-key-env", default="TUNELAB_API_KEY", help="env variable with url models' API key")
    parser.add_argument("--report", help="also write the comparison as JSON to this file")
    if not for_export:  # export has its own --overwrite, for the export and the report alike
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --report file")


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``tunelab merge``, ``tunelab export`` and ``tunelab verify``."""
    from tunelab.deploy.parity.specs import KIND_HELP

    merge = commands.add_parser("merge", help="merge a LoRA adapter into its base model")
    merge.add_argument("overrides", nargs="*", help="section.key=value for --config")
    merge.add_argument("--adapter", help="PEFT adapter directory (e.g. runs/x/final; default: the --config run's)")
    merge.add_argument("--config", help="a training config: its output_dir/final and model.path by default")
    merge.add_argument("--out", required=True, help="output model directory")
    merge.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    merge.add_argument("--base", help="base model directory (default: the config's model.path, else the adapter's "
                                      "base_model_name_or_path)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    merge.set_defaults(func=_cmd_merge)

    export = commands.add_parser("export", help="export a model to ONNX (onnxruntime) or GGUF (llama.cpp/Ollama)")
    export.add_argument("--format", required=True, choices=["onnx", "gguf"])
    export.add_argument("overrides", nargs="*", help="section.key=value for --config")
    export.add_argument("--model", help="HF model directory (merge adapters first: tunelab merge)")
    export.add_argument("--config", help="a training config: its output_dir/final by default (a full or freeze "
                                         "run; merge an adapter run first)")
    export.add_argument("--out", required=True, help="output directory (onnx) or file (gguf)")
    export.add_argument("--outtype", default="f16", choices=["f32", "f16", "q8_0"], help="gguf: weight type")
    export.add_argument("--dtype", choices=["float32", "float16"], help="onnx: weight dtype (default float32)")
    export.add_argument("--no-past", action="store_true", help="onnx: export without KV-cache inputs/outputs")
    export.add_argument("--no-verify", action="store_true", help="skip the readback / onnxruntime parity check")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    export.set_defaults(func=_cmd_export)
    _add_gate_options(export, for_export=True)

    verify = commands.add_parser(
        "verify", help="check that models and exports answer alike (adapter, merged, GGUF, ONNX, a server)",
        description="Compare models on the same prompts: prompt tokens, next-token logits, greedy answers and "
                    "stops against the first --model; exit 1 when a model is past its class's limits "
                    "(docs/deploy.md).")
    verify.add_argument("--model", action="append", required=True, metavar="[NAME=][KIND:]LOCATION",
                        help=f"a model to compare (repeat; the first is the reference). KIND: {KIND_HELP}; "
                             "without KIND it is detected from LOCATION")
    _add_gate_options(verify)
    verify.set_defaults(func=_cmd_verify)
