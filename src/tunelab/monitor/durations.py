"""Durations written the way people type them: ``90s``, ``15m``, ``1h``, ``7d``, ``2w``."""

from __future__ import annotations

import re

from tunelab.errors import TunelabError

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_duration(text: str, what: str = "duration") -> float:
    """Seconds in a duration such as ``15m`` or ``7d``.

    Args:
        text: a number followed by s, m, h, d or w.
        what: what the duration is, for the error message (e.g. "--since").

    Raises:
        TunelabError: the text is not a positive duration.
    """
    match = _PATTERN.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise TunelabError(f"{what} {text!r}: expected a positive duration such as 30s, 15m, 1h, 7d or 2w")
    return float(match.group(1)) * _UNITS[match.group(2)]


def format_duration(seconds: float) -> str:
    """A short human form of a duration in seconds, e.g. ``1h`` or ``90s``."""
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
