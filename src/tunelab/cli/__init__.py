"""The ``tunelab`` command: one module per command group, each command parse -> config -> one stage function.

Every group module (``env``, ``train``, ``data``, ...) has ``register(commands)``, which adds its
subcommands; adding a group is adding a module and its name to :data:`COMMAND_GROUPS`. The group
modules import only argparse and the standard library at module level (``tunelab --help`` stays
fast); a command imports its stage function when it runs.

User mistakes (:class:`~tunelab.errors.TunelabError`) print one readable message and exit
non-zero; only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from importlib import import_module

# Quiet third-party noise before they are imported.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from tunelab.errors import TunelabError  # noqa: E402

# The command groups in the order ``tunelab --help`` lists their commands (tunelab.cli.NAME each).
COMMAND_GROUPS: tuple[str, ...] = (
    "env",  # env
    "config",  # config validate|reference
    "models",  # models tiny|import|list
    "data",  # data preview|convert|build|cot|clean|stats|split|augment|synth
    "eval",  # eval, compare, reward score
    "export",  # merge, export, verify
    "serve",  # serve
    "train",  # train
    "monitor",  # monitor drift|report|alerts
    "runs",  # runs list|show|diff|lineage
    "ui",  # ui
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tunelab`` command, assembled from :data:`COMMAND_GROUPS`."""
    from tunelab import __version__
    from tunelab.cli.help import TunelabParser, add_examples

    parser = TunelabParser(prog="tunelab", description="Fine-tune, align, evaluate and ship open LLMs.")
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in COMMAND_GROUPS:
        import_module(f"tunelab.cli.{group}").register(commands)
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
