"""Errors that describe a user's mistake.

The CLI prints these as one readable message (no traceback) and exits non-zero. Everything
else is a bug in tunelab and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class TunelabError(Exception):
    """A problem the user can fix: bad config, bad data, a missing file or package."""

    exit_code = 2


class ConfigError(TunelabError):
    """The configuration file or an override is invalid."""


class DataError(TunelabError):
    """A data file cannot be read or holds a record that cannot be used."""


class TrainingError(TunelabError):
    """Training cannot go on (for example the loss became NaN)."""

    exit_code = 1


def read_user_text(path: str | Path, what: str, error: type[TunelabError] = TunelabError) -> str:
    """Read a user's UTF-8 text file; a missing or non-UTF-8 file raises ``error`` naming it.

    Args:
        path: the file.
        what: what the file is, for the message (e.g. "config file").
        error: the TunelabError subclass to raise.
    """
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: {what} is a directory") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
