"""``tunelab train``: fine-tune a model from a config."""

from __future__ import annotations

import argparse


def _cmd_train(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.train.start import start_training

    config = load_config(args.config, args.overrides)

    def evaluators(eval_config):  # imported once the launch is checked (eval sits above train)
        from tunelab.eval.generation_eval import training_evaluators

        return training_evaluators(eval_config)

    result = start_training(config, args.config, args.overrides, resume=args.resume, overwrite=args.overwrite,
                            nproc=args.nproc, evaluators=evaluators)
    if result is None:
        return 0  # rank 0 reports for the run
    before = result.start_metrics
    shown = ", ".join(
        f"{k} {before[k]:.4g} -> {v:.4g}" if k in before else f"{k} {v:.4g}"
        for k, v in result.final_metrics.items() if isinstance(v, float)
    )
    print(f"done: {result.steps} steps; " + (f"{shown}; " if shown else "") + f"final model in {result.final_dir}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``tunelab train``."""
    train = commands.add_parser("train", help="fine-tune a model from a config")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", help="section.key=value, applied after the file")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    train.add_argument("--nproc", type=int, metavar="N",
                       help="train with N processes on this machine (runs torchrun; needs distributed.strategy)")
    train.set_defaults(func=_cmd_train)
