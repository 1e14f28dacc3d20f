"""Launch: the config schema as a form, validation with the schema's own messages ("did you mean"),
and training, evaluation and comparison jobs started, followed, stopped and resumed.

A config from the form (or a file plus ``key=value`` overrides) is validated by
:func:`tunelab.config.config_from_dict` / :func:`~tunelab.config.load_config`, exactly as
``tunelab train`` validates it, before anything starts.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from tunelab.config import (
    MethodSettings,
    TunelabConfig,
    config_from_dict,
    load_config,
    method_specs,
    objective_specs,
    parse_override,
)
from tunelab.errors import ConfigError, TunelabError
from tunelab.ui.state import UIState, ui_state

router = APIRouter(prefix="/api")

KEY_IN_MESSAGE = re.compile(r"'([A-Za-z_][\w]*(?:\.[\w]+)*)'")


def _field_kind(annotation: Any) -> tuple[str, list[Any] | None, bool]:
    """(kind, choices, nullable) of a schema field for the form: choice, bool, int, float, text or yaml."""
    args = typing.get_args(annotation)
    nullable = type(None) in args
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            kind, choices, _ = _field_kind(rest[0])
            return kind, choices, nullable
        return "yaml", None, nullable
    if typing.get_origin(annotation) is Literal:
        return "choice", list(args), nullable
    if annotation is bool:
        return "bool", None, nullable
    if annotation is int:
        return "int", None, nullable
    if annotation is float:
        return "float", None, nullable
    if annotation is str:
        return "text", None, nullable
    return "yaml", None, nullable


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def schema_sections(model: type[BaseModel] = TunelabConfig, prefix: str = "") -> list[dict[str, Any]]:
    """The config schema as form sections: each field's dotted key, kind, choices, default and description."""
    top: dict[str, Any] = {"key": prefix.rstrip(".") or "run", "doc": (model.__doc__ or "").strip(), "fields": []}
    sections = [top]
    for name, field in model.model_fields.items():
        if field.exclude:  # the objective's settings: one section per objective below
            continue
        nested = _nested_model(field.annotation)
        if nested is MethodSettings:  # every method's settings in one section (a field serves the methods using it)
            sections += _merged(schema_sections(spec.settings, "method.")
                                for spec in dict.fromkeys(method_specs().values()))
            continue
        if nested is not None:
            sections += schema_sections(nested, f"{prefix}{name}.")
            continue
        kind, choices, nullable = _field_kind(field.annotation)
        if f"{prefix}{name}" == "train.objective":  # the registered objectives (a str in the schema)
            kind, choices = "choice", list(objective_specs())
        if f"{prefix}{name}" == "method.type":  # the registered methods
            kind, choices = "choice", list(method_specs())
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        top["fields"].append({"key": f"{prefix}{name}", "kind": kind, "choices": choices, "nullable": nullable,
                              "required": field.is_required(), "default": default,
                              "description": field.description or ""})
    if model is TunelabConfig:  # each objective's section, named after it (filled in for the chosen one only)
        for objective, spec in objective_specs().items():
            sections += schema_sections(spec.settings, f"{objective}.")
    return [s for s in sections if s["fields"]]


def _merged(method_sections: Any) -> list[dict[str, Any]]:
    """One ``method`` section holding each method's fields once (in registration order)."""
    merged: dict[str, Any] = {"key": "method", "doc": (MethodSettings.__doc__ or "").strip().splitlines()[0],
                              "fields": []}
    seen: set[str] = set()
    for sections in method_sections:
        for section in sections:
            for field in section["fields"]:
                if field["key"] not in seen:
                    seen.add(field["key"])
                    merged["fields"].append(field)
    default = TunelabConfig.model_fields["method"].get_default(call_default_factory=True).type
    merged["fields"][0]["default"] = default  # method.type: the config's default, not the first method's
    return [merged]


@router.get("/schema")
def config_schema() -> dict[str, Any]:
    """The form: sections of fields built from the config schema."""
    return {"sections": schema_sections()}


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[parts[-1]] = value


def form_to_dict(values: dict[str, Any]) -> dict[str, Any]:
    """Form values (dotted key -> text, number or bool) as a nested config dict; YAML-typed where text.

    Empty fields are left out (the schema's default applies).
    """
    data: dict[str, Any] = {}
    kinds = {f["key"]: f["kind"] for s in schema_sections() for f in s["fields"]}
    for key, raw in values.items():
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            continue
        _set(data, key, _typed(raw, kinds.get(key)))
    return data


def _typed(raw: Any, kind: str | None) -> Any:
    """A form value as the schema's type where it reads as one (the schema reports the rest by name)."""
    if not isinstance(raw, str) or kind == "text":
        return raw
    text = raw.strip()
    if kind in ("int", "float"):
        for convert in ((int, float) if kind == "int" else (float,)):
            try:
                return convert(text)
            except ValueError:
                pass
    if text == "null":
        return None
    try:
        return yaml.safe_load(text)  # lists, mappings, booleans, numbers in YAML
    except yaml.YAMLError:
        return text


