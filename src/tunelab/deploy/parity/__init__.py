"""``tunelab verify``: the export parity gate (an adapter, its merge, GGUF, ONNX and a server answer alike).

Modules: ``specs`` (naming models: ``[NAME=][KIND:]LOCATION``), ``prompts`` (the prompt file),
``backends`` (running each kind of model), ``thresholds`` (the limits per precision class),
``gate`` (:func:`run_gate`), ``report`` (the table), ``verify`` (the gate as ``tunelab verify`` and
``tunelab export --prompts`` run it: prompts read, report claimed, table printed, JSON written).

Example::

    from tunelab.deploy.parity import parse_model_spec, run_gate
    specs = [parse_model_spec(s) for s in ("adapter:runs/a/final", "hf:runs/a/merged", "gguf:a-f16.gguf")]
    result = run_gate(specs, [[{"role": "user", "content": "Who are you?"}]])
    assert result.passed
"""

from tunelab.deploy.parity.gate import Comparison, GateResult, run_gate
from tunelab.deploy.parity.prompts import load_parity_prompts
from tunelab.deploy.parity.specs import KINDS, ModelSpec, detect_kind, parse_model_spec
from tunelab.deploy.parity.thresholds import THRESHOLDS, Thresholds, parse_overrides

__all__ = [
    "KINDS",
    "THRESHOLDS",
    "Comparison",
    "GateResult",
    "ModelSpec",
    "Thresholds",
    "detect_kind",
    "load_parity_prompts",
    "parse_model_spec",
    "parse_overrides",
    "run_gate",
]
