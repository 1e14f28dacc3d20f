"""The shape of the ``tunelab`` command: one module per command group, thin commands, a fast ``--help``."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

from tunelab.cli import COMMAND_GROUPS, build_parser, main
from tunelab.cli.help import TunelabParser, leaf_commands

SRC = Path(__file__).resolve().parents[2] / "src" / "tunelab"
CLI = SRC / "cli"
# Modules of the cli package that are not command groups: the entry point, --help formatting, and the
# generation-backed data tools (registered by the data group, whose module they would double in size).
CLI_SUPPORT = {"__init__", "help", "data_generate"}
# What a cli module may import at module level: `tunelab --help` must not pay for torch or a model.
MODULE_LEVEL_IMPORTS = {"__future__", "argparse", "collections.abc", "importlib", "os", "pathlib", "sys",
                        "traceback", "typing", "warnings", "dataclasses", "json", "tunelab.errors"}

LEAVES = sorted(leaf_commands(build_parser()))


def _imports(tree: ast.AST) -> list[tuple[str, list[str], bool]]:
    """(module, names, at module level) of every import in a parsed module."""
    top = {id(node) for node in getattr(tree, "body", [])}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names], id(node) in top))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, [], id(node) in top) for alias in node.names)
    return found


@pytest.mark.parametrize("command", LEAVES)
def test_every_subcommand_help_exits_0_and_shows_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tunelab {command}") and "example:\n  tunelab " in out


def test_each_command_group_is_one_module_that_registers_its_commands():
    modules = {path.stem for path in CLI.glob("*.py")} - CLI_SUPPORT
    assert sorted(modules) == sorted(COMMAND_GROUPS), "a cli module is a command group listed in COMMAND_GROUPS"
    owners: dict[str, str] = {}
    for group in COMMAND_GROUPS:
        commands = TunelabParser(prog="tunelab").add_subparsers(dest="command")
        import_module(f"tunelab.cli.{group}").register(commands)
        assert commands.choices, f"tunelab.cli.{group} registers no command"
        for name in commands.choices:
            assert name not in owners, f"{name} is registered by both {owners[name]} and {group}"
            owners[name] = group
    top_level = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(top_level.choices) == list(owners)  # the whole command, in the order of COMMAND_GROUPS
    assert {leaf.split()[0] for leaf in LEAVES} == set(owners)


def test_nothing_outside_the_cli_package_imports_it():
    offenders = []
    for path in SRC.rglob("*.py"):
        if CLI in path.parents or path == SRC / "__main__.py":
            continue
        for module, _, _ in _imports(ast.parse(path.read_text())):
            if module == "tunelab.cli" or module.startswith("tunelab.cli."):
                offenders.append(f"{path.relative_to(SRC)} imports {module}")
    assert offenders == []


def test_cli_modules_import_argparse_at_module_level_and_only_public_stage_functions_when_run():
    problems = []
    for path in sorted(CLI.glob("*.py")):
        for module, names, at_top in _imports(ast.parse(path.read_text())):
            if at_top and module not in MODULE_LEVEL_IMPORTS:
                problems.append(f"cli/{path.name}: {module} at module level (import it in the command)")
            if module.startswith("tunelab.cli") and path.stem not in CLI_SUPPORT and \
                    module not in ("tunelab.cli.help", "tunelab.cli.data_generate"):
                problems.append(f"cli/{path.name}: imports the command group {module}")
            private = [name for name in names if name.startswith("_")]
            if module.startswith("tunelab.") and private:
                problems.append(f"cli/{path.name}: {module} {private} is not a stage's public function")
    assert problems == []


def test_building_the_parser_imports_neither_torch_nor_transformers():
    code = ("import sys\nfrom tunelab.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
