"""The training methods tunelab knows, each declared by its own file.

A method file in this package calls :func:`register` with a :class:`MethodSpec`: its names (the
values of ``method.type`` it answers to), its settings class (the ``method`` section's other keys,
validated by the config through this registry), how it applies to a model, and the few facts the
rest of tunelab asks about a method (does the base train? is it prompt learning?). Nothing else in
tunelab names a method to decide what to do: it asks the spec. Adding a method is adding a file
here (the registry imports every module of the package on first use).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunelab.config.base import MethodSettings
from tunelab.discovery import import_package_modules


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of tunelab needs to know about a training method.

    Attributes:
        names: the values of ``method.type`` it answers to (lora answers to lora and qlora).
        summary: one line for the docs.
        settings: its settings class (the ``method`` section).
        apply: ``apply(model, settings, task_type) -> model``: sets up what trains (``task_type``
            ``CAUSAL_LM``, or ``SEQ_CLS`` for a reward model).
        trains_base: the base model's own weights train (full, freeze): the reference is then a
            frozen copy, the weights load in float32, and a quantized base cannot train.
        prompt_learning: trains virtual tokens prepended to each row (prefix, prompt tuning): one
            sequence per row (no packing), next-token objectives only, no chunked loss, and PEFT
            computes the saved tokens in one process.
        position: where it is listed (choices, docs, messages): from the most weights trained to the fewest.
    """

    names: tuple[str, ...]
    summary: str
    settings: type[MethodSettings]
    apply: Callable[[Any, Any, str], Any]
    trains_base: bool = False
    prompt_learning: bool = False
    position: int = 100


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method under each of its names (called by its module at import time); a name taken twice is an error."""
    for name in spec.names:
        if name in _REGISTRY and _REGISTRY[name] is not spec:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = spec
    return spec


def method_specs() -> dict[str, MethodSpec]:
    """Every registered method by name, in listing order (a spec appears under each of its names)."""
    import_package_modules("tunelab.models.methods")  # the first lookup imports every module; later ones nothing
    return dict(sorted(_REGISTRY.items(), key=lambda item: item[1].position))


def method_spec(name: str) -> MethodSpec:
    """The spec of ``method.type`` ``name``.

    Raises:
        KeyError: no such method (the message lists the known ones).
    """
    specs = method_specs()
    if name not in specs:
        raise KeyError(f"unknown method {name!r}; choose from {', '.join(specs)}")
    return specs[name]
