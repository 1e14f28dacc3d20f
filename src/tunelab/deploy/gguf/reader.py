"""Reading a GGUF file's metadata and tensor list."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tunelab.deploy.gguf.gguf_lib import _gguf
from tunelab.errors import TunelabError


def read_gguf(path: str | Path) -> dict[str, Any]:
    """The metadata and tensor list of a GGUF file.

    Returns:
        ``{"path", "file_size", "version", "metadata": {key: value}, "tensors": [{"name",
        "shape", "type", "n_bytes"}]}``; tensor shapes in numpy (row-major) order, i.e. the reverse
        of ggml's ``ne``; array values (token lists) as Python lists.
    """
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"{path}: GGUF file not found")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OSError) as exc:
        raise TunelabError(f"{path}: not a readable GGUF file ({exc})") from None
    metadata, version = {}, None
    for key, field in reader.fields.items():
        if key == "GGUF.version":
            version = int(field.contents())
        elif not key.startswith("GGUF."):
            metadata[key] = _plain(field.contents())
    tensors = [
        {"name": t.name, "shape": [int(d) for d in reversed(t.shape.tolist())], "type": t.tensor_type.name,
         "n_bytes": int(t.n_bytes)}
        for t in reader.tensors
    ]
    return {"path": str(path), "file_size": path.stat().st_size, "version": version, "metadata": metadata,
            "tensors": tensors}


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
