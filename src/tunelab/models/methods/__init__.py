"""Training methods: which parameters train. One file per method, each registered in :mod:`.registry`.

:func:`apply_method` sets up the method a ``method`` section names; the rest of tunelab asks
:func:`method_spec` what it needs to know about it (does the base train? is it prompt learning?).
"""

from __future__ import annotations

from typing import Any

from tunelab.config.base import MethodSettings
from tunelab.models.methods.registry import MethodSpec, method_spec, method_specs, register

__all__ = ["MethodSpec", "apply_method", "method_spec", "method_specs", "packing_conflict", "register"]


def apply_method(model: Any, method: MethodSettings, task_type: str = "CAUSAL_LM") -> Any:
    """Set up the parameters that train for ``method.type`` (see each method's file).

    Raises:
        TunelabError: a layer index or target module that does not exist, or an option PEFT rejects.
    """
    return method_spec(method.type).apply(model, method, task_type)


def packing_conflict(method: MethodSettings) -> str | None:
    """Why ``method`` cannot train on padding-free packed rows, or None when it can.

    Prefix and prompt tuning prepend virtual tokens once per row, so in a packed row only the
    first sequence would see them at the right place (and prompt tuning discards position ids).
    """
    if method_spec(method.type).prompt_learning:
        return f"method.type {method.type} prepends virtual tokens to each row, which needs one sequence per row"
    return None
