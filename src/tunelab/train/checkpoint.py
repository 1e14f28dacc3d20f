"""Checkpoints that a crash cannot corrupt, and everything exact resume needs.

``output_dir/checkpoints/step-N/`` holds the model (HF directory) or adapter (PEFT directory) with
tokenizer, plus ``optimizer.pt``, ``scheduler.pt``, ``rng.pt`` (loaded with ``weights_only=True``)
and ``trainer_state.json`` (step, data position, RNG of Python's ``random``). It is written under a
temporary name and renamed into place, so a kill at any moment leaves the previous one whole.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.errors import TunelabError

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    """``output_dir/checkpoints``."""
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as ``(step, path)``, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def save_model_dir(model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """Save a model (safetensors) or a PEFT adapter, with its tokenizer and chat template."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``checkpoints/step-N`` atomically and delete all but the newest ``keep``.

    Returns:
        The checkpoint directory.
    """
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model_dir(model, tokenizer, tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    state = {**trainer_state, "step": step, "python_rng": _jsonable(random.getstate())}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for _, old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def _load_full_weights(model: PreTrainedModel, path: Path) -> None:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    if not state:
        raise TunelabError(f"{path}: checkpoint holds no safetensors weights")
    result = model.load_state_dict(state, strict=False)
    loaded = {p.data_ptr() for n, p in model.named_parameters() if n in state}
    untied_missing = [n for n, p in model.named_parameters() if n in result.missing_keys and p.data_ptr() not in loaded]
    if result.unexpected_keys or untied_missing:
        raise TunelabError(
            f"{path}: checkpoint does not match the model (missing {untied_missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})"
        )


def load_checkpoint(
    path: Path,
    model: PreTrainedModel | PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, Any]:
    """Restore model/adapter weights, optimizer, scheduler, scaler and RNG from a checkpoint.

    Returns:
        The trainer state (step, data position, ...).
    """
    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_peft_weights(str(path), device=str(model.device)))
    else:
        _load_full_weights(model, path)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((path / "trainer_state.json").read_text())
    random.setstate(_tupled(state.pop("python_rng")))
    return state
