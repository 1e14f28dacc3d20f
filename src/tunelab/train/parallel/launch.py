"""Starting a run on several processes, and refusing launches that would not train as configured.

``tunelab train run.yaml --nproc N`` re-executes itself under ``torchrun --standalone
--nproc_per_node N`` (one node); for several nodes, run ``torchrun`` yourself (docs/distributed.md).
Every process then checks its launch environment with :func:`check_launch` before any weights load:
a launch whose processes would silently train unsynchronised copies, or not shard what the config
says to shard, is an error.

This module imports no torch, so that the checks run in the CLI before the heavy imports.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence

from tunelab.config import DistributedConfig
from tunelab.errors import ConfigError, TunelabError

REQUESTED_ENV = "TUNELAB_NPROC"  # set by `tunelab train --nproc N` for its workers
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
HOW_TO_LAUNCH = "tunelab train CONFIG --nproc N, or torchrun --nproc_per_node N -m tunelab train CONFIG"


class LaunchError(TunelabError):
    """The processes were started in a way that would not train as the config says."""


def accelerate_markers(env: Mapping[str, str]) -> list[str]:
    """Environment variables that ``accelerate launch`` sets for its FSDP/DeepSpeed plugins or any launch."""
    return sorted(
        name for name in env
        if name.startswith(("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "FSDP_", "ACCELERATE_DEEPSPEED_"))
        or name in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "ACCELERATE_DYNAMO_BACKEND")
    )


def check_launch(cfg: DistributedConfig, env: Mapping[str, str]) -> int:
    """Check that the launch matches ``distributed.strategy``; return the world size.

    Refused: a launch by ``accelerate launch`` (its FSDP on CPU starts unsynchronised processes or
    falls back to DDP without saying so; tunelab drives FSDP2 and DeepSpeed itself); several
    processes with strategy ``none`` (each would train its own copy); a strategy without a launcher;
    an incomplete launcher environment; and a world size other than the ``--nproc`` asked for.

    Args:
        cfg: the ``distributed`` section.
        env: the process environment (``os.environ``).

    Raises:
        LaunchError: naming what is wrong and how to launch instead.
    """
    strategy = cfg.strategy
    markers = accelerate_markers(env)
    sharding_plugin = [name for name in markers if "FSDP" in name or "DEEPSPEED" in name]
    if sharding_plugin or (markers and strategy != "none"):
        raise LaunchError(
            f"this process was started by `accelerate launch` ({', '.join(markers[:3])}). tunelab drives DDP, "
            "FSDP2 and DeepSpeed itself and does not use accelerate's plugins (on CPU, accelerate's FSDP "
            "starts unsynchronised processes or falls back to DDP without sharding). Set "
            f"distributed.strategy and launch with: {HOW_TO_LAUNCH}"
        )
    world = env.get("WORLD_SIZE")
    requested = env.get(REQUESTED_ENV)
    if world is None:
        if strategy != "none":
            raise LaunchError(
                f"distributed.strategy {strategy} needs processes started by a launcher (WORLD_SIZE is not set): "
                f"{HOW_TO_LAUNCH}; or set distributed.strategy none for one process"
            )
        return 1
    missing = [name for name in LAUNCHER_ENV if name not in env]
    if missing:
        raise LaunchError(f"WORLD_SIZE={world} is set but {', '.join(missing)} are not: start the processes with "
                          f"torchrun (or deepspeed), e.g. {HOW_TO_LAUNCH}")
    try:
        world_size = int(world)
    except ValueError:
        raise LaunchError(f"WORLD_SIZE={world!r} is not a number") from None
    if requested is not None and requested != world:
        raise LaunchError(f"--nproc {requested} was asked for but this process was launched with WORLD_SIZE={world}; "
                          "nothing would be sharded as configured. Launch with one or the other, not both")
    if world_size > 1 and strategy == "none":
        raise LaunchError(
            f"{world_size} processes were launched but distributed.strategy is none: each would train its own "
            "copy of the model on the same data. Set distributed.strategy ddp, fsdp or deepspeed"
        )
    return world_size


def check_engine_installed(cfg: DistributedConfig) -> None:
    """Fail before launching when the chosen engine is not installed."""
    if cfg.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("distributed.strategy deepspeed: DeepSpeed is not installed. Install it into this "
                          "environment with: pip install --no-build-isolation 'tunelab[deepspeed]'")


def torchrun_command(nproc: int, train_args: Sequence[str]) -> list[str]:
    """The command that runs ``tunelab train ARGS`` in ``nproc`` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "tunelab", "train", *train_args]


def relaunch(nproc: int, cfg: DistributedConfig, train_args: Sequence[str]) -> None:
    """Replace this process with ``torchrun`` running ``tunelab train ARGS`` in ``nproc`` processes.

    Raises:
        LaunchError: ``--nproc`` inside an already launched process, or with strategy none.
        ConfigError: the engine of the strategy is not installed.
    """
    if nproc < 1:
        raise LaunchError(f"--nproc {nproc}: give at least 1 process")
    if "WORLD_SIZE" in os.environ:
        raise LaunchError("--nproc inside a process that torchrun (or another launcher) already started; "
                          "give the process count to the launcher only")
    if cfg.strategy == "none":
        raise LaunchError(f"--nproc {nproc} with distributed.strategy none: set distributed.strategy ddp, fsdp or "
                          "deepspeed (in the config, or as an override: distributed.strategy=ddp)")
    check_engine_installed(cfg)
    command = torchrun_command(nproc, train_args)
    env = {**os.environ, REQUESTED_ENV: str(nproc)}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)
