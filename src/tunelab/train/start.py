"""``tunelab train``: a run started from its config file.

The cheap checks come first (the config file's place, the starting model, the launch), so that a
mistake fails before torch and the model load; ``--nproc N`` re-runs the command under torchrun.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tunelab.config import EvalConfig, TunelabConfig


def start_training(
    config: TunelabConfig,
    config_file: str | Path,
    overrides: Sequence[str] = (),
    resume: bool = False,
    overwrite: bool = False,
    nproc: int | None = None,
    evaluators: Callable[[EvalConfig], list[Any]] | None = None,
) -> Any:
    """Train the run ``config`` (read from ``config_file`` with ``overrides``) describes.

    Args:
        nproc: re-run ``tunelab train`` under torchrun with this many processes (does not return).
        evaluators: builds the evaluators of held-out generation from the eval section; called
            after the launch checks, so that its imports come after them.

    Returns:
        The engine's ``TrainResult`` on rank 0, None on the other ranks (rank 0 reports for the run).
    """
    from tunelab.models.source import check_start_model
    from tunelab.train.parallel.launch import check_engine_installed, check_launch, relaunch
    from tunelab.train.run_dir import check_config_location

    check_config_location(config_file, config.output_dir)
    check_start_model(config.model.path, config.model.tiny is not None, config_file)
    if nproc is not None:  # re-run this command under torchrun; does not return
        relaunch(nproc, config.distributed,
                 [str(config_file), *overrides, *(["--resume"] if resume else []),
                  *(["--overwrite"] if overwrite else [])])
    check_launch(config.distributed, os.environ)  # before the heavy imports: a wrong launch fails at once
    check_engine_installed(config.distributed)
    from tunelab.train.engine import train

    result = train(config, resume=resume, overwrite=overwrite,
                   evaluators=evaluators(config.eval) if evaluators else [])
    if os.environ.get("RANK", "0") != "0":
        return None
    return result
