"""Importing every module of a package, so that each registers what it declares (objectives, methods)."""

from __future__ import annotations

import importlib
import pkgutil


def import_package_modules(package_name: str) -> None:
    """Import ``package_name`` and every module directly inside it (each module registers itself on import)."""
    package = importlib.import_module(package_name)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package_name}.{module.name}")
