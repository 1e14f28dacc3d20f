"""What every config section shares: unknown keys are errors, assignments are validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo


class Section(BaseModel):
    """A config section: a mapping whose unknown keys are errors (with a "did you mean")."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MethodSettings(Section):
    """The ``method`` section: ``type`` names a registered method, the other keys are that method's settings.

    Each method's file in ``tunelab.models.methods`` declares a subclass in its ``MethodSpec``. The
    properties below are what the rest of tunelab asks of any method's settings; a method whose
    settings say otherwise overrides them.
    """

    type: str = Field(
        "lora",
        description="Fine-tuning method: one of the registered methods (each file in src/tunelab/models/methods/ "
        "declares its names and settings). full: every weight; freeze: chosen layers; lora, qlora (LoRA on a 4-bit "
        "base): adapters; prefix, prompt: trained virtual tokens. See docs/methods.md.",
    )

    @property
    def needs_quantized_base(self) -> bool:
        """Whether the method trains on a quantized base (qlora): ``model.quantization: auto`` is then 4bit."""
        return False

    @property
    def uses_pissa(self) -> bool:
        """Whether LoRA starts from PiSSA (the adapters hold the principal part of each weight)."""
        return False

    @property
    def lora_plus_lr_ratio(self) -> float | None:
        """LoRA+: the learning-rate ratio of the B matrices (None: one learning rate)."""
        return None


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
