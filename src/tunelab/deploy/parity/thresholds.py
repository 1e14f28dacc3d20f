"""How close each kind of export must stay to the reference: one set of limits per precision class.

A comparison's class is the looser of the reference's and the candidate's: weights in float32
(an adapter on a float32 base, a float32 merge or ONNX export, an f32 GGUF), float16, bfloat16,
q8_0, another quantization (q4_k, q4_1, ...), or ``served`` (a URL: answers and stops only, its
precision is the server's business). The numbers are documented in docs/deploy.md with the
measurements they come from; ``--threshold CLASS_OR_NAME.METRIC=VALUE`` overrides one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from tunelab.errors import TunelabError

CLASS_ORDER = ("f32", "f16", "bf16", "q8_0", "quantized", "served")


@dataclass(frozen=True)
class Thresholds:
    """Limits of one class (None: not checked).

    Attributes:
        max_abs_logit: largest allowed |logit difference| at any compared position.
        min_top1: smallest fraction of compared positions whose most likely next token agrees.
        min_answers: smallest fraction of prompts with identical greedy answers.
        min_stops: smallest fraction of prompts that stop the same way (same stop token, or both at
            the token limit).
    """

    max_abs_logit: float | None
    min_top1: float | None
    min_answers: float
    min_stops: float


THRESHOLDS: dict[str, Thresholds] = {
    "f32": Thresholds(max_abs_logit=1e-2, min_top1=1.0, min_answers=1.0, min_stops=1.0),
    "f16": Thresholds(max_abs_logit=0.25, min_top1=0.99, min_answers=1.0, min_stops=1.0),
    "bf16": Thresholds(max_abs_logit=1.5, min_top1=0.95, min_answers=0.8, min_stops=0.9),
    "q8_0": Thresholds(max_abs_logit=2.0, min_top1=0.95, min_answers=0.5, min_stops=0.8),
    "quantized": Thresholds(max_abs_logit=None, min_top1=0.8, min_answers=0.3, min_stops=0.6),
    "served": Thresholds(max_abs_logit=None, min_top1=None, min_answers=1.0, min_stops=1.0),
}
METRICS = tuple(f.name for f in fields(Thresholds))


def pair_class(reference: str, candidate: str) -> str:
    """The class a comparison is judged by: the looser of the two models' classes."""
    return max(reference, candidate, key=CLASS_ORDER.index) if candidate != "served" else "served"


def parse_overrides(items: list[str]) -> dict[str, dict[str, float]]:
    """``CLASS_OR_NAME.METRIC=VALUE`` items as ``{class or model name: {metric: value}}``.

    Raises:
        TunelabError: a malformed item, an unknown metric or a value that is not a number.
    """
    out: dict[str, dict[str, float]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        target, dot, metric = key.rpartition(".")
        if not sep or not dot or not target:
            raise TunelabError(f"--threshold {item!r}: expected CLASS_OR_NAME.METRIC=VALUE, e.g. q8_0.min_answers=0.9")
        if metric not in METRICS:
            raise TunelabError(f"--threshold {item!r}: unknown metric {metric!r}; one of {', '.join(METRICS)}")
        try:
            out.setdefault(target, {})[metric] = float(value)
        except ValueError:
            raise TunelabError(f"--threshold {item!r}: {value!r} is not a number") from None
    return out


def thresholds_for(klass: str, name: str, overrides: dict[str, dict[str, float]]) -> Thresholds:
    """The limits of a comparison: its class's, then overrides for the class, then for the model's name."""
    limits = THRESHOLDS[klass]
    for target in (klass, name):
        if target in overrides:
            limits = replace(limits, **overrides[target])
    return limits
