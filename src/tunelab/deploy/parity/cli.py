"""``tunelab verify``, and the parity step of ``tunelab export --prompts FILE``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tunelab.deploy.parity.specs import KIND_HELP


def _gate(specs: list, args: argparse.Namespace) -> int:
    from tunelab.deploy.parity.gate import run_gate
    from tunelab.deploy.parity.prompts import load_parity_prompts
    from tunelab.deploy.parity.report import print_report
    from tunelab.deploy.parity.thresholds import parse_overrides

    overrides = parse_overrides(args.threshold or [])
    prompts = load_parity_prompts(args.prompts, args.limit)
    claim_report(args, [spec.location for spec in specs])
    readers = ("transformers", "llama.cpp") if args.gguf_reader == "both" else (args.gguf_reader,)
    result = run_gate(specs, prompts, args.max_new_tokens, overrides, readers, args.api_key_env)
    print_report(result)
    if args.report:
        from tunelab.outputs import write_text_output

        write_text_output(args.report, json.dumps(result.as_dict(), indent=2, default=str) + "\n", "parity report")
        print(f"wrote {args.report}")
    return 0 if result.passed else 1


def claim_report(args: argparse.Namespace, inputs: list[str]) -> None:
    """Refuse a ``--report`` that exists (without --overwrite) or is one of the inputs (ever), before the gate runs."""
    if args.report:
        from tunelab.outputs import claim_files

        claim_files([args.report], args.overwrite, "--report", [args.prompts, *inputs])


def _cmd_verify(args: argparse.Namespace) -> int:
    from tunelab.deploy.parity.specs import parse_model_spec

    return _gate([parse_model_spec(text) for text in args.model], args)


def export_parity_step(args: argparse.Namespace, exported: Path) -> int:
    """After ``tunelab export ... --prompts FILE``: the exported file against the model it came from."""
    from tunelab.deploy.parity.specs import ModelSpec

    specs = [ModelSpec(f"hf:{Path(args.model).name}", "hf", str(args.model)),
             ModelSpec(f"{args.format}:{exported.name}", args.format, str(exported))]
    return _gate(specs, args)


def add_gate_options(parser: argparse.ArgumentParser, for_export: bool = False) -> None:
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


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``tunelab verify``."""
    verify = commands.add_parser(
        "verify", help="check that models and exports answer alike (adapter, merged, GGUF, ONNX, a server)",
        description="Compare models on the same prompts: prompt tokens, next-token logits, greedy answers and "
                    "stops against the first --model; exit 1 when a model is past its class's limits "
                    "(docs/deploy.md).")
    verify.add_argument("--model", action="append", required=True, metavar="[NAME=][KIND:]LOCATION",
                        help=f"a model to compare (repeat; the first is the reference). KIND: {KIND_HELP}; "
                             "without KIND it is detected from LOCATION")
    add_gate_options(verify)
    verify.set_defaults(func=_cmd_verify)
