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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.errors import TunelabError
from tunelab.models.adapters import PROMPT_ENCODER_FILE, load_prompt_encoder_state, prompt_encoder_state

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


def save_model_dir(model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, path: Path,
                   state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save a model (safetensors) or a PEFT adapter, with its tokenizer and chat template.

    ``state_dict``: the weights to write instead of the model's own (gathered from a sharded run).
    """
    if state_dict is None:
        model.save_pretrained(path, safe_serialization=True)
    else:
        model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
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
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    trainer_state: dict[str, Any],
    keep: int,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``checkpoints/step-N`` atomically and delete all but the newest ``keep``.

    ``extra_tensors`` maps file names to state dicts saved beside the model as safetensors
    (e.g. PPO's value head), inside the same atomic write. A sharded run passes its gathered
    ``state_dict``, no ``optimizer`` (its state is sharded), and ``extra``, which puts the
    sharded state into the checkpoint directory before it is renamed into place.

    Returns:
        The checkpoint directory.
    """
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model_dir(model, tokenizer, tmp, state_dict)
    encoder = prompt_encoder_state(model)  # prefix projection: the adapter file holds only its output
    if encoder is not None and state_dict is not None:  # sharded: the module holds a shard, the gathered dict all
        prefix = "prompt_encoder.default."
        encoder = {name.removeprefix(prefix): t for name, t in state_dict.items() if name.startswith(prefix)}
    if encoder is not None:
        save_file(encoder, tmp / PROMPT_ENCODER_FILE)
    for name, tensors in (extra_tensors or {}).items():
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / name)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if extra is not None:
        extra(tmp)
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


def read_trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json`` (step, data position, process count of a distributed run)."""
    return json.loads((path / "trainer_state.json").read_text())


def load_checkpoint(
    path: Path,
    model: PreTrainedModel | PeftModel | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, Any]:
    """Restore model/adapter weights, optimizer, scheduler, scaler and RNG from a checkpoint.

    ``model`` and ``optimizer`` are None when a sharded run restores them from its own state.

    Returns:
        The trainer state (step, data position, ...).
    """
    if isinstance(model, PeftModel):
        if (path / PROMPT_ENCODER_FILE).is_file():
            load_prompt_encoder_state(model, load_file(path / PROMPT_ENCODER_FILE, device=str(model.device)))
        else:
            set_peft_model_state_dict(model, load_peft_weights(str(path), device=str(model.device)))
    elif model is not None:
        _load_full_weights(model, path)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = read_trainer_state(path)
    random.setstate(_tupled(state.pop("python_rng")))
    return state
