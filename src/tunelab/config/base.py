"""What every config section shares: unknown keys are errors, assignments are validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationInfo


class Section(BaseModel):
    """A config section: a mapping whose unknown keys are errors (with a "did you mean")."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ObjectiveSettings(Section):
    """The settings of an objective: the top-level section named after ``train.objective``.

    Each objective's file in ``tunelab.train.objectives`` declares a subclass in its
    ``ObjectiveSpec``; an objective without settings of its own uses this class as is (its
    section may then be absent or empty).
    """


def objective_name(info: ValidationInfo) -> str:
    """The objective whose section is being validated (for messages), from the validation context."""
    context = info.context if isinstance(info.context, dict) else {}
    return str(context.get("objective", "the objective"))
