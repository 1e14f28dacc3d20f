"""The whole run: the sections, the objective's own section, and the cross-section rules."""

from __future__ import annotations

from typing import Any

from pydantic import (
    Field,
    SerializationInfo,
    SerializeAsAny,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from tunelab.config.base import MethodSettings, ObjectiveSettings, Section
from tunelab.config.data import DataConfig
from tunelab.config.distributed import DistributedConfig
from tunelab.config.eval import EvalConfig
from tunelab.config.methods import method_spec, method_specs
from tunelab.config.model import ModelConfig
from tunelab.config.objectives import objective_specs
from tunelab.config.rules import base_quantization, config_errors
from tunelab.config.track import TrackConfig
from tunelab.config.train import TrainConfig

OBJECTIVE_FIELD = "objective_settings"
"""The field that holds the objective's section in Python; in YAML it is the section named after the objective."""


def _error(loc: tuple, error: dict[str, Any]) -> InitErrorDetails:
    details: dict[str, Any] = {"type": error["type"], "loc": loc, "input": error.get("input")}
    if "ctx" in error:
        details["ctx"] = error["ctx"]
    return InitErrorDetails(**details)


def _method_section(given: Any) -> tuple[MethodSettings, list[InitErrorDetails]]:
    """The ``method`` section validated by the settings class of its ``type`` (lora when absent).

    An unknown type is reported at ``method.type``; the other keys are then checked as lora's.
    """
    if isinstance(given, MethodSettings):
        return given, []
    if not isinstance(given, dict):
        given = {} if given is None else given
        if not isinstance(given, dict):
            return MethodSettings(), [InitErrorDetails(type="model_type", loc=("method",), input=given,
                                                       ctx={"class_name": "MethodSettings"})]
    specs = method_specs()
    name = given.get("type", "lora")
    errors: list[InitErrorDetails] = []
    if not isinstance(name, str) or name not in specs:
        expected = ", ".join(repr(n) for n in list(specs)[:-1]) + f" or {list(specs)[-1]!r}"
        errors.append(InitErrorDetails(type="literal_error", loc=("method", "type"), input=name,
                                       ctx={"expected": expected}))
        given, name = {**given, "type": "lora"}, "lora"
    unknown_type = bool(errors)
    try:
        return specs[name].settings.model_validate(given), errors
    except ValidationError as exc:
        errors.extend(_error(("method", *error["loc"]), error) for error in exc.errors()
                      if not (unknown_type and error["type"] == "extra_forbidden"))  # unknown type: values only
        return MethodSettings(), errors


class TunelabConfig(Section):
    """A whole run."""

    model: ModelConfig
    method: SerializeAsAny[MethodSettings] = Field(
        default_factory=lambda: method_spec("lora").settings(),
        description="Which parameters train: method.type and that method's settings (validated by its class).",
    )
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    track: TrackConfig = Field(default_factory=TrackConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    output_dir: str = Field(description="Where config.yaml, metrics.jsonl, checkpoints/ and final/ are written.")
    objective_settings: SerializeAsAny[ObjectiveSettings] = Field(
        default_factory=ObjectiveSettings, exclude=True,
        description="The settings of train.objective: in YAML, the top-level section named after it.",
    )

    @model_validator(mode="wrap")
    @classmethod
    def _objective_section(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> TunelabConfig:
        """Validate the section named after ``train.objective`` by that objective's settings class.

        A section named after another registered objective is an error; every other problem is
        reported with it, each at its own key.
        """
        if not isinstance(data, dict):
            return handler(data)
        specs = objective_specs()
        train = data.get("train")
        name = train.get("objective", "sft") if isinstance(train, dict) else getattr(train, "objective", "sft")
        errors: list[InitErrorDetails] = []
        core = {key: value for key, value in data.items() if key not in specs and key != OBJECTIVE_FIELD}
        settings: ObjectiveSettings = ObjectiveSettings()  # stands in while the section has errors
        for key in data:
            if key in specs and key != name:
                chosen = specs.get(name) if isinstance(name, str) else None
                instead = (f"move its settings into a '{name}:' section" if chosen and chosen.settings.model_fields
                           else f"remove it ({name} has no settings)")
                errors.append(InitErrorDetails(type=PydanticCustomError(
                    "other_objective_section",
                    "this section holds the settings of objective {other}, but train.objective is {name}; set "
                    "train.objective: {other}, or {instead}", {"other": key, "name": str(name), "instead": instead}),
                    loc=(key,), input=data[key]))
        if OBJECTIVE_FIELD in data and not isinstance(data[OBJECTIVE_FIELD], ObjectiveSettings):
            errors.append(InitErrorDetails(type="extra_forbidden", loc=(OBJECTIVE_FIELD,), input=data[OBJECTIVE_FIELD]))
        if isinstance(name, str) and name in specs:
            given = data.get(name)
            if isinstance(data.get(OBJECTIVE_FIELD), ObjectiveSettings):  # built in Python, not read from YAML
                given = data[OBJECTIVE_FIELD]
            try:
                settings = (given if isinstance(given, specs[name].settings)
                            else specs[name].settings.model_validate({} if given is None else given,
                                                                     context={"objective": name}))
            except ValidationError as exc:
                errors.extend(_error((name, *error["loc"]), error) for error in exc.errors())
        core[OBJECTIVE_FIELD] = settings
        core["method"], method_errors = _method_section(data.get("method"))
        errors.extend(method_errors)
        try:
            config = handler(core)
        except ValidationError as exc:
            errors.extend(_error(tuple(error["loc"]), error) for error in exc.errors())
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return config

    @model_validator(mode="after")
    def _cross_section_rules(self) -> TunelabConfig:
        errors = config_errors(self)
        if errors:
            raise ValueError("\n".join(errors))
        return self

    @model_serializer(mode="wrap")
    def _with_objective_section(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        """The sections in order, the objective's right after ``train`` (under its name)."""
        data = handler(self)
        section = self.objective_settings.model_dump(mode=info.mode)
        if not section or not isinstance(data, dict) or "train" not in data:
            return data
        ordered: dict[str, Any] = {}
        for key, value in data.items():
            ordered[key] = value
            if key == "train":
                ordered[self.train.objective] = section
        return ordered

    @property
    def base_quantization(self) -> str:
        """The quantization the base loads with (``model.quantization``, its ``auto`` resolved by the method)."""
        return base_quantization(self)
