"""``tunelab eval``: one model on one or more eval sets -> metrics, predictions and a report.

For every eval set: prompts are answered with batched generation (greedy, or seeded sampling)
using the chat template saved with the model; generation metrics are computed against the
references where they exist; perplexity is exp of the mean token loss of the reference answers
given their prompts, computed over packed (or padded) batches. Every example is accounted for:
bad records, missing references, empty outputs and truncated prompts are counted, never fatal.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.config import DEFAULT_MAX_LENGTH, EvalConfig
from tunelab.data.records import Prompt
from tunelab.data.readers import load_prompts
from tunelab.data.templates import render_conversation, render_prompt, resolve_template
from tunelab.errors import DataError, TunelabError
from tunelab.eval.generate import generate_answers
from tunelab.eval.metrics import METRICS, corpus_metrics, example_scores
from tunelab.eval.report import write_eval_report
from tunelab.failures import failure_reasons
from tunelab.progress import progress_bar
from tunelab.models.methods.prompt_learning import has_virtual_tokens
from tunelab.track.provenance import files_fingerprint
from tunelab.track.record import Artifact, model_artifact, record_run
from tunelab.train.batches import eval_batches
from tunelab.train.heldout import evaluate_loss

LOSS_METRICS = ("perplexity", "loss")
ALL_METRICS = (*LOSS_METRICS, *METRICS)
MEAN_OF_EXAMPLES = ("rouge1", "rouge2", "rougeL", "exact_match", "numeric_accuracy")  # corpus = mean of examples
CORPUS_LEVEL = ("bleu", "chrf")  # corpus statistics: bootstrap recomputes them on resampled examples


@dataclass
class EvalOptions:
    """How ``tunelab eval`` generates and what it measures."""

    metrics: list[str] | None = None  # None: every metric
    max_new_tokens: int = 256
    batch_size: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    max_length: int = DEFAULT_MAX_LENGTH  # the same default as data.max_length
    packing: bool = True
    template: str = "auto"
    answer_pattern: str = EvalConfig.model_fields["answer_pattern"].default
    max_samples: int | None = None
    judge: Any = None  # a tunelab.eval.judge.Judge: adds judge_score (1-10, reference-guided when possible)
    progress: bool = True  # progress bars (or start/end lines off a terminal) on stderr

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics or []) - set(ALL_METRICS))
        if unknown:
            raise TunelabError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(ALL_METRICS)}")


@dataclass
class SetResult:
    """Metrics and accounting of one eval set, and its per-example predictions."""

    name: str
    file: str
    metrics: dict[str, float | None]
    accounting: dict[str, Any]
    predictions: list[dict[str, Any]] = field(repr=False)
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)


def reference_loss(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, template: str, prompts: list[Prompt],
    stop_ids: set[int], max_length: int, packing: bool, batch_size: int,
) -> tuple[dict[str, float], int]:
    """Mean token loss of the reference answers given their prompts, and how many were cut short.

    Only the answer tokens (and their end-of-turn token) count, as in training with
    ``train_on: last_assistant``; a sequence longer than ``max_length`` is truncated.
    """
    rows: dict[str, list] = {"input_ids": [], "labels": []}
    truncated = 0
    for prompt in prompts:
        messages = [*prompt.messages, {"role": "assistant", "content": prompt.reference}]
        rendered = render_conversation(tokenizer, template, messages, "last_assistant", stop_ids, tools=prompt.tools)
        if len(rendered.input_ids) > max_length:
            truncated += 1
        ids, labels = rendered.input_ids[:max_length], rendered.labels[:max_length]
        if any(label != -100 for label in labels):
            rows["input_ids"].append(ids)
            rows["labels"].append(labels)
    if not rows["input_ids"]:
        return {}, truncated
    dataset = datasets.Dataset.from_dict(rows)
    device = next(model.parameters()).device
    packing = packing and not has_virtual_tokens(model)  # prefix/prompt tuning: one sequence per row
    batches = eval_batches(dataset, packing, max(max_length, 4096), batch_size, tokenizer.pad_token_id)
    result = evaluate_loss(model, batches, device, nullcontext)
    return {"loss": result["eval_loss"], "perplexity": result["eval_ppl"]}, truncated


def has_reference(reference: str | None) -> bool:
    """A reference counts when it holds more than whitespace."""
    return bool(reference and reference.strip())


def metric_cis(
    answers: list[str], references: list[str | None], names: list[str], answer_pattern: str,
    resamples: int = 200, confidence: float = 0.95, seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs (over examples with a reference) of the reference-based metrics."""
    index = [i for i, r in enumerate(references) if has_reference(r)]
    if len(index) < 2:
        return {}
    draws = np.random.default_rng(seed).integers(0, len(index), size=(resamples, len(index)))
    tail = (1 - confidence) / 2 * 100
    cis: dict[str, tuple[float, float]] = {}
    for name in names:
        if name in MEAN_OF_EXAMPLES:
            scores = np.array([example_scores(name, answers[i], references[i], answer_pattern) for i in index])
            values = scores[draws].mean(axis=1)
        elif name in CORPUS_LEVEL:
            # Each resample recomputes the corpus score (~30 ms per 200 examples): fewer resamples.
            values = np.array([
                corpus_metrics([answers[index[k]] for k in draw], [references[index[k]] for k in draw], [name],
                               answer_pattern)[name]
                for draw in draws[: max(50, resamples // 4)]
            ])
        else:
            continue
        cis[name] = (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))
    return cis


def evaluate_set(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, file: str, options: EvalOptions, stop_ids: set[int],
) -> SetResult:
    """Generate answers for one eval file and score them."""
    template = resolve_template(tokenizer, options.template)  # type: ignore[arg-type]
    prompts, load_report = load_prompts([file], on_error="skip", limit=options.max_samples)
    wanted = options.metrics or list(ALL_METRICS)
    generation_metrics = [m for m in wanted if m in METRICS]
    answers = [""] * len(prompts)
    prompt_truncated = 0
    if generation_metrics:
        max_prompt = max(8, options.max_length - options.max_new_tokens)
        prompt_truncated = sum(
            len(tokenizer(render_prompt(tokenizer, template, p.messages, p.tools), add_special_tokens=False)["input_ids"])
            > max_prompt for p in prompts
        )
        with progress_bar(f"{Path(file).stem}: answering {len(prompts)} prompts", len(prompts),
                          options.progress) as advance:
            answers = generate_answers(
                model, tokenizer, template, [p.messages for p in prompts], options.max_new_tokens, options.batch_size,
                temperature=options.temperature, top_p=options.top_p, seed=options.seed, max_prompt_tokens=max_prompt,
                on_batch=advance, tools=[p.tools for p in prompts],
            )
    references = [p.reference for p in prompts]
    metrics: dict[str, float | None] = {}
    cis: dict[str, tuple[float, float]] = {}
    if generation_metrics:
        scores = corpus_metrics(answers, references, generation_metrics, options.answer_pattern)
        metrics.update({name: scores[name] for name in generation_metrics})
        cis = metric_cis(answers, references, generation_metrics, options.answer_pattern, seed=options.seed)
    judge_counts: dict[str, int] = {}
    if options.judge is not None:
        grades = options.judge.grade_many([
            {"question": p.messages[-1]["content"], "answer": a, "reference": p.reference if has_reference(p.reference)
             else None} for p, a in zip(prompts, answers)])
        scores = [g.score for g in grades if g.score is not None]
        metrics["judge_score"] = sum(scores) / len(scores) if scores else None
        judge_counts = {"judge_graded": len(scores), "judge_unparsable": sum(g.score is None and not g.error for g in grades),
                        "judge_failed": sum(1 for g in grades if g.error),
                        "judge_failure_reasons": failure_reasons(g.error for g in grades)}
    loss_truncated = 0
    if any(m in LOSS_METRICS for m in wanted):
        with_reference = [p for p in prompts if has_reference(p.reference)]
        with progress_bar(f"{Path(file).stem}: perplexity of {len(with_reference)} reference answers",
                          enabled=options.progress):
            loss, loss_truncated = reference_loss(model, tokenizer, template, with_reference, stop_ids,
                                                  options.max_length, options.packing, options.batch_size)
        metrics.update({name: loss.get(name) for name in LOSS_METRICS if name in wanted})
    accounting = {
        "records_read": load_report.read,
        "examples": len(prompts),
        "skipped_records": dict(load_report.skipped),
        "skipped_first_at": dict(load_report.examples),
        "missing_reference": sum(1 for r in references if not has_reference(r)),
        "empty_prediction": sum(1 for a in answers if not a.strip()) if generation_metrics else 0,
        "prompt_truncated": prompt_truncated,
        "reference_truncated": loss_truncated,
        **judge_counts,
    }
    predictions = [
        {"id": p.source, "set": Path(file).stem, "prompt": p.messages[-1]["content"], "messages": p.messages,
         "prediction": answer, "reference": p.reference}
        for p, answer in zip(prompts, answers)
    ]
    if options.judge is not None:
        for row, grade in zip(predictions, grades):
            row.update({"judge_score": grade.score, "judge_error": grade.error})
    return SetResult(Path(file).stem, file, metrics, accounting, predictions, cis)


def run_eval(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, files: list[str], out_dir: str | Path,
    options: EvalOptions, stop_ids: set[int], description: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate on every file; write results.json, predictions.jsonl and the reports under ``out_dir``.

    Returns:
        The results: ``metrics`` (flat for one set, ``set/metric`` for several), ``sets`` and
        the run description.

    Raises:
        DataError: an eval file cannot be read at all.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sets = [evaluate_set(model, tokenizer, file, options, stop_ids) for file in files]
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise DataError(f"eval files must have different names (stems): {names}")
    flat = sets[0].metrics if len(sets) == 1 else {f"{s.name}/{k}": v for s in sets for k, v in s.metrics.items()}
    results = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **(description or {}),
        "options": {k: v for k, v in vars(options).items() if k not in ("judge", "progress")},
        "metrics": flat,
        "sets": [{"name": s.name, "file": s.file, "metrics": s.metrics, "ci": s.ci, "accounting": s.accounting}
                 for s in sets],
    }
    predictions = [row for result in sets for row in result.predictions]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in predictions))
    write_eval_report(out, results, predictions)
    _record_eval_run(out, results, files)
    return results


