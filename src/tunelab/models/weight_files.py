"""Checks on weight files before anything loads them: intact safetensors, never pickles, adapters that fit.

A truncated ``model.safetensors`` makes safetensors raise deep inside transformers; a pickled
``adapter_model.bin`` would be unpickled (running whatever code it holds) by PEFT when no
safetensors file sits beside it; an adapter trained on another base fails with a shape error from
``load_state_dict``. Each becomes a :class:`~tunelab.errors.TunelabError` that names the file.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tunelab.errors import TunelabError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def safetensors_problem(path: str | Path) -> str | None:
    """What is wrong with a safetensors file (truncated, not safetensors), or None when its layout is whole.

    Reads only the header: the file must be exactly as long as the header says its tensors need.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return f"{path.name} is {size} bytes: empty or truncated"
            (length,) = struct.unpack("<Q", prefix)
            if length > size - 8:
                return f"{path.name} is truncated or not a safetensors file (its header says {length:,} bytes)"
            header = json.loads(handle.read(length))
    except OSError as exc:
        return f"{path.name} cannot be read ({exc.strerror or exc})"
    except (ValueError, UnicodeDecodeError):
        return f"{path.name} is not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return f"{path.name} is not a safetensors file"
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    needed = 8 + length + max(ends, default=0)
    if size < needed:
        return f"{path.name} is truncated: {size:,} bytes, its header needs {needed:,}"
    return None


def check_safetensors_dir(directory: str | Path, what: str) -> None:
    """Raise when a safetensors file in ``directory`` is truncated or corrupt.

    Args:
        directory: a model or adapter directory.
        what: how the user named it, for the message (e.g. ``model.path runs/x``).
    """
    for file in sorted(Path(directory).glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            raise TunelabError(f"{what}: {problem}. Copy or download the model again.")


def check_adapter_dir(directory: str | Path, what: str) -> None:
    """Raise unless ``directory`` is a PEFT adapter with intact safetensors weights (never a pickle).

    Args:
        directory: the adapter directory.
        what: how the user named it, e.g. ``--adapter runs/x/final``.
    """
    path = Path(directory)
    if not path.is_dir():
        raise TunelabError(f"{what}: no such directory")
    if not (path / "adapter_config.json").is_file():
        raise TunelabError(f"{what}: not a PEFT adapter directory (no adapter_config.json)")
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f" ({', '.join(pickled)} is a pickle)" if pickled else ""
        raise TunelabError(
            f"{what}: no {ADAPTER_WEIGHTS}{found}; tunelab loads safetensors only, never pickled weights, which "
            "can run code when loaded. Convert a trusted adapter with safetensors (load it with "
            "torch.load(weights_only=True) and save_file it) first."
        )
    problem = safetensors_problem(weights)
    if problem:
        raise TunelabError(f"{what}: {problem}")


_SIZE_MISMATCH = re.compile(r"size mismatch for ([\w.]+): copying a param with shape (torch.Size\(\[[\d, ]*\]\)) "
                            r"from checkpoint, the shape in current model is (torch.Size\(\[[\d, ]*\]\))")


@contextmanager
def adapter_fit(adapter: str | Path, base: str | Path, what: str) -> Iterator[None]:
    """Turn PEFT's errors for an adapter that does not fit the base into one message naming both.

    Args:
        adapter: the adapter directory.
        base: the base model it is put on.
        what: how the user named the adapter (e.g. ``--adapter chat=runs/x/final``).
    """
    try:
        yield
    except (RuntimeError, ValueError, KeyError) as exc:
        text = str(exc)
        trained_on = _trained_on(adapter)
        origin = f" (it was trained on {trained_on})" if trained_on and str(trained_on) != str(base) else ""
        match = _SIZE_MISMATCH.search(text)
        if match:
            name, saved, wanted = match.groups()
            raise TunelabError(
                f"{what}: the adapter does not fit the base model {base}{origin}: {name} is "
                f"{_shape(saved)} in the adapter but the base needs {_shape(wanted)}. Use the base the adapter "
                "was trained on."
            ) from None
        if "size mismatch" in text or "Target modules" in text or "not found in the base model" in text:
            first = text.strip().splitlines()[0][:300]
            raise TunelabError(f"{what}: the adapter does not fit the base model {base}{origin}: {first}") from None
        raise


def _shape(text: str) -> str:
    return "[" + text.removeprefix("torch.Size([").removesuffix("])") + "]"


def _trained_on(adapter: str | Path) -> str | None:
    try:
        return json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
