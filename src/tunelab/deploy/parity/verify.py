"""The parity gate as ``tunelab verify`` and ``tunelab export --prompts FILE`` run it.

The thresholds and the prompt file are read and the ``--report`` file claimed before any model
loads; the comparison table is printed and, with a report file, written as JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.deploy.parity.specs import ModelSpec


@dataclass
class GateOptions:
    """How the gate runs: the prompts, the limits, the GGUF readers, and where its report goes."""

    prompts: str
    limit: int | None = None  # the first N prompts
    max_new_tokens: int = 32
    thresholds: list[str] = field(default_factory=list)  # CLASS_OR_NAME.METRIC=VALUE overrides
    gguf_reader: str = "both"  # both, transformers or llama.cpp
    api_key_env: str | None = "TUNELAB_API_KEY"
    report: str | None = None  # also write the comparison as JSON here
    overwrite: bool = False  # replace an existing report file


def claim_report(options: GateOptions, inputs: list[str]) -> None:
    """Refuse a report file that exists (without overwrite) or is one of the inputs (ever), before the gate runs."""
    if options.report:
        from tunelab.outputs import claim_files

        claim_files([options.report], options.overwrite, "--report", [options.prompts, *inputs])


def _gate(specs: list[ModelSpec], options: GateOptions) -> bool:
    from tunelab.deploy.parity.gate import run_gate
    from tunelab.deploy.parity.prompts import load_parity_prompts
    from tunelab.deploy.parity.report import print_report
    from tunelab.deploy.parity.thresholds import parse_overrides

    overrides = parse_overrides(options.thresholds)
    prompts = load_parity_prompts(options.prompts, options.limit)
    claim_report(options, [spec.location for spec in specs])
    readers = ("transformers", "llama.cpp") if options.gguf_reader == "both" else (options.gguf_reader,)
    result = run_gate(specs, prompts, options.max_new_tokens, overrides, readers, options.api_key_env)
    print_report(result)
    if options.report:
        from tunelab.outputs import write_text_output

        write_text_output(options.report, json.dumps(result.as_dict(), indent=2, default=str) + "\n",
                          "parity report")
        print(f"wrote {options.report}")
    return result.passed


def verify_models(models: list[str], options: GateOptions) -> bool:
    """``tunelab verify``: every model (``[NAME=][KIND:]LOCATION``) against the first; True when all pass."""
    from tunelab.deploy.parity.specs import parse_model_spec

    return _gate([parse_model_spec(text) for text in models], options)


def verify_export(model: str | Path, fmt: str, exported: Path, options: GateOptions) -> bool:
    """After ``tunelab export ... --prompts FILE``: the exported file against the model it came from."""
    specs = [ModelSpec(f"hf:{Path(model).name}", "hf", str(model)),
             ModelSpec(f"{fmt}:{exported.name}", fmt, str(exported))]
    return _gate(specs, options)
