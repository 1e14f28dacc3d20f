"""Task-typed raw records -> instruction records: ``tunelab data build``.

The template library (``resources/instruction_templates.yaml``, extended with ``--templates
FILE``) gives each task (qa, summarization, translation, classification, general, or one you add)
a system prompt, the raw keys its fields are read from, and several phrasings of the user turn.
Each record gets ``variants`` different phrasings, chosen by a seeded hash of its source, so a
rebuild gives the same output and adding records does not reshuffle the others.

Special inputs:

- ``general`` reads self-instruct task files: a record with ``instances: [{input, output}]``
  gives one instruction record per instance.
- ``translation`` reads two parallel text files named by language (``val.en.gz val.de.gz``,
  ``train.en train.de``): line N of one is the translation of line N of the other; the language
  names come from the file suffixes (``--param source_lang=... target_lang=...`` override them).
- ``classification`` fills a missing ``options`` field with the distinct labels of the input.

:class:`InstructionBuilder` is a batched map function, so it also runs on a ``datasets.Dataset``
of raw rows: ``dataset.map(builder, batched=True, with_indices=True, remove_columns=...)``.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tunelab.datatools.cached_map import batch_rows, columns, fingerprint, map_cached
from tunelab.datatools.convert import rejects_path_for, write_rejects
from tunelab.data.files import SUFFIXES, _decode_lines, file_fingerprint, read_rows
from tunelab.datatools.jsonl_output import claim_job_outputs, provenance, write_jsonl
from tunelab.data.records import LoadReport
from tunelab.errors import ConfigError, DataError, TunelabError, read_user_text

TASK_KEYS = {"system", "inputs", "optional", "answer", "templates", "replace_templates"}
LANGUAGES = {
    "ar": "Arabic", "cs": "Czech", "de": "German", "en": "English", "es": "Spanish", "fr": "French",
    "hi": "Hindi", "it": "Italian", "ja": "Japanese", "ko": "Korean", "nl": "Dutch", "pl": "Polish",
    "pt": "Portuguese", "ru": "Russian", "sv": "Swedish", "tr": "Turkish", "uk": "Ukrainian", "zh": "Chinese",
}


@dataclass
class TaskSpec:
    """One task of the template library."""

    name: str
    system: str
    inputs: dict[str, list[str]]
    optional: dict[str, list[str]]
    answer_field: str
    answer_keys: list[str]
    templates: list[str]
    placeholders: list[frozenset[str]] = field(default_factory=list)

    def eligible(self, present_optional: frozenset[str]) -> list[int]:
        """Indices of the templates that name exactly the optional fields a record has."""
        optional = set(self.optional)
        return [i for i, names in enumerate(self.placeholders) if (names & optional) == present_optional]


def _placeholders(template: str, where: str) -> frozenset[str]:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc} (write literal braces as {{{{ and }}}})") from None
    for name in names:
        if not name.isidentifier():
            raise ConfigError(f"{where}: placeholder {{{name}}} must be a plain field name")
    return frozenset(names)


def _keys(value: Any, where: str) -> list[str]:
    keys = [value] if isinstance(value, str) else value
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        raise ConfigError(f"{where}: expected a raw key or a list of raw keys, got {value!r}")
    return keys


def _parse_task(name: str, raw: dict[str, Any], base: dict[str, Any] | None, where: str) -> dict[str, Any]:
    """Merge one task's YAML mapping over its built-in definition (if any), checking the keys."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: task '{name}' must be a mapping of {', '.join(sorted(TASK_KEYS))}")
    unknown = set(raw) - TASK_KEYS
    if unknown:
        raise ConfigError(f"{where}: task '{name}' has unknown keys {sorted(unknown)}; allowed: {sorted(TASK_KEYS)}")
    merged = dict(base or {})
    for key in ("system", "inputs", "optional", "answer"):
        if key in raw:
            merged[key] = raw[key]
    templates = raw.get("templates", [])
    if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
        raise ConfigError(f"{where}: task '{name}': 'templates' must be a list of strings")
    merged["templates"] = templates if raw.get("replace_templates") or not base else base["templates"] + templates
    return merged


