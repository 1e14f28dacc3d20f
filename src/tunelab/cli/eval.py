"""``tunelab eval``, ``tunelab compare`` and ``tunelab reward score``: measure models, compare them, score answers."""

from __future__ import annotations

import argparse
import sys


def _explain_judge_failures(accountings: list[dict]) -> None:
    """Print how many judge calls failed and the first reason of each kind (stderr)."""
    from tunelab.failures import reason_lines

    for accounting in accountings:
        reasons = accounting.get("judge_failure_reasons") or {}
        if reasons:
            count = sum(entry["count"] for entry in reasons.values())
            print(f"warning: {count} judge call(s) failed (counted as no verdict); first reason of each kind:",
                  file=sys.stderr)
            print("\n".join(reason_lines(reasons)), file=sys.stderr)


def _print_failures(failures: list[str]) -> int:
    """Print each failed ``--fail-below`` threshold (stderr); the exit code: 1 when one failed."""
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.eval.jobs import EvalJob, run_eval_job
    from tunelab.eval.report import markdown_table

    job = EvalJob(
        model=args.model, adapter=args.adapter, data=args.data or [], out=args.out,
        config=load_config(args.config, args.overrides) if args.config else None,
        metrics=[m.strip() for m in args.metrics.split(",")] if args.metrics else None,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, max_length=args.max_length, packing=not args.no_packing,
        template=args.template, max_samples=args.max_samples, answer_pattern=args.answer_pattern,
        judge=args.judge, judge_model=args.judge_model, device=args.device, overwrite=args.overwrite,
        fail_below=args.fail_below or [],
    )
    results, failures = run_eval_job(job)
    _explain_judge_failures([s["accounting"] for s in results["sets"]])
    rows = [[name, value] for name, value in results["metrics"].items()]
    print(markdown_table(["metric", "value"], rows))
    print(f"wrote {args.out}/results.json, predictions.jsonl, report.md, report.html")
    return _print_failures(failures)


def _cmd_compare(args: argparse.Namespace) -> int:
    from tunelab.eval.jobs import run_compare_job
    from tunelab.eval.report import markdown_table

    results, failures = run_compare_job(
        args.predictions or [], args.judge, args.out, judge_model=args.judge_model, labels=args.labels,
        resamples=args.resamples, seed=args.seed, answer_pattern=args.answer_pattern, overwrite=args.overwrite,
        fail_below=args.fail_below or [],
    )
    _explain_judge_failures([results["accounting"]])
    if results["matched_by"] == "prompt":
        print("note: not every prediction has an id: examples matched by prompt text", file=sys.stderr)
    rows = [[p["model_a"], p["model_b"], p["wins"], p["ties"], p["losses"], p["no_verdict"], p["win_rate"],
             p["ci_low"], p["ci_high"], p["p_value"]] for p in results["pairs"]]
    print(markdown_table(["A", "B", "wins", "ties", "losses", "no verdict", "win rate", "ci_low", "ci_high", "p"], rows))
    print(f"wrote {args.out}/results.json, verdicts.jsonl, report.md, report.html")
    return _print_failures(failures)


def _cmd_reward_score(args: argparse.Namespace) -> int:
    from tunelab.eval.reward_score import score_files

    for path, summary, out in score_files(args.model, args.data, args.out, batch_size=args.batch_size,
                                          device=args.device, skip_bad=args.skip_bad, overwrite=args.overwrite):
        print(f"{path}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in summary.items()))
        if out is not None:
            print(f"wrote {out}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``tunelab eval``, ``tunelab compare`` and ``tunelab reward score``."""
    evaluate = commands.add_parser("eval", help="evaluate a model (or base + adapter) on eval sets")
    evaluate.add_argument("overrides", nargs="*", help="section.key=value for --config")
    evaluate.add_argument("--model", help="HF model directory, or a PEFT adapter directory")
    evaluate.add_argument("--adapter", help="PEFT adapter directory on top of --model")
    evaluate.add_argument("--config", help="a training config: its output_dir/final and data.eval by default")
    evaluate.add_argument("--data", action="append", help="eval file (repeat for several sets)")
    evaluate.add_argument("--out", help="output directory")
    evaluate.add_argument("--metrics", help="comma-separated metric names (default: all)")
    evaluate.add_argument("--max-new-tokens", type=int, default=None,
                          help="longest answer in tokens (default: eval.max_new_tokens of --config, else 256)")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); >0: seeded sampling")
    evaluate.add_argument("--top-p", type=float, default=1.0)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--max-length", type=int, default=None,
                          help="longest prompt + answer in tokens (default: the config's data.max_length, else 1024)")
    evaluate.add_argument("--no-packing", action="store_true", help="padded batches for the perplexity pass")
    evaluate.add_argument("--template", choices=["auto", "tokenizer", "chatml", "gemma", "llama3", "alpaca", "plain"])
    evaluate.add_argument("--max-samples", type=int, default=None, help="first N examples of each set")
    evaluate.add_argument("--answer-pattern", default=None, help="regex whose group 1 is the final answer")
    evaluate.add_argument("--fail-below", action="append", metavar="METRIC=VALUE",
                          help="exit 1 when a metric is below the value (CI regression gate)")
    evaluate.add_argument("--judge", help="grade answers 1-10 with openai:BASE_URL or hf:MODEL_DIR (judge_score)")
    evaluate.add_argument("--judge-model", help="model name for an OpenAI-compatible judge")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    evaluate.set_defaults(func=_cmd_eval)

    compare = commands.add_parser("compare", help="A/B test models' predictions: win rates with CIs")
    compare.add_argument("--predictions", action="append", metavar="[NAME=]FILE",
                         help="predictions.jsonl of one model (tunelab eval); give two or more")
    compare.add_argument("--judge", default="metric:exact_match",
                         help="metric:NAME, openai:BASE_URL, hf:MODEL_DIR or labels (default metric:exact_match)")
    compare.add_argument("--judge-model", help="model name for an OpenAI-compatible judge")
    compare.add_argument("--labels", help="human labels JSONL {id, model_a, model_b, winner} for --judge labels")
    compare.add_argument("--out", required=True, help="output directory")
    compare.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--answer-pattern", default=None, help="regex whose group 1 is the final answer")
    compare.add_argument("--fail-below", action="append", metavar="METRIC=VALUE",
                         help="exit 1 when win_rate/ci_low/ci_high of the first pair is below the value")
    compare.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    compare.set_defaults(func=_cmd_compare)

    reward = commands.add_parser("reward", help="reward model utilities")
    reward_commands = reward.add_subparsers(dest="reward_command", metavar="ACTION", required=True)
    score = reward_commands.add_parser("score", help="score answers (or preference pairs) with a reward model")
    score.add_argument("--model", required=True, help="reward model or adapter directory (train.objective: reward)")
    score.add_argument("--data", required=True, action="append", help="preference pairs or conversations (repeat)")
    score.add_argument("--out", help="JSONL of scores (a directory when several --data are given)")
    score.add_argument("--batch-size", type=int, default=8)
    score.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")
    score.add_argument("--device", default="auto")
    score.add_argument("--overwrite", action="store_true", help="replace existing score files")
    score.set_defaults(func=_cmd_reward_score)
