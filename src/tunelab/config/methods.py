"""The method registry, as the config sees it: imported on first use, never at import time.

The methods are declared by the files of ``tunelab.models.methods`` (each with its names and its
settings class); the config reaches them only inside these functions, when a config is validated.
"""

from __future__ import annotations

from typing import Any


def method_specs() -> dict[str, Any]:
    """Every registered method by name (a method with several names, e.g. lora and qlora, appears under each)."""
    from tunelab.models.methods.registry import method_specs as registered

    return registered()


def method_spec(name: str) -> Any:
    """The registered method ``name`` (see :func:`method_specs`)."""
    return method_specs()[name]


def method_config(**values: Any) -> Any:
    """A validated ``method`` section from keyword values, e.g. ``method_config(type="lora", rank=8)``.

    Raises:
        KeyError: an unknown ``type``. pydantic.ValidationError: a bad value or a key the method does not use.
    """
    return method_spec(values.get("type", "lora")).settings.model_validate(values)