def _task_spec(name: str, raw: dict[str, Any], where: str) -> TaskSpec:
    for key in ("inputs", "answer", "templates"):
        if not raw.get(key):
            raise ConfigError(f"{where}: task '{name}' needs '{key}'")
    inputs = raw["inputs"]
    optional = raw.get("optional") or {}
    answer = raw["answer"]
    for key, value in (("inputs", inputs), ("optional", optional), ("answer", answer)):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: task '{name}': '{key}' must map field names to raw keys")
    if len(answer) != 1:
        raise ConfigError(f"{where}: task '{name}': 'answer' must name exactly one field, got {sorted(answer)}")
    system = raw.get("system") or ""
    if not isinstance(system, str):
        raise ConfigError(f"{where}: task '{name}': 'system' must be text")
    answer_field, answer_keys = next(iter(answer.items()))
    spec = TaskSpec(
        name, system, {k: _keys(v, f"{where}: {name}.inputs.{k}") for k, v in inputs.items()},
        {k: _keys(v, f"{where}: {name}.optional.{k}") for k, v in optional.items()},
        answer_field, _keys(answer_keys, f"{where}: {name}.answer"), list(raw["templates"]),
    )
    known = set(spec.inputs) | set(spec.optional)
    for index, template in enumerate(spec.templates):
        place = f"{where}: task '{name}', template {index}"
        names = _placeholders(template, place)
        if names - known:
            raise ConfigError(f"{place} names unknown fields {sorted(names - known)}; "
                              f"the task's fields are {sorted(known)}")
        if set(spec.inputs) - names:
            missing = sorted(set(spec.inputs) - names)
            raise ConfigError(f"{place} leaves out required fields {missing} (make them optional, or name them): "
                              f"{template!r:.80}")
        spec.placeholders.append(names)
    return spec


def builtin_templates_path() -> Path:
    """The shipped template library."""
    return Path(str(resources.files("tunelab") / "resources" / "instruction_templates.yaml"))


def load_template_library(extra: str | Path | None = None) -> dict[str, TaskSpec]:
    """The built-in template library, extended (or overridden) by the YAML file ``extra``.

    Raises:
        ConfigError: the file is not valid YAML or a task is malformed; names file, task and template.
    """
    library: dict[str, dict[str, Any]] = {}
    sources = [(builtin_templates_path(), False)] + ([(Path(extra), True)] if extra else [])
    for path, is_user in sources:
        text = read_user_text(path, "template file", ConfigError)
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of task names to task definitions")
        for name, task in raw.items():
            library[str(name)] = _parse_task(str(name), task, library.get(str(name)) if is_user else None, str(path))
    where = f"{extra}" if extra else str(builtin_templates_path())
    return {name: _task_spec(name, task, where) for name, task in library.items()}


def _text_value(value: Any) -> str | None:
    """A raw field's value as text: strings as they are, numbers formatted, the first of a list."""
    if isinstance(value, dict) and "text" in value:  # SQuAD answers: {"text": [...], "answer_start": [...]}
        value = value["text"]
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None or isinstance(value, (dict, list)):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    text = str(value)
    return text if text.strip() else None


