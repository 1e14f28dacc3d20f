"""Checkpoints that a crash cannot corrupt, and everything exact resume needs.

``output_dir/checkpoints/step-N/`` holds the model (HF directory) or adapter (PEFT directory) with
tokenizer, plus ``optimizer.pt``, ``scheduler.pt``, ``rng.pt`` (loaded with ``weights_only=True``),
``trainer_state.json`` (step, data position, RNG of Python's ``random``, the open logging window,
the last evaluation) and, written last, ``manifest.json``: the size and SHA-256 of every other
file. It is written under a temporary name, flushed to disk (files, then directories), renamed
into place and the rename flushed, so a kill or a power cut at any moment leaves the previous one
whole. :func:`find_resumable` picks the newest checkpoint whose files match their manifest and
says which newer ones it skipped and why (a truncated file, a missing one, a changed hash).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.errors import TunelabError
from tunelab import faults
from tunelab.faults import crash_point, truncate_to
from tunelab.models.methods.prompt_learning import PROMPT_ENCODER_FILE, load_prompt_encoder_state, prompt_encoder_state
from tunelab.models.weight_files import safetensors_problem
from tunelab.outputs import fsync_path, fsync_tree

STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"


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
    """The newest checkpoint that verifies (see :func:`find_resumable`), or None."""
    return find_resumable(output_dir)[0]


def find_resumable(output_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint whose files verify, and the newer ones skipped with why.

    Returns:
        ``(checkpoint or None, [(skipped checkpoint, reason), ...])``, newest skipped first.
    """
    skipped: list[tuple[Path, str]] = []
    root = checkpoint_root(output_dir)
    candidates = sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))
                        if root.is_dir() else [], reverse=True)
    for _, path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_all(paths: list[Path]) -> list[str]:
    """SHA-256 of each file, several files at a time (hashlib releases the GIL on large buffers)."""
    if len(paths) < 2:
        return [_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(paths))) as pool:
        return list(pool.map(_sha256, paths))


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path) -> None:
    """Write ``manifest.json`` (size and SHA-256 of every file below ``directory``), last, after an fsync of all."""
    fsync_tree(directory)
    paths = _files(directory)
    files = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": digest}
             for p, digest in zip(paths, _sha256_all(paths))}
    manifest = directory / MANIFEST
    manifest.write_text(json.dumps({"version": 1, "files": files}, indent=1))
    crash_point(f"checkpoint {directory.name.removeprefix('.tmp-')} {MANIFEST}", truncate_to(manifest))
    fsync_path(manifest)
    fsync_path(directory)


def verify_checkpoint(path: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a file missing, truncated or changed), or None when it verifies.

    A checkpoint written before manifests existed is checked by its structure only: a readable
    ``trainer_state.json``, whole safetensors files and ``.pt`` files that are complete archives.
    """
    manifest = path / MANIFEST
    if not manifest.is_file():
        return _verify_structure(path)
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable (written when the run was killed?)"
    for name, expected in files.items():  # sizes first: cheap, and what a cut-off write changes
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{name} is {size:,} bytes, the manifest says {expected['size']:,} (truncated or changed)"
    names = list(files)
    for name, digest in zip(names, _sha256_all([path / name for name in names])):
        if digest != files[name]["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (corrupted)"
    return None


def _verify_structure(path: Path) -> str | None:
    try:
        json.loads((path / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "trainer_state.json is missing (an unfinished checkpoint)"
    except (OSError, ValueError):
        return "trainer_state.json is unreadable"
    for file in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            return problem
    for file in sorted(path.glob("*.pt")):
        if not zipfile.is_zipfile(file):
            return f"{file.name} is empty or truncated ({file.stat().st_size:,} bytes)"
    return None


def remove_unfinished(output_dir: str | Path) -> list[Path]:
    """Delete what a killed run left half-written in ``checkpoints/`` (never a finished checkpoint); return it."""
    root = checkpoint_root(output_dir)
    leftovers = [p for p in root.iterdir() if p.name.startswith((".tmp-", ".delete-", ".old-"))] if root.is_dir() else []
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return leftovers


def set_aside(path: Path) -> Path:
    """Rename a checkpoint that failed verification to ``step-N.corrupt`` (kept for inspection, never resumed)."""
    target = path.with_name(f"{path.name}.corrupt")
    number = 1
    while target.exists():
        number += 1
        target = path.with_name(f"{path.name}.corrupt{number}")
    path.rename(target)
    return target


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
    try:
        _write_checkpoint_files(tmp, model, tokenizer, optimizer, scheduler, scaler, trainer_state, step,
                                extra_tensors, state_dict, extra)
        write_manifest(tmp)
        crash_point(f"checkpoint step-{step} before rename")
        if final.exists():  # the same step again (a resumed run): keep the old one until the new one is in place
            stale = root / f".old-step-{step}"
            shutil.rmtree(stale, ignore_errors=True)
            final.rename(stale)
            tmp.rename(final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            tmp.rename(final)
        fsync_path(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write (disk full) frees its space
    crash_point(f"checkpoint step-{step} renamed")
    prune_checkpoints(output_dir, keep)
    return final


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    root = checkpoint_root(output_dir)
    for _, old in list_checkpoints(output_dir)[:-keep]:
        doomed = root / f".delete-{old.name}"
        old.rename(doomed)  # gone from the list at once: a kill while deleting leaves no half checkpoint
        crash_point(f"prune {old.name}")
        shutil.rmtree(doomed, ignore_errors=True)


def _write_checkpoint_files(
    tmp: Path,
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    trainer_state: dict[str, Any],
    step: int,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None,
    state_dict: dict[str, torch.Tensor] | None,
    extra: Callable[[Path], None] | None,
) -> None:
    written: set[Path] = set()

    def written_now(stage: str) -> None:
        # A crash point after each file, which may leave that file cut short (see tunelab.faults).
        if not faults.enabled():
            return
        for file in sorted(set(p for p in tmp.rglob("*") if p.is_file()) - written):
            written.add(file)
            crash_point(f"checkpoint step-{step} {stage} {file.relative_to(tmp)}", truncate_to(file))

    save_model_dir(model, tokenizer, tmp, state_dict)
    written_now("model")
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
    written_now("optimizer")
    if extra is not None:
        extra(tmp)
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    state = {**trainer_state, "step": step, "python_rng": _jsonable(random.getstate())}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    written_now("state")


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

    Raises:
        TunelabError: the checkpoint does not fit this model or optimizer (the config changed since).
    """
    try:
        return _restore(path, model, optimizer, scheduler, scaler)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise TunelabError(
            f"{path}: this checkpoint does not fit the model, method or optimizer of this config ({first}). Resume "
            "with the config the run was started with, or start again with --overwrite."
        ) from None


def _restore(
    path: Path,
    model: PreTrainedModel | PeftModel | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, Any]:
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
