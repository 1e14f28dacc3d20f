"""The export parity gate: every model answers the same prompts; each is compared with the reference.

The reference (the first model, an adapter, HF directory or ONNX export) renders each prompt and
answers it greedily. Every other model then

* renders and tokenizes the prompt itself (its own chat template and tokenizer): the ids must be
  the reference's (a server reports only how many it used);
* scores the reference's prompt and answer (teacher forcing): at each position that predicts an
  answer token, the largest |logit difference| and whether the most likely next token agrees;
* answers greedily with its own stop tokens: the answer (token ids, or a server's text against
  the reference's decoded answer) and the way it stopped must be the reference's.

Models are loaded one at a time (the reference's logits at the answer positions are kept).
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tunelab.deploy.parity.backends import (
    LLAMA_CPP_MISSING,
    Answer,
    ParityModel,
    open_gguf_transformers,
    open_llama_cpp,
    open_onnx,
    open_served,
    open_transformers,
)
from tunelab.deploy.parity.specs import ModelSpec
from tunelab.deploy.parity.thresholds import Thresholds, pair_class, thresholds_for
from tunelab.errors import TunelabError

REFERENCE_KINDS = ("adapter", "hf", "onnx")


@dataclass
class Comparison:
    """One model against the reference: the numbers, the limits it was judged by and the verdict."""

    name: str
    kind: str
    reader: str
    precision: str
    klass: str
    prompts: int = 0
    prompt_tokens_checked: int = 0
    prompt_tokens_equal: int = 0
    max_abs_logit: float | None = None
    positions: int = 0
    top1_agree: int = 0
    same_answers: int = 0
    same_stops: int = 0
    seconds: float = 0.0
    limits: Thresholds | None = None
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    first_difference: dict[str, Any] | None = None
    skipped: str | None = None

    @property
    def top1(self) -> float | None:
        """Fraction of compared positions whose most likely next token agrees (None: no logits)."""
        return self.top1_agree / self.positions if self.positions else None

    @property
    def passed(self) -> bool:
        """Within every limit (a skipped model neither passes nor fails)."""
        return self.skipped is None and not self.failures

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        out = asdict(self)
        out.update(top1=self.top1, passed=self.passed)
        return out


@dataclass
class GateResult:
    """The reference's name, each comparison and the overall verdict."""

    reference: str
    prompts: int
    max_new_tokens: int
    comparisons: list[Comparison]
    reference_stops: int  # prompts whose reference answer ended with a stop token

    @property
    def passed(self) -> bool:
        """Every model that ran is within its limits."""
        return all(c.passed or c.skipped for c in self.comparisons)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready report."""
        return {"reference": self.reference, "prompts": self.prompts, "max_new_tokens": self.max_new_tokens,
                "reference_stops": self.reference_stops, "passed": self.passed,
                "comparisons": [c.as_dict() for c in self.comparisons]}


@dataclass
class _Reference:
    ids: list[list[int]]
    answers: list[Answer]
    texts: list[str]
    logits: list[np.ndarray]  # per prompt: [answer length, vocab] at the positions predicting the answer


def _open(spec: ModelSpec, reader: str, api_key_env: str | None, n_ctx: int) -> ParityModel:
    if spec.kind in ("adapter", "hf"):
        return open_transformers(spec)
    if spec.kind == "onnx":
        return open_onnx(spec)
    if spec.kind == "url":
        return open_served(spec, api_key_env)
    if reader == "llama.cpp":
        return open_llama_cpp(spec, n_ctx)
    return open_gguf_transformers(spec)


def _runs(specs: list[ModelSpec], gguf_readers: tuple[str, ...]) -> list[tuple[ModelSpec, str]]:
    runs = []
    for spec in specs:
        readers = gguf_readers if spec.kind == "gguf" else ("",)
        runs.extend((spec, reader) for reader in readers)
    return runs


def _answer_logits(model: ParityModel, prompt: list[int], answer: list[int]) -> np.ndarray | None:
    """Logits at the positions that predict each answer token (the last prompt token on)."""
    logits = model.logits(prompt + answer)
    if logits is None:
        return None
    return logits[len(prompt) - 1: len(prompt) - 1 + len(answer)]


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True, disable=not enabled)


def run_gate(
    specs: list[ModelSpec],
    prompts: list[list[dict[str, str]]],
    max_new_tokens: int = 32,
    overrides: dict[str, dict[str, float]] | None = None,
    gguf_readers: tuple[str, ...] = ("transformers", "llama.cpp"),
    api_key_env: str | None = "TUNELAB_API_KEY",
    show_progress: bool = True,
) -> GateResult:
    """Compare every model with the first one on ``prompts``.

    Args:
        specs: the models; the first is the reference (an adapter, HF directory or ONNX export).
        prompts: conversations ending with a user turn.
        max_new_tokens: the longest greedy answer.
        overrides: threshold overrides by class or model name (see :mod:`~tunelab.deploy.parity.thresholds`).
        gguf_readers: how GGUF files are read back: ``transformers`` and/or ``llama.cpp`` (a
            llama.cpp run is reported as skipped, with the reason, where llama-cpp-python is absent).
        api_key_env: environment variable holding the API key of ``url`` models.
        show_progress: a progress bar per model on stderr.

    Raises:
        TunelabError: fewer than two models, repeated names, a reference that cannot be one, a
            model that cannot be loaded or reached.
    """
    if len(specs) < 2:
        raise TunelabError("tunelab verify compares models: give at least two --model")
    if max_new_tokens < 1:
        raise TunelabError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise TunelabError(f"--model names repeat ({', '.join(names)}); name them: NAME=KIND:LOCATION")
    if specs[0].kind not in REFERENCE_KINDS:
        raise TunelabError(f"the reference (the first --model, {specs[0].name}) must be an adapter, hf or onnx model, "
                           f"not {specs[0].kind}: its tokenizer decodes the answers the others are compared with")
    overrides = overrides or {}
    reference_model = _open(specs[0], "", api_key_env, 0)
    reference = _reference_run(reference_model, prompts, max_new_tokens, show_progress)
    reference_model.close()  # its tokenizer stays, to decode answers
    gc.collect()
    n_ctx = max(len(ids) for ids in reference.ids) + max_new_tokens + 8  # room for a BOS and a longer answer
    comparisons = []
    for spec, reader in _runs(specs[1:], gguf_readers):
        comparisons.append(_compare(spec, reader, reference_model, reference, prompts, max_new_tokens, overrides,
                                    api_key_env, n_ctx, show_progress))
    return GateResult(specs[0].name, len(prompts), max_new_tokens, comparisons,
                      sum(a.stop is not None for a in reference.answers))


def _reference_run(model: ParityModel, prompts: list[list[dict[str, str]]], max_new_tokens: int,
                   show_progress: bool) -> _Reference:
    reference = _Reference([], [], [], [])
    with _progress(show_progress) as progress:
        task = progress.add_task(f"{model.name} (reference)", total=len(prompts))
        for messages in prompts:
            ids = model.prompt_ids(messages)
            answer = model.answer(messages, ids, max_new_tokens)
            reference.ids.append(ids)
            reference.answers.append(answer)
            reference.texts.append(model.decode(answer.ids))  # type: ignore[attr-defined]
            reference.logits.append(_answer_logits(model, ids, answer.ids))
            progress.advance(task)
    return reference


def _compare(spec: ModelSpec, reader: str, reference_model: ParityModel, reference: _Reference,
             prompts: list[list[dict[str, str]]], max_new_tokens: int, overrides: dict[str, dict[str, float]],
             api_key_env: str | None, n_ctx: int, show_progress: bool) -> Comparison:
    name = spec.name
    started = time.perf_counter()
    try:
        model = _open(spec, reader, api_key_env, n_ctx)
    except TunelabError as exc:
        if reader == "llama.cpp" and str(exc) == LLAMA_CPP_MISSING:
            return Comparison(name, spec.kind, reader, "-", "-", skipped=str(exc))
        raise
    klass = pair_class(reference_model.precision, model.precision)
    result = Comparison(name, spec.kind, model.reader, model.precision, klass, notes=list(model.notes),
                        limits=thresholds_for(klass, spec.name, overrides))
    with _progress(show_progress) as progress:
        task = progress.add_task(name, total=len(prompts))
        for index, messages in enumerate(prompts):
            _compare_prompt(model, reference_model, reference, index, messages, max_new_tokens, result)
            progress.advance(task)
    model.close()
    del model
    gc.collect()
    result.seconds = time.perf_counter() - started
    result.failures = _failures(result)
    return result


def _compare_prompt(model: ParityModel, reference_model: ParityModel, reference: _Reference, index: int,
                    messages: list[dict[str, str]], max_new_tokens: int, result: Comparison) -> None:
    ref_ids, ref_answer = reference.ids[index], reference.answers[index]
    result.prompts += 1
    own_ids = model.prompt_ids(messages)
    if own_ids is not None:
        result.prompt_tokens_checked += 1
        result.prompt_tokens_equal += own_ids == ref_ids
    logits = _answer_logits(model, ref_ids, ref_answer.ids)
    if logits is not None:
        expected = reference.logits[index]
        difference = float(np.abs(logits.astype(np.float64) - expected).max())
        result.max_abs_logit = difference if result.max_abs_logit is None else max(result.max_abs_logit, difference)
        result.positions += len(expected)
        result.top1_agree += int((logits.argmax(-1) == expected.argmax(-1)).sum())
    answer = model.answer(messages, own_ids if own_ids is not None else ref_ids, max_new_tokens)
    if answer.ids is None:  # a server: its text, its stop, and how many prompt tokens it counted
        same = answer.text == reference.texts[index]
        same_stop = (answer.stop is not None) == (ref_answer.stop is not None)
        if answer.prompt_tokens is not None:
            result.prompt_tokens_checked += 1
            result.prompt_tokens_equal += answer.prompt_tokens == len(ref_ids)
        text = answer.text
    else:
        same, same_stop = answer.ids == ref_answer.ids, answer.stop == ref_answer.stop
        text = reference_model.decode(answer.ids)  # type: ignore[attr-defined]
    result.same_answers += same
    result.same_stops += same_stop
    if not same and result.first_difference is None:
        result.first_difference = {"prompt": messages[-1]["content"], "reference": reference.texts[index],
                                   "answer": text, "reference_stop": ref_answer.stop, "stop": answer.stop}


def _failures(result: Comparison) -> list[str]:
    limits = result.limits
    failures = []
    if result.prompt_tokens_checked and result.prompt_tokens_equal < result.prompt_tokens_checked:
        failures.append(f"prompt tokens differ on {result.prompt_tokens_checked - result.prompt_tokens_equal} of "
                        f"{result.prompt_tokens_checked} prompts (chat template or tokenizer)")
    if limits.max_abs_logit is not None and result.max_abs_logit is not None \
            and not result.max_abs_logit <= limits.max_abs_logit:
        failures.append(f"max |Δlogit| {result.max_abs_logit:.3g} > {limits.max_abs_logit:g}")
    if limits.min_top1 is not None and result.top1 is not None and result.top1 < limits.min_top1:
        failures.append(f"top-1 agreement {result.top1:.3f} < {limits.min_top1:g}")
    if result.same_answers < limits.min_answers * result.prompts:
        failures.append(f"identical answers {result.same_answers}/{result.prompts} < {limits.min_answers:g}")
    if result.same_stops < limits.min_stops * result.prompts:
        failures.append(f"same stop {result.same_stops}/{result.prompts} < {limits.min_stops:g}")
    return failures
