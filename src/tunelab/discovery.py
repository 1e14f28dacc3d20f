"""Importing every module of a package, so that each registers what it declares (objectives, methods).

The registries call :func:`import_package_modules` on every lookup; it remembers each package it
imported, so only the first lookup imports anything and a registry keeps no flag of its own.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache


@cache
def import_package_modules(package_name: str) -> tuple[str, ...]:
    """Import ``package_name`` and every module directly inside it, once per package (each module registers
    itself on import); later calls return at once. Returns the modules' full names, in the package's order.

    A failed import is not remembered: the next call tries again (and raises again).
    """
    package = importlib.import_module(package_name)
    names = tuple(f"{package_name}.{module.name}" for module in pkgutil.iter_modules(package.__path__))
    for name in names:
        importlib.import_module(name)
    return names
