"""The objective registry, as the config sees it: imported on first use, never at import time.

The objectives are declared by the files of ``tunelab.train.objectives`` (each with its settings
class). The config sits below train, so it reaches the registry only inside these functions, when
a config is validated; importing ``tunelab.config`` imports nothing of ``tunelab.train``.
"""

from __future__ import annotations

from typing import Any


def objective_specs() -> dict[str, Any]:
    """The registered objectives by name (every file of tunelab.train.objectives declares one)."""
    from tunelab.train.objectives.registry import objective_specs as registered

    return registered()


def objective_spec(name: str) -> Any:
    """The registered objective ``name`` (see :func:`objective_specs`)."""
    return objective_specs()[name]