class InstructionBuilder:
    """The batched map function that turns raw rows into instruction records (see the module docstring).

    Output columns: ``record`` (the canonical JSON text, empty on error), ``error`` (why a row
    gave nothing, else empty) and ``source``.
    """

    def __init__(self, spec: TaskSpec, *, seed: int = 0, variants: int = 1, fields: dict[str, str] | None = None,
                 params: dict[str, str] | None = None, system: str | None = None) -> None:
        self.spec = spec
        self.seed = seed
        self.variants = variants
        self.fields = fields or {}
        self.params = params or {}
        self.system = spec.system if system is None else system

    def _value(self, raw: dict[str, Any], name: str, keys: list[str]) -> str | None:
        if name in self.params:
            return self.params[name]
        for key in ([self.fields[name]] if name in self.fields else keys):
            if key in raw:
                return _text_value(raw[key])
        return None

    def _records(self, raw: Any, source: str) -> list[dict[str, Any]]:
        spec = self.spec
        if not isinstance(raw, dict):
            raise DataError(f"expected an object with the fields of task '{spec.name}', got {type(raw).__name__}")
        instances = raw.get("instances")
        if spec.name == "general" and isinstance(instances, list) and instances:
            rows = [{**raw, **instance} for instance in instances if isinstance(instance, dict)]
            sources = [source if len(instances) == 1 else f"{source}#instance{i + 1}" for i in range(len(rows))]
            return [r for row, where in zip(rows, sources) for r in self._records_of_row(row, where)]
        return self._records_of_row(raw, source)

    def _records_of_row(self, raw: dict[str, Any], source: str) -> list[dict[str, Any]]:
        spec = self.spec
        values: dict[str, str] = {}
        for name, keys in spec.inputs.items():
            value = self._value(raw, name, keys)
            if value is None:
                tried = [self.fields[name]] if name in self.fields else keys
                raise DataError(f"no '{name}' field for task '{spec.name}' (tried keys {tried}; "
                                f"name another with --field {name}=KEY)")
            values[name] = value
        for name, keys in spec.optional.items():
            value = self._value(raw, name, keys)
            if value is not None:
                values[name] = value
        answer = self._value(raw, spec.answer_field, spec.answer_keys)
        if answer is None:
            tried = [self.fields[spec.answer_field]] if spec.answer_field in self.fields else spec.answer_keys
            raise DataError(f"no '{spec.answer_field}' (the answer) for task '{spec.name}' (tried keys {tried}; "
                            f"name another with --field {spec.answer_field}=KEY)")
        eligible = spec.eligible(frozenset(values) & frozenset(spec.optional))
        if not eligible:
            raise DataError(f"no template of task '{spec.name}' uses exactly the fields {sorted(values)}")
        # Seeded by file name and line, not the whole path: the same data builds the same records wherever it lies.
        chooser = random.Random(hashlib.sha256(f"{self.seed}:{Path(source).name}".encode()).digest())
        chosen = chooser.sample(eligible, min(self.variants, len(eligible)))
        records = []
        for index in chosen:
            messages = [{"role": "system", "content": self.system}] if self.system else []
            messages += [{"role": "user", "content": spec.templates[index].format(**values)},
                         {"role": "assistant", "content": answer}]
            records.append({"messages": messages, "task": spec.name,
                            "provenance": provenance("build", source, task=spec.name,
                                                     template=f"{spec.name}/{index}", seed=self.seed)})
        return records

    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        """Map a batch: ``raw`` (JSON text) and ``source`` columns, or a dataset's own columns."""
        rows, sources = batch_rows(batch, indices)
        out: dict[str, list] = {"record": [], "error": [], "source": []}
        for raw, source in zip(rows, sources):
            try:
                made = self._records(raw, source)
            except DataError as exc:
                out["record"].append("")
                out["error"].append(str(exc))
                out["source"].append(source)
                continue
            for record in made:
                out["record"].append(json.dumps(record, ensure_ascii=False))
                out["error"].append("")
                out["source"].append(source)
        return out


def parallel_language(path: str) -> str | None:
    """The language code of a parallel-corpus file (``val.de.gz`` -> ``de``), or None for a data file."""
    name = Path(path).name.removesuffix(".gz")
    suffix = Path(name).suffix.lower()
    if not suffix or suffix in SUFFIXES:
        return None
    return suffix[1:]


def read_parallel(source_file: str, target_file: str) -> tuple[list[dict[str, Any]], LoadReport]:
    """Rows ``{text, translation, source_lang, target_lang}`` from two line-aligned text files.

    Raises:
        DataError: a file is missing or the two have different numbers of lines.
    """
    report = LoadReport()
    texts = []
    for name in (source_file, target_file):
        path = Path(name)
        if not path.is_file():
            raise DataError(f"{name}: data file not found")
        lines, errors = _decode_lines(path)
        while lines and not lines[-1].strip() and len(lines) not in errors:
            lines.pop()
        texts.append((lines, errors))
    (source_lines, source_errors), (target_lines, target_errors) = texts
    if len(source_lines) != len(target_lines):
        raise DataError(f"{source_file} has {len(source_lines)} lines but {target_file} has {len(target_lines)}; "
                        "parallel files must be line-aligned")
    codes = parallel_language(source_file), parallel_language(target_file)
    rows = []
    for number, (text, translation) in enumerate(zip(source_lines, target_lines), start=1):
        report.read += 1
        where = f"{source_file}:{number}"
        error = source_errors.get(number) or target_errors.get(number)
        if error or not text.strip() or not translation.strip():
            report.skip(error or "empty line on one side of the pair", where)
            continue
        rows.append({"text": text, "translation": translation, "source_lang": LANGUAGES.get(codes[0], codes[0]),
                     "target_lang": LANGUAGES.get(codes[1], codes[1]), "_source": where})
    report.kept = len(rows)
    return rows, report


@dataclass
class BuildResult:
    """What ``build`` wrote and what it could not use."""

    written: int
    report: LoadReport
    out: Path
    rejects_path: Path | None


