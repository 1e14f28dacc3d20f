"""The test suite's own layout, read from the test files' imports: no file under tests/ imports a test module.

What tests share lives in tests/support/ (imported by module name; tests/conftest.py puts it on the
path). Importing a test module from another runs its module-level code a second time and, under
pytest, can collect or parametrise its tests twice; so a helper two test modules need moves to
tests/support/ instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
IMPORTERS = {"import_module", "__import__"}  # importlib.import_module("test_x"), __import__("test_x")


def imported_test_modules(source: str) -> list[str]:
    """The ``test_*`` modules ``source`` imports, wherever the import stands (inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and (
                getattr(node.func, "id", None) in IMPORTERS or getattr(node.func, "attr", None) in IMPORTERS):
            names = [str(node.args[0].value)]
        else:
            continue
        found += [f"{name} (line {node.lineno})" for name in names if name.split(".")[-1].startswith("test_")]
    return found


def test_no_file_under_tests_imports_a_test_module():
    offenders = {str(path.relative_to(TESTS)): imported
                 for path in sorted(TESTS.rglob("*.py")) if path.name != "conftest.py"
                 if (imported := imported_test_modules(path.read_text(encoding="utf-8")))}
    assert offenders == {}, "move the shared helper to tests/support/ and import it from there"


def test_the_check_sees_every_kind_of_import_of_a_test_module():
    source = '''
import json
import test_judge
from live_server import LiveServer
from test_serve import QUESTION, LiveServer

def helper():
    from test_resume import kill_after_step
    import importlib
    return importlib.import_module("test_packing"), __import__("test_distributed"), importlib.import_module("json")
'''
    assert imported_test_modules(source) == ["test_judge (line 3)", "test_serve (line 5)", "test_resume (line 8)",
                                             "test_packing (line 10)", "test_distributed (line 10)"]


def test_the_shared_helpers_live_in_support_and_are_not_collected():
    support = sorted(path.name for path in (TESTS / "support").glob("*.py"))
    assert support and not [name for name in support if name.startswith("test_")]