def _split_errors(message: str) -> list[dict[str, Any]]:
    """The lines of a ConfigError, each with the key it is about (for showing it next to the field)."""
    out = []
    for line in message.splitlines():
        match = KEY_IN_MESSAGE.search(line)
        out.append({"key": match.group(1) if match else None, "message": line})
    return out


class LaunchBody(BaseModel):
    """A training run to validate or start: a config file or form values, plus overrides."""

    config_path: str | None = None
    form: dict[str, Any] | None = None
    overrides: list[str] = Field(default_factory=list)
    overwrite: bool = False


def validated_config(body: LaunchBody) -> tuple[TunelabConfig | None, dict[str, Any] | None, list[dict[str, Any]]]:
    """(config, the form's config dict, errors): errors empty when the config is valid."""
    overrides = [o.strip() for o in body.overrides if o.strip()]
    try:
        if body.config_path:
            return load_config(body.config_path, overrides), None, []
        if body.form is None:
            raise ConfigError("give a config file or fill in the form")
        data = form_to_dict(body.form)
        overridden = set()
        for text in overrides:
            keys, value = parse_override(text)
            _set(data, ".".join(keys), value)
            overridden.add(".".join(keys))
        return config_from_dict(data, source="form", overridden=overridden), data, []
    except ConfigError as exc:
        return None, None, _split_errors(str(exc))


@router.post("/validate")
def validate(body: LaunchBody) -> dict[str, Any]:
    """Check a config as ``tunelab train`` would: {valid, errors: [{key, message}], yaml}."""
    config, data, errors = validated_config(body)
    shown = yaml.safe_dump(data, sort_keys=False) if data is not None else ""
    return {"valid": not errors, "errors": errors, "yaml": shown,
            "output_dir": config.output_dir if config else None}


def _existing_run(output_dir: str) -> bool:
    out = Path(output_dir)
    return any((out / name).exists() for name in ("checkpoints", "final", "metrics.jsonl"))


@router.post("/launch")
def launch(body: LaunchBody, state: UIState = Depends(ui_state)) -> dict[str, Any]:
    """Validate, then start ``tunelab train`` in the background; errors come back without starting anything."""
    config, data, errors = validated_config(body)
    if errors or config is None:
        return {"started": False, "errors": errors}
    out = config.output_dir
    if _existing_run(out) and not body.overwrite:
        return {"started": False, "errors": [{"key": "output_dir", "message": (
            f"output_dir {out} already holds a run: resume it from its run page, tick 'overwrite' to start "
            "again, or choose another output_dir")}]}
    if data is not None:  # the form's config, written where the job's files are
        configs = state.settings.state_dir / "jobs" / "configs"
        configs.mkdir(parents=True, exist_ok=True)
        config_file = configs / f"config-{len(list(configs.glob('*.yaml'))) + 1}.yaml"
        config_file.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        argv = ["train", str(config_file)]
    else:
        config_file = Path(body.config_path or "")
        argv = ["train", str(config_file), *[o.strip() for o in body.overrides if o.strip()]]
    if body.overwrite:
        argv.append("--overwrite")
    job = state.jobs.start("train", argv, f"train {Path(out).name}", output_dir=str(Path(out).resolve()),
                           config=str(config_file))
    return {"started": True, "job": job.public()}


@router.get("/jobs")
def list_jobs(kind: str | None = None, state: UIState = Depends(ui_state)) -> dict[str, Any]:
    """The UI's jobs, newest first."""
    return {"jobs": [j.public() for j in state.jobs.list(kind)], "poll_ms": state.settings.poll_ms}


@router.get("/jobs/{job_id}")
def show_job(job_id: str, state: UIState = Depends(ui_state)) -> dict[str, Any]:
    """One job."""
    return state.jobs.get(job_id).public()


@router.get("/jobs/{job_id}/log")
def job_log(job_id: str, offset: int = 0, state: UIState = Depends(ui_state)) -> dict[str, Any]:
    """The job's output from byte ``offset``; poll with the returned offset until ``running`` is false."""
    text, next_offset = state.jobs.read_log(job_id, max(0, offset))
    job = state.jobs.get(job_id)
    return {"text": text, "offset": next_offset, "status": job.status,
            "running": job.status in ("running", "stopping"), "returncode": job.returncode}


@router.post("/jobs/{job_id}/stop")
def stop_job(job_id: str, state: UIState = Depends(ui_state)) -> dict[str, Any]:
    """SIGTERM: a training run checkpoints its current step and exits."""
    return state.jobs.stop(job_id).public()


@router.post("/jobs/{job_id}/resume")
def resume_job(job_id: str, state: UIState = Depends(ui_state)) -> dict[str, Any]:
    """Start a stopped (or failed) training job again from its newest checkpoint."""
    job = state.jobs.get(job_id)
    if job.kind != "train" or job.config is None:
        raise TunelabError(f"{job_id} is not a training job")
    if job.status in ("running", "stopping"):
        raise TunelabError(f"{job_id} is still running")
    argv = [a for a in job.argv if a not in ("--overwrite", "--resume")] + ["--resume"]
    new = state.jobs.start("train", argv, job.title + " (resumed)", output_dir=job.output_dir, config=job.config,
                           resumed_from=job.id)
    return new.public()