def build_files(
    files: list[str],
    out: str | Path,
    task: str,
    *,
    templates: str | Path | None = None,
    seed: int = 0,
    variants: int = 1,
    fields: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    system: str | None = None,
    limit: int | None = None,
    num_proc: int | None = None,
    use_cache: bool = True,
    rejects_path: str | Path | None = None,
    overwrite: bool = False,
) -> BuildResult:
    """Build instruction records for ``task`` from raw files into canonical JSONL at ``out``.

    Rows that cannot be used (a missing field, no matching template) are counted in the report
    and listed in the rejects file (default ``<out stem>.rejects.jsonl``). The options are checked
    first, then a missing input is named and ``out`` and the rejects file are claimed (existing
    ones refused unless ``overwrite``, an input always), then the work starts.

    Raises:
        ConfigError: unknown task or a bad template file.
        DataError: a missing or unreadable input, or nothing could be built.
        OutputError: an output exists (without ``overwrite``) or is an input.
    """
    library = load_template_library(templates)
    if task not in library:
        raise ConfigError(f"unknown task '{task}'; the template library has {', '.join(sorted(library))} "
                          "(add tasks with --templates FILE)")
    if variants < 1:
        raise TunelabError("--variants must be at least 1")
    files = list(files)
    claim_job_outputs(files, [out, rejects_path_for(out, rejects_path)], overwrite)
    spec = library[task]
    report = LoadReport()
    rejects: list[dict[str, Any]] = []
    languages = [parallel_language(f) for f in files]
    if task == "translation" and len(files) == 2 and all(languages):
        rows, report = read_parallel(files[0], files[1])
        raw_rows = [{"raw": json.dumps({k: v for k, v in row.items() if k != "_source"}, ensure_ascii=False),
                     "source": row["_source"]} for row in rows]
    else:
        raw_rows = []
        for name in files:
            for row in read_rows(name):
                report.read += 1
                if row.error is not None:
                    report.skip(row.error, row.source)
                    rejects.append({"source": row.source, "reason": row.error, "record": None})
                    continue
                raw_rows.append({"raw": json.dumps(row.data, ensure_ascii=False), "source": row.source})
    if limit is not None:
        raw_rows = raw_rows[:limit]
    if not raw_rows:
        raise DataError(f"{', '.join(files)}: no readable records\n{report.summary()}".rstrip())
    params = dict(params or {})
    if "options" in spec.inputs and "options" not in params and "options" not in (fields or {}):
        params.update(_collected_options(raw_rows, spec, fields or {}, params))
    builder = InstructionBuilder(spec, seed=seed, variants=variants, fields=fields, params=params, system=system)
    definition = [spec.system, spec.inputs, spec.optional, spec.answer_field, spec.answer_keys, spec.templates]
    key = fingerprint("build", [file_fingerprint(f) for f in files], task, definition, seed, variants, fields,
                      params, system, limit)
    mapped = map_cached(raw_rows, builder, key=key, desc=f"Building {task} records", num_proc=num_proc,
                        use_cache=use_cache)
    records = []
    raw_by_source = {row["source"]: row["raw"] for row in raw_rows}
    for record, error, source in zip(*columns(mapped, "record", "error", "source")):
        if error:
            report.skip(error, source)
            rejects.append({"source": source, "reason": error, "record": json.loads(raw_by_source[source])})
        else:
            records.append(json.loads(record))
    report.kept = len(records)
    rejects_file = write_rejects(rejects, out, rejects_path)
    if not records:
        raise DataError(f"{', '.join(files)}: nothing to build for task '{task}':\n{report.summary()}")
    written = write_jsonl(out, records)
    return BuildResult(written, report, Path(out), rejects_file)


def _collected_options(raw_rows: list[dict[str, Any]], spec: TaskSpec, fields: dict[str, str],
                       params: dict[str, str]) -> dict[str, str]:
    """``options`` for classification when the data has none: the distinct labels of the input."""
    builder = InstructionBuilder(spec, fields=fields, params=params)
    labels = set()
    for row in raw_rows:
        raw = json.loads(row["raw"])
        if isinstance(raw, dict):
            keys = spec.inputs["options"]
            if any(k in raw for k in ([fields["options"]] if "options" in fields else keys)):
                return {}  # the records carry their own options
            label = builder._value(raw, spec.answer_field, spec.answer_keys)
            if label is not None:
                labels.add(label)
    return {"options": ", ".join(sorted(labels))} if labels else {}
