"""The config reference (docs/config.md), generated from the schema so it cannot drift."""

from __future__ import annotations

import json
import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tunelab.config import MethodSettings, TunelabConfig

HEADER = """# Configuration reference

Generated from the schema by `tunelab config reference --out docs/config.md`; do not edit by hand.

A config is one YAML file. The settings of the objective are the top-level section named after
`train.objective` (`train.objective: dpo` -> `dpo: {beta: 0.1}`); a section for another objective is
an error. Override any key after the file on the command line:
`tunelab train run.yaml train.lr=1e-4 data.packing=false`. Unknown keys are errors with a
suggestion, and so is a key given twice (YAML would keep the last silently); every value, pattern
and combination below is checked before a model loads. `tunelab config validate run.yaml` checks a
file without running it.
"""


def _type_name(annotation: typing.Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(str(arg) for arg in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _default(field) -> str:
    if field.default is PydanticUndefined:
        return "required" if field.default_factory is None else json.dumps(field.default_factory(), default=str)
    return json.dumps(field.default, default=str) if not isinstance(field.default, BaseModel) else ""


def _section(model: type[BaseModel], prefix: str, title: str | None = None) -> list[str]:
    lines = [f"## {title or '`' + (prefix.rstrip('.') or 'top level') + '`'}", "", (model.__doc__ or "").strip(), "",
             "| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for name, field in model.model_fields.items():
        if field.exclude:  # the objective's section: rendered per objective below
            continue
        annotation = field.annotation
        inner = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            inner = [annotation]
        if inner and inner[0] is MethodSettings:  # its keys depend on method.type: see the methods below
            continue
        if inner:
            nested.append((inner[0], f"{prefix}{name}."))
            if prefix == "":
                continue
        type_name = f"section `{prefix}{name}`" if inner else _type_name(annotation)
        lines.append(f"| `{prefix}{name}` | {type_name} | {_default(field)} | {field.description or ''} |")
    lines.append("")
    for sub, sub_prefix in nested:
        lines += _section(sub, sub_prefix)
    return lines


def _methods() -> list[str]:
    from tunelab.config import method_specs

    specs = method_specs()
    lines = ["## Methods (`method.type`)", "",
             "Each file in `src/tunelab/models/methods/` registers its method(s) with a settings class: the other "
             "keys of the `method` section. A key of another method is an error that names the methods using it.",
             "", "| method.type | the base trains | prompt learning | what it is |", "|---|---|---|---|"]
    for name, spec in specs.items():
        lines.append(f"| `{name}` | {'yes' if spec.trains_base else 'no'} | {'yes' if spec.prompt_learning else 'no'} "
                     f"| {spec.summary} |")
    lines.append("")
    for spec in dict.fromkeys(specs.values()):
        names = ", ".join(spec.names)
        lines += _section(spec.settings, "method.", f"`method` (type {names})")
    return lines


def _objectives() -> list[str]:
    from tunelab.config import objective_specs

    specs = objective_specs()
    lines = ["## Objectives (`train.objective`)", "",
             "Each file in `src/tunelab/train/objectives/` registers one, with its settings class; this table and "
             "the sections below are read from the registry. An objective's settings are the top-level section "
             "named after it.", "",
             "| objective | trains on | reference model | packing | online | its section | what it is |",
             "|---|---|---|---|---|---|---|"]
    for name, spec in sorted(specs.items()):
        reference = {"none": "no", "always": "yes", "kl": "when kl_coef > 0"}[spec.reference]
        section = f"[`{name}:`](#{name})" if spec.settings.model_fields else "-"
        lines.append(f"| `{name}` | {spec.data} | {reference} | {'yes' if spec.packing else 'no'} | "
                     f"{'yes' if spec.online else 'no'} | {section} | {spec.summary} |")
    lines.append("")
    for name, spec in specs.items():
        if spec.settings.model_fields:
            lines += _section(spec.settings, f"{name}.")
    return lines


def config_reference() -> str:
    """The Markdown reference of every config key: type, default and meaning; then the registered methods and
    objectives with their settings."""
    return (HEADER + "\n" + "\n".join(_section(TunelabConfig, "")) + "\n" + "\n".join(_methods()) + "\n"
            + "\n".join(_objectives()) + "\n")
