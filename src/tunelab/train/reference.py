"""The reference model of DPO and KTO: a frozen copy, or log-probs computed once and cached."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch

from tunelab.data.files import file_fingerprint
from tunelab.train.batches import eval_batches
from tunelab.models.logprobs import sequence_logps


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the model in eval mode with no trainable parameters (full/freeze fine-tuning)."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def model_fingerprint(model_path: str) -> str:
    """A content hash of a model directory's weights and config (a hub id hashes as its name)."""
    directory = Path(model_path)
    digest = hashlib.sha256(model_path.encode())
    if directory.is_dir():
        digest = hashlib.sha256()
        for path in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("config.json")):
            digest.update(file_fingerprint(str(path)).encode())
    return digest.hexdigest()[:20]


def attach_reference_logps(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    cache_dir: Path,
    model_path: str,
    packing: bool,
    batch_tokens: int,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    autocast: Callable[[], Any],
) -> datasets.Dataset:
    """Add a ``reference_logps`` column ``[first, second]`` to a pair dataset, cached on disk.

    ``model`` must still be the reference (called before adapters are added or weights change).
    The cache is keyed by the model's weights, so a run that resumes, or a second run on the
    same data and base, loads it instead of recomputing.
    """
    target = cache_dir / model_fingerprint(model_path)
    if (target / "done.json").is_file():
        return datasets.load_from_disk(str(target))
    was_training = model.training
    model.eval()
    values: list[float] = []
    with torch.no_grad():
        for batch in eval_batches(dataset, packing, batch_tokens, batch_size, pad_id):
            with autocast():
                values.extend(sequence_logps(model, batch.to(device))[0].float().cpu().tolist())
    model.train(was_training)
    with_reference = dataset.add_column("reference_logps", [values[i : i + 2] for i in range(0, len(values), 2)])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}")
    with_reference.save_to_disk(str(tmp))
    (tmp / "done.json").write_text(json.dumps({"rows": len(values) // 2}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return datasets.load_from_disk(str(target))