def _record_eval_run(out: Path, results: dict[str, Any], files: list[str]) -> None:
    """Write ``run.json`` and register the evaluation; its parent is the run that made the model."""
    models = [model_artifact(results[key]) for key in ("model", "adapter") if results.get(key)]
    eval_sets = [Artifact("dataset", file, files_fingerprint([file])) for file in files]
    numbers = {k: v for k, v in results["metrics"].items() if isinstance(v, int | float)}
    record_run("eval", out / "run.json", inputs=models + eval_sets, outputs=[Artifact("eval-report", str(out))],
               config=results["options"], metrics=numbers, details={"base_model": results.get("model")})


def check_thresholds(metrics: dict[str, Any], specs: list[str]) -> list[str]:
    """``--fail-below METRIC=VALUE`` checks: the messages of those that fail.

    Raises:
        TunelabError: a malformed spec or a metric that was not measured.
    """
    failures = []
    for spec in specs:
        name, sep, raw = spec.partition("=")
        try:
            threshold = float(raw)
        except ValueError:
            threshold = math.nan
        if not sep or math.isnan(threshold):
            raise TunelabError(f"--fail-below {spec!r}: expected METRIC=VALUE, e.g. bleu=20")
        if name not in metrics:
            raise TunelabError(f"--fail-below {name}: not measured; measured: {', '.join(sorted(metrics))}")
        value = metrics[name]
        if value is None or value < threshold:
            failures.append(f"{name} = {value} is below {threshold}")
    return failures
