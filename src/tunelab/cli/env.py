"""``tunelab env``: package versions and the device."""

from __future__ import annotations

import argparse


def _cmd_env(args: argparse.Namespace) -> int:
    from tunelab.models.environment import environment_report

    for name, value in environment_report():
        print(f"{name:14s} {value}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``tunelab env``."""
    env = commands.add_parser("env", help="print package versions and the device")
    env.set_defaults(func=_cmd_env)
