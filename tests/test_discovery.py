"""Discovery: every module of a package imported on the registries' first lookup, once, and remembered."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.discovery import import_package_modules


def write_package(root: Path, name: str, modules: dict[str, str]) -> None:
    """A package ``name`` under ``root``; each module runs its line of ``modules``, then adds its name to ``seen``."""
    (root / name).mkdir()
    (root / name / "__init__.py").write_text("seen = []\n")
    for module, first in modules.items():
        (root / name / f"{module}.py").write_text(f"from {name} import seen\n{first}seen.append({module!r})\n")


def test_each_module_is_imported_once_and_the_package_is_remembered(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    write_package(tmp_path, "discovery_probe_once", {"alpha": "", "beta": ""})
    assert import_package_modules("discovery_probe_once") == ("discovery_probe_once.alpha", "discovery_probe_once.beta")
    package = sys.modules["discovery_probe_once"]
    assert package.seen == ["alpha", "beta"]
    (tmp_path / "discovery_probe_once" / "gamma.py").write_text("raise AssertionError('looked at again')\n")
    assert import_package_modules("discovery_probe_once") == ("discovery_probe_once.alpha", "discovery_probe_once.beta")
    assert package.seen == ["alpha", "beta"]  # the second call walked nothing


def test_a_failed_import_is_not_remembered(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # bad.py is rewritten below: no stale bytecode
    write_package(tmp_path, "discovery_probe_broken", {"good": "", "bad": "raise ImportError('needs a package')\n"})
    with pytest.raises(ImportError, match="needs a package"):
        import_package_modules("discovery_probe_broken")
    assert sys.modules["discovery_probe_broken"].seen == []  # "bad" comes first and failed
    fixed = "from discovery_probe_broken import seen\nseen.append('bad')\n"
    (tmp_path / "discovery_probe_broken" / "bad.py").write_text(fixed)
    assert import_package_modules("discovery_probe_broken") == ("discovery_probe_broken.bad",
                                                                "discovery_probe_broken.good")
    assert sys.modules["discovery_probe_broken"].seen == ["bad", "good"]


def test_the_registries_import_their_modules_on_the_first_lookup_only():
    code = """
import sys
from tunelab.discovery import import_package_modules
from tunelab.models.methods import registry as methods
from tunelab.train.objectives import registry as objectives

def loaded(package):
    return sorted(m.rpartition('.')[2] for m in sys.modules if m.startswith(package + '.'))

print(loaded('tunelab.train.objectives'), loaded('tunelab.models.methods'))
objectives.objective_spec('grpo'), methods.method_spec('lora')
print(loaded('tunelab.train.objectives'), loaded('tunelab.models.methods'))
objectives.objective_specs(), objectives.objective_data_kinds(), methods.method_specs()
info = import_package_modules.cache_info()
print(info.misses, info.hits)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    before, after, calls = result.stdout.strip().splitlines()
    assert before == "['base', 'registry'] ['registry']"  # importing a registry imports no objective or method
    assert after == ("['base', 'grpo', 'kto', 'ppo', 'preference', 'registry', 'reward', 'rloo', "
                     "'sequence', 'sft'] ['freeze', 'full', 'lora', 'prompt_learning', 'registry']")
    assert calls == "2 3"  # one discovery per package; every later lookup found it remembered
