"""The package's layering, read from the code's own imports (every import, the lazy ones inside functions too).

Floors, lowest first (docs/architecture.md draws them): a module may import modules of its own
top-level package and of lower floors, never of its own floor's other packages or of a higher
one; and no modules import each other in a loop. So the training pipeline (``data/``) never
imports the data tools, models, training or anything that serves; ``models/`` never imports
``train/``; ``train/`` never imports evaluation or serving.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tunelab"

FLOORS: list[set[str]] = [
    {"errors", "failures", "faults", "progress", "tables", "hub", "noise", "discovery"},
    {"config", "track", "outputs"},
    {"data", "docs"},
    {"models"},
    {"generation"},
    {"datatools", "train", "serve"},
    {"eval", "deploy", "monitor"},
    {"ui"},
    {"cli"},
    {"__main__"},
]
FLOOR = {name: number for number, names in enumerate(FLOORS) for name in names}

# Imports that run against the floors on purpose: the config validates the method's and the
# objective's sections by the settings classes their own files declare (models/methods/,
# train/objectives/), reached through the registries inside functions while a config is validated
# (importing tunelab.config imports neither; docs/architecture.md says why). Each entry is
# (importing module, imported top-level package); an entry that no longer matches an import must go.
PENDING: set[tuple[str, str]] = {
    ("tunelab.config.methods", "models"),
    ("tunelab.config.objectives", "train"),
}


def module_name(path: Path) -> str:
    """``src/tunelab/data/records.py`` -> ``tunelab.data.records`` (a package's ``__init__`` is the package)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """The tunelab modules ``path`` imports, wherever the import statement stands."""
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "tunelab")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "tunelab":
                continue
            for alias in node.names:  # `from package import module` imports the module
                submodule = f"{source}.{alias.name}"
                found.add(submodule if _is_module(submodule) else source)
    found.discard(own)
    return found


@cache
def _read_graph() -> dict[str, frozenset[str]]:
    return {module_name(path): frozenset(imports_of(path)) for path in sorted(PACKAGE.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """Every module of the package -> the tunelab modules it imports (read once per session)."""
    return {name: set(targets) for name, targets in _read_graph().items()}



def top(module: str) -> str:
    """The top-level package (or module) under ``tunelab`` that ``module`` belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_imports(graph: dict[str, set[str]], pending: set[tuple[str, str]] = frozenset()) -> list[str]:
    """``importer -> imported`` for every import of a package on the same or a higher floor."""
    found = []
    for importer, imported in sorted((a, b) for a, targets in graph.items() for b in targets):
        source, target = top(importer), top(imported)
        if not source or not target or source == target or (importer, target) in pending:
            continue
        if FLOOR[target] >= FLOOR[source]:
            found.append(f"{importer} (floor {FLOOR[source]}) -> {imported} (floor {FLOOR[target]})")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def without(graph: dict[str, set[str]], pending: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    """The graph less the pending imports."""
    skip = set(pending)
    return {a: {b for b in targets if (a, top(b)) not in skip} for a, targets in graph.items()}


def test_every_top_level_package_has_a_floor():
    names = {top(module) for module in import_graph()} - {""}
    assert names - FLOOR.keys() == set(), "give the new top-level package a floor in FLOORS (and in docs/architecture.md)"


def test_nothing_imports_its_own_floor_or_above():
    assert upward_imports(import_graph(), PENDING) == []


def test_no_modules_import_each_other_in_a_loop():
    assert cycles(without(import_graph(), PENDING)) == []


def test_the_training_pipeline_and_the_trainer_never_import_the_data_tools():
    graph = without(import_graph(), PENDING)
    offenders = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
                 if top(a) in ("data", "train", "models") and top(b) == "datatools"]
    assert offenders == []


def test_every_pending_exception_is_still_an_import():
    graph = import_graph()
    live = {(a, top(b)) for a, targets in graph.items() for b in targets}
    assert PENDING - live == set(), "these imports are gone: remove them from PENDING"


def test_the_checks_see_an_upward_import_and_a_loop():
    graph = import_graph()
    assert "tunelab.data.tokenize" in graph["tunelab.train.engine"]  # lazy and top-level imports are both read
    assert "tunelab.models.precision" in graph["tunelab.generation.backends"]  # an import inside a function
    bad = {"tunelab.data.records": {"tunelab.train.engine"}, "tunelab.train.engine": {"tunelab.data.records"}}
    assert upward_imports(bad) == ["tunelab.data.records (floor 2) -> tunelab.train.engine (floor 5)"]
    assert cycles(bad) == [["tunelab.data.records", "tunelab.train.engine"]]
