"""Reading a config: YAML with the line of every key, ``section.key=value`` overrides, readable errors.

Every mistake becomes a :class:`~tunelab.errors.ConfigError` whose message names the file, the
line and the key (or "command line" for an override), and for an unknown key suggests the closest
valid one. Reading the YAML file is the only file access of the config package.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tunelab.config.aliases import suggest_key
from tunelab.config.methods import method_specs
from tunelab.config.objectives import objective_specs
from tunelab.config.root import OBJECTIVE_FIELD, TunelabConfig
from tunelab.errors import ConfigError, read_user_text


class _LineLoader(yaml.SafeLoader):
    """A YAML loader that remembers the line of every mapping key, by dotted path."""


def _compose_lines(node: yaml.Node, prefix: str, lines: dict[str, int], source: Path) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            line = key_node.start_mark.line + 1
            if path in lines:  # YAML keeps the last of two equal keys: the first would be dropped silently
                raise ConfigError(f"{source}:{line}: duplicate key '{path}' (first at line {lines[path]}); "
                                  "merge the two into one")
            lines[path] = line
            _compose_lines(value_node, path, lines, source)


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    text = read_user_text(path, "config file", ConfigError)
    loader = _LineLoader(text)
    try:
        node = loader.get_single_node()  # parsed once: the node gives key lines, then the data
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and context_mark:
            problem += f" ({context} started at line {context_mark.line + 1})"
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections (model:, data:, train: ...)")
    lines: dict[str, int] = {}
    if node is not None:
        _compose_lines(node, "", lines, path)
    return data, lines


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into its key path and a YAML-typed value.

    Raises:
        ConfigError: when the text has no ``=`` or an empty key.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _apply_override(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def _key_of(loc: tuple, keep_unknown: bool) -> str:
    """The dotted config key of a pydantic error location (dropping union-branch and index parts)."""
    model: type[BaseModel] | None = TunelabConfig
    parts: list[str] = []
    for part in loc:
        if model is TunelabConfig and not parts and part in objective_specs():  # the objective's section
            parts.append(str(part))
            model = objective_specs()[part].settings
        elif model is TunelabConfig and not parts and part == "method":  # its keys depend on method.type
            parts.append(part)
            model = None
            keep_unknown = True
        elif model is not None and part in model.model_fields and part != OBJECTIVE_FIELD:
            parts.append(str(part))
            annotation = model.model_fields[part].annotation
            nested = [a for a in (annotation, *typing.get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
            model = nested[0] if nested else None
        elif keep_unknown and isinstance(part, str):
            parts.append(part)
            break
        elif model is not None and model is not TunelabConfig:
            break
    return ".".join(parts)


def _objective_of(data: dict[str, Any]) -> str:
    train = data.get("train")
    name = train.get("objective", "sft") if isinstance(train, dict) else "sft"
    return name if isinstance(name, str) else "sft"


def _other_objectives_setting(hint: str | None, objective: str) -> str:
    """When the suggested key is a setting of other objectives than the chosen one, say which."""
    specs = objective_specs()
    section, _, leaf = (hint or "").partition(".")
    if section not in specs or section == objective:
        return ""
    owners = [name for name, spec in specs.items() if leaf in spec.settings.model_fields]
    return f" ({leaf} is a setting of {', '.join(owners)}: it applies to train.objective {' or '.join(owners)} only)"


def _other_methods_setting(key: str, data: dict[str, Any]) -> str | None:
    """For a ``method.*`` key the chosen method does not have but others do: which methods use it."""
    section, _, leaf = key.partition(".")
    method = data.get("method")
    if section != "method" or not isinstance(method, dict):
        return None
    owners = [name for name, spec in method_specs().items() if leaf in spec.settings.model_fields]
    if not owners:
        return None
    return f"method.type {method.get('type', 'lora')} does not use: {leaf} ({', '.join(owners)} only)"


def _format_errors(exc: ValidationError, source: str, lines: dict[str, int], overridden: set[str],
                   objective: str, data: dict[str, Any]) -> str:
    messages: dict[str, str] = {}  # one message per key (a union type reports each branch)
    for error in exc.errors():
        key = _key_of(error["loc"], keep_unknown=error["type"] == "extra_forbidden")
        from_command_line = key in overridden or any(o.startswith(f"{key}.") for o in overridden)
        where = "command line" if from_command_line else f"{source}:{lines[key]}" if key in lines else source
        kind = error["type"]
        if kind == "extra_forbidden" and (other := _other_methods_setting(key, data)):
            text = other
        elif kind == "extra_forbidden":
            hint = suggest_key(key, objective)
            text = f"unknown key '{key}'" + (f"; did you mean '{hint}'?" if hint else "")
            text += _other_objectives_setting(hint, objective)
        elif kind == "missing":
            text = f"missing required key '{key}'"
        elif not key:
            # The cross-section rules: one message per broken rule, each on its own line.
            text = f"\n{where}: ".join(error["msg"].removeprefix("Value error, ").splitlines())
        else:
            value = error.get("input")
            message = error["msg"].removeprefix("Value error, ")
            # A whole section's check (e.g. options that do not fit method.type) has a mapping as input.
            text = f"{key}: {message}" if isinstance(value, dict) else f"'{key}' = {value!r}: {message}"
        messages.setdefault(key, f"{where}: {text}")
    # In the file's order; command-line and whole-config messages after.
    ordered = sorted(messages.items(), key=lambda item: lines.get(item[0], 1 << 30) if item[0] not in overridden
                     else 1 << 30)
    return "\n".join(message for _, message in ordered)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TunelabConfig:
    """Load a YAML config, apply ``section.key=value`` overrides and validate it.

    Args:
        path: the YAML file.
        overrides: ``section.key=value`` strings applied after the file, in order.

    Returns:
        The validated config. Relative data/model paths are resolved against the current directory.

    Raises:
        ConfigError: with one line per problem, naming the file and line (or "command line").
    """
    path = Path(path)
    data, lines = _read_yaml(path)
    overridden: set[str] = set()
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, keys, value)
        overridden.add(".".join(keys))
    return config_from_dict(data, source=str(path), lines=lines, overridden=overridden)


def config_from_dict(
    data: dict[str, Any],
    source: str = "config",
    lines: dict[str, int] | None = None,
    overridden: set[str] | None = None,
) -> TunelabConfig:
    """Validate a config given as a nested dict (as read from YAML).

    Raises:
        ConfigError: one readable line per problem.
    """
    try:
        return TunelabConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source, lines or {}, overridden or set(), _objective_of(data), data)) from None


def dump_config(config: TunelabConfig) -> str:
    """The resolved config as YAML, as saved next to every output (the objective's section after ``train``).

    Loading the text again gives an equal config.
    """
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
