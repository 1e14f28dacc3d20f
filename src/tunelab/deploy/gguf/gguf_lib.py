"""The optional ``gguf`` package (the ``export`` extra), imported only when a GGUF file is written or read."""

from __future__ import annotations

from typing import Any

from tunelab.errors import TunelabError


def _gguf() -> Any:
    """The ``gguf`` package, imported when needed; a clear error when the extra is not installed."""
    try:
        import gguf
    except ImportError:
        raise TunelabError(
            "GGUF export needs the gguf package: pip install 'tunelab[export]'"
        ) from None
    return gguf
