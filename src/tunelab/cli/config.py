"""``tunelab config validate|reference``: check a config, print the config reference."""

from __future__ import annotations

import argparse
from pathlib import Path


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


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``tunelab config validate`` and ``tunelab config reference``."""
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
