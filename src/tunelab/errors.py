"""Errors that describe a user's mistake.

The CLI prints these as one readable message (no traceback) and exits non-zero. Everything
else is a bug in tunelab and keeps its traceback.
"""

from __future__ import annotations


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
