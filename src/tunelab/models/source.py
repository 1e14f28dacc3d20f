"""A run's starting model, checked before anything loads: a missing one names the run that makes it.

Configs that start from an earlier run (``model.path: runs/quickstart/output/final``) fail on a
fresh clone until that run exists. The check looks at the configs beside the one being run for
the one whose ``output_dir`` holds the missing path, and says which command to run first.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from tunelab.errors import TunelabError
from tunelab.hub import looks_like_hub_id


def _same_path(a: str | Path, b: str | Path) -> bool:
    return os.path.normpath(os.path.expanduser(str(a))) == os.path.normpath(os.path.expanduser(str(b)))


def config_that_makes(model_path: str, config_file: str | Path) -> Path | None:
    """The YAML config beside ``config_file`` whose ``output_dir`` (or ``output_dir/final``) is ``model_path``."""
    folder = Path(config_file).parent
    for candidate in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        if _same_path(candidate, config_file):
            continue
        try:
            loaded = yaml.safe_load(candidate.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        output_dir = loaded.get("output_dir") if isinstance(loaded, dict) else None
        if isinstance(output_dir, str) and (_same_path(model_path, output_dir) or
                                            _same_path(model_path, Path(output_dir) / "final")):
            return candidate
    return None


def check_start_model(model_path: str, builds_tiny: bool, config_file: str | Path) -> None:
    """Fail at once when a config's local ``model.path`` does not exist, with the command that makes it.

    A Hub id, an existing path and a tiny model the run builds itself pass (loading checks them further).

    Raises:
        TunelabError: the path is missing; names the config beside ``config_file`` that writes it, if any.
    """
    try:
        if builds_tiny or Path(model_path).expanduser().exists() or looks_like_hub_id(model_path):
            return
    except PermissionError:
        return  # there, but not ours to read: loading names the problem
    maker = config_that_makes(model_path, config_file)
    if maker is not None:
        raise TunelabError(f"model.path {model_path}: no such model directory; {config_file} starts from the model "
                           f"that {maker} trains. Run that first: tunelab train {maker}")
    hint = " (the final model of an earlier run? train that run first)" if Path(model_path).name == "final" else ""
    raise TunelabError(f"model.path {model_path}: no such model directory{hint}")
