"""Why things failed, grouped: every failure a command counts is also explained.

``15 failed`` alone sends the user digging through side files. :func:`failure_reasons` groups
error messages by kind (the message with its variable parts — numbers, quoted values — blurred)
and keeps the first message of each kind in full; :func:`reason_lines` prints them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

_VARIABLE = re.compile(r"'[^']*'|\"[^\"]*\"|\b\d{4,}\b|0x[0-9a-f]+", re.IGNORECASE)
_HTTP_STATUS = re.compile(r"\b[45]\d\d\b")


def failure_kind(error: str) -> str:
    """The kind of an error message: its first line, with quoted values and long numbers blurred.

    HTTP status codes (4xx, 5xx) are kept, quoted or not: a 401 and a 403 are different kinds.
    """
    first = (error.strip().splitlines() or [""])[0]
    def blur(match: re.Match[str]) -> str:
        status = _HTTP_STATUS.search(match.group()) if match.group()[0] in "'\"" else None
        return status.group() if status else "…"

    return _VARIABLE.sub(blur, first)[:160]


def failure_reasons(errors: Iterable[str | None]) -> dict[str, dict[str, Any]]:
    """``{kind: {"count": n, "first": the first full message of that kind}}``, the commonest kind first."""
    found: dict[str, dict[str, Any]] = {}
    for error in errors:
        if not error:
            continue
        entry = found.setdefault(failure_kind(error), {"count": 0, "first": error.strip()[:500]})
        entry["count"] += 1
    return dict(sorted(found.items(), key=lambda item: -item[1]["count"]))


def reason_lines(reasons: dict[str, dict[str, Any]], indent: str = "  ", limit: int = 5) -> list[str]:
    """One line per kind of failure: its count and its first message; the rarest beyond ``limit`` summed."""
    lines = [f"{indent}{entry['count']} × {entry['first']}" for entry in list(reasons.values())[:limit]]
    rest = list(reasons.values())[limit:]
    if rest:
        lines.append(f"{indent}{sum(e['count'] for e in rest)} more, of {len(rest)} other kinds")
    return lines
