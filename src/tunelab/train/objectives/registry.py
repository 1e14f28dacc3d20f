"""The objectives tunelab knows, each declared by its own file.

An objective file in this package calls :func:`register` with an :class:`ObjectiveSpec`: its
name, the data it trains on, whether it needs a reference model, whether its batches can be
packed, whether it learns from its own rollouts (online RL), its settings class (the config section
named after it, validated by the config through this registry), and how to build it from that
section. Nothing else in tunelab names an objective: the config, the data pipeline and the engine
ask the registry. Adding an objective is adding a file here (the registry imports every module of
the package on first use).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from tunelab.config.base import ObjectiveSettings
from tunelab.discovery import import_package_modules

DataKind = Literal["conversations", "text", "pairs", "feedback", "prompts"]
"""What an objective trains on: chat conversations (trained assistant turns), plain text (every
token), preference pairs (chosen/rejected), labelled feedback records (KTO), or prompts answered
by the policy itself (online RL)."""

ReferenceNeed = Literal["none", "always", "kl"]
"""``always``: compares the policy with a frozen reference (DPO, KTO); ``kl``: only when
the objective's ``kl_coef`` is not 0 (or PPO's ``kl_target`` is set: online RL's KL penalty)."""


@dataclass(frozen=True)
class ObjectiveSpec:
    """What the rest of tunelab needs to know about an objective.

    Attributes:
        name: the value of ``train.objective``, and the name of its config section.
        summary: one line for the docs and error messages.
        data: the data kind it trains on (see :data:`DataKind`).
        build: ``build(settings, reference_model_or_None, policy_model) -> objective``, where
            ``settings`` is its own section (an instance of ``settings``).
        settings: its settings class: the keys of its config section, their defaults and checks.
        reference: its reference-model need (see :data:`ReferenceNeed`).
        packing: whether its micro-batches can be padding-free packed rows.
        online: learns from its own rollouts (generate, score, advantages) instead of a dataset.
        score_head: trains a scalar score head (a reward model) instead of the language-model head.
        token_level: a next-token loss over whole sequences, which prompt/prefix tuning and
            NEFTune apply to.
    """

    name: str
    summary: str
    data: DataKind
    build: Callable[[Any, Any, Any], Any]
    settings: type[ObjectiveSettings] = ObjectiveSettings
    reference: ReferenceNeed = "none"
    packing: bool = True
    online: bool = False
    score_head: bool = False
    token_level: bool = False

    def uses_reference(self, settings: ObjectiveSettings) -> bool:
        """Whether a run with these settings compares the policy with a reference model."""
        if self.reference == "kl":
            return bool(settings.uses_kl_penalty)  # type: ignore[attr-defined]  # every online settings class has it
        return self.reference == "always"

    def reference_precomputed(self, settings: ObjectiveSettings) -> bool:
        """Whether the reference log-probs are computed once before training (``precompute_reference``)."""
        return self.reference == "always" and bool(getattr(settings, "precompute_reference", False))

    @property
    def rows_per_example(self) -> int:
        """Sequences one example becomes in a batch (2 for pairs and feedback with its KL pair; 0: not token-batched)."""
        return {"pairs": 2, "feedback": 2, "prompts": 0}.get(self.data, 1)


_REGISTRY: dict[str, ObjectiveSpec] = {}


def register(spec: ObjectiveSpec) -> ObjectiveSpec:
    """Add an objective (called by its module at import time); a second one of the same name is an error."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"objective {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def objective_specs() -> dict[str, ObjectiveSpec]:
    """Every registered objective by name, by module name then in each module's order (the same whatever
    was imported first)."""
    import_package_modules("tunelab.train.objectives")  # the first lookup imports every module; later ones nothing
    order = {name: index for index, name in enumerate(_REGISTRY)}
    return dict(sorted(_REGISTRY.items(), key=lambda item: (item[1].build.__module__, order[item[0]])))


def objective_data_kinds() -> dict[str, DataKind]:
    """Every objective's data kind, by name (what the data layer's checks need, without importing train)."""
    return {name: spec.data for name, spec in objective_specs().items()}


def objective_spec(name: str) -> ObjectiveSpec:
    """The spec of ``train.objective`` ``name``.

    Raises:
        KeyError: no such objective (the message lists the known ones).
    """
    specs = objective_specs()
    if name not in specs:
        raise KeyError(f"unknown objective {name!r}; choose from {', '.join(specs)}")
    return specs[name]
