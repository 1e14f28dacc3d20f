"""``tunelab eval`` and ``tunelab compare`` as one call each: options checked, outputs claimed, then the work.

Everything a user can get wrong is checked before a model loads: the answer pattern, the
metrics, the judge and the report directory (an earlier report is kept without ``overwrite``;
an input is never replaced).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import TunelabConfig
from tunelab.errors import TunelabError

EVAL_REPORT_FILES = ("results.json", "predictions.jsonl", "report.md", "report.html")
COMPARE_REPORT_FILES = ("results.json", "verdicts.jsonl", "report.md", "report.html")


@dataclass
class EvalJob:
    """What ``tunelab eval`` was asked: a model (or a training config's final model), eval sets, options.

    ``None`` options take the config's value (``data.template``, ``data.max_length``,
    ``eval.answer_pattern``, ``eval.max_new_tokens``), else the defaults of ``EvalOptions``.
    """

    model: str | None = None
    adapter: str | None = None
    config: TunelabConfig | None = None
    data: list[str] = field(default_factory=list)
    out: str | None = None
    metrics: list[str] | None = None
    max_new_tokens: int | None = None
    batch_size: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    max_length: int | None = None
    packing: bool = True
    template: str | None = None
    max_samples: int | None = None
    answer_pattern: str | None = None
    judge: str | None = None
    judge_model: str | None = None
    device: str = "auto"
    overwrite: bool = False
    fail_below: list[str] = field(default_factory=list)


def check_answer_pattern(pattern: str | None) -> None:
    """Refuse an ``--answer-pattern`` that is not a regex with a group (named by the flag)."""
    from tunelab.data.answers import check_answer_pattern as check

    if pattern is not None:
        try:
            check(pattern)
        except ValueError as exc:
            raise TunelabError(f"--answer-pattern {pattern!r}: {exc}") from None


def claim_report_dir(out: str, names: tuple[str, ...], overwrite: bool, inputs: list[str]) -> None:
    """Refuse to replace an earlier report in ``out`` (without ``overwrite``) or an input file (ever)."""
    from tunelab.outputs import claim_files

    claim_files([Path(out) / name for name in names], overwrite, "--out", inputs)


def run_eval_job(job: EvalJob) -> tuple[dict[str, Any], list[str]]:
    """Evaluate ``job``'s model on its eval sets and write the report under ``job.out``.

    Returns:
        The results (``run_eval``'s) and the ``fail_below`` thresholds that failed.
    """
    from tunelab.eval.suite import EvalOptions, check_thresholds, run_eval
    from tunelab.models.precision import device_dtype
    from tunelab.models.load import generation_stop_ids, load_for_inference
    from tunelab.models.precision import resolve_device
    from tunelab.outputs import write_errors
    from tunelab.progress import progress_bar

    defaults: dict[str, Any] = {}
    model_path, files = job.model, list(job.data)
    if job.config is not None:
        config = job.config
        model_path = model_path or str(Path(config.output_dir) / "final")
        files = files or list(config.data.eval or [])
        defaults = {"template": config.data.template, "max_length": config.data.max_length,
                    "answer_pattern": config.eval.answer_pattern, "max_new_tokens": config.eval.max_new_tokens}
    if not model_path or not files or not job.out:
        raise TunelabError("tunelab eval needs --model (or --config), --data (or data.eval in the config) and --out")
    check_answer_pattern(job.answer_pattern)
    options = EvalOptions(
        metrics=job.metrics,
        max_new_tokens=job.max_new_tokens or defaults.get("max_new_tokens", 256),
        batch_size=job.batch_size, temperature=job.temperature, top_p=job.top_p, seed=job.seed,
        max_length=job.max_length or defaults.get("max_length", EvalOptions.max_length), packing=job.packing,
        template=job.template or defaults.get("template", "auto"),
        answer_pattern=job.answer_pattern or defaults.get("answer_pattern", EvalOptions.answer_pattern),
        max_samples=job.max_samples,
    )
    if job.judge:
        from tunelab.eval.judge import Judge, parse_judge_spec

        options.judge = Judge(parse_judge_spec(job.judge, judge_model=job.judge_model),
                              cache_path=str(Path(job.out) / "judge_cache.jsonl"))
    # The options first, then the outputs, then the model.
    claim_report_dir(job.out, EVAL_REPORT_FILES, job.overwrite, files)
    device = resolve_device(job.device)
    with progress_bar(f"loading {model_path}" + (f" + {job.adapter}" if job.adapter else "")):
        model, tokenizer = load_for_inference(model_path, job.adapter, device, device_dtype(device))
    description = {"model": model_path, "adapter": job.adapter, "device": str(device)}
    stop_ids = generation_stop_ids(model.generation_config, tokenizer)
    with write_errors(job.out, "evaluation report", kept="the model and data are untouched"):
        results = run_eval(model, tokenizer, files, job.out, options, stop_ids, description)
    return results, check_thresholds(results["metrics"], job.fail_below)


def run_compare_job(
    predictions: list[str], judge: str, out: str, judge_model: str | None = None, labels: str | None = None,
    resamples: int = 10_000, seed: int = 0, answer_pattern: str | None = None, overwrite: bool = False,
    fail_below: list[str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Compare models' predictions (``run_compare``) and write the report under ``out``.

    Returns:
        The results and the ``fail_below`` thresholds (on the first pair's win rate and CI) that failed.
    """
    from tunelab.eval.compare import run_compare
    from tunelab.eval.report import write_compare_report
    from tunelab.eval.suite import check_thresholds
    from tunelab.outputs import write_errors

    check_answer_pattern(answer_pattern)
    claim_report_dir(out, COMPARE_REPORT_FILES, overwrite, [spec.partition("=")[2] or spec for spec in predictions])
    with write_errors(out, "comparison report", kept="the predictions are untouched"):
        results = run_compare(predictions, judge, out, judge_model=judge_model, labels_path=labels,
                              resamples=resamples, seed=seed, answer_pattern=answer_pattern)
        write_compare_report(out, results)
    first = results["pairs"][0]
    return results, check_thresholds({k: first[k] for k in ("win_rate", "ci_low", "ci_high")}, fail_below or [])
