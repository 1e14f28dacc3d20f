"""Naming the models ``tunelab verify`` compares: ``[NAME=][KIND:]LOCATION``.

KIND is one of :data:`KINDS`; without it the kind is read from the location (a URL, a ``.gguf``
file, or a directory holding ``adapter_config.json``, ``onnx_export.json`` or ``config.json``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tunelab.errors import TunelabError

KINDS = ("adapter", "hf", "gguf", "onnx", "url")
KIND_HELP = ("adapter:DIR (a PEFT adapter on its base), hf:DIR (a model directory, e.g. merged), gguf:FILE "
             "(read back by transformers, and by llama.cpp where llama-cpp-python is installed), onnx:DIR "
             "(a tunelab ONNX export), url:http://HOST:PORT/v1[#MODEL] (a running OpenAI-compatible server)")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSpec:
    """One model to compare: its display name, kind and location (a path, or a URL for ``url``)."""

    name: str
    kind: str
    location: str

    @property
    def path(self) -> Path:
        """The location as a path (not for ``url``)."""
        return Path(self.location).expanduser()


def detect_kind(location: str) -> str:
    """The kind of a model location, or a clear error saying how to name it.

    Raises:
        TunelabError: the location does not exist or is none of the known kinds.
    """
    if location.startswith(("http://", "https://")):
        return "url"
    path = Path(location).expanduser()
    if path.is_file():
        with path.open("rb") as handle:
            if handle.read(4) == GGUF_MAGIC:
                return "gguf"
        raise TunelabError(f"--model {location}: a file that is not GGUF; name its kind: {KIND_HELP}")
    if path.is_dir():
        for marker, kind in (("adapter_config.json", "adapter"), ("onnx_export.json", "onnx"), ("config.json", "hf")):
            if (path / marker).is_file():
                return kind
        raise TunelabError(f"--model {location}: a directory with no adapter_config.json, onnx_export.json or "
                           f"config.json; name its kind: {KIND_HELP}")
    raise TunelabError(f"--model {location}: not found")


def _default_name(kind: str, location: str) -> str:
    if kind == "url":
        parts = urlsplit(location)
        return f"served@{parts.netloc}" + (f"#{parts.fragment}" if parts.fragment else "")
    return f"{kind}:{Path(location).name or location}"


def parse_model_spec(text: str) -> ModelSpec:
    """``[NAME=][KIND:]LOCATION`` as a :class:`ModelSpec` (the location is checked to exist).

    Examples: ``adapter:runs/a/final``, ``merged=hf:runs/a/merged``, ``gguf:model-q8_0.gguf``,
    ``runs/a/onnx`` (kind detected), ``served=url:http://127.0.0.1:8000/v1``.

    Raises:
        TunelabError: an unknown kind, a missing location, or one whose kind cannot be told.
    """
    name = None
    head, sep, rest = text.partition("=")
    if sep and _NAME.match(head) and not head.startswith(("http", "/")):
        name, text = head, rest
    kind, sep, location = text.partition(":")
    if sep and kind in KINDS:
        if not location:
            raise TunelabError(f"--model {text}: no location after {kind}:")
    elif sep and re.fullmatch(r"[a-z][a-z0-9.\-]*", kind) and not location.startswith("//") and len(kind) > 1:
        raise TunelabError(f"--model {text}: unknown kind {kind!r}; one of: {KIND_HELP}")
    else:
        kind, location = detect_kind(text), text
    if kind == "url":
        if not location.startswith(("http://", "https://")):
            raise TunelabError(f"--model url:{location}: expected http://HOST:PORT/v1")
    elif kind == "gguf" and not Path(location).expanduser().is_file():
        raise TunelabError(f"--model gguf:{location}: file not found")
    elif kind != "gguf" and not Path(location).expanduser().is_dir():
        raise TunelabError(f"--model {kind}:{location}: directory not found")
    return ModelSpec(name or _default_name(kind, location), kind, location)
