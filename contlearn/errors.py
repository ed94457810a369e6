"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class ContlearnError(Exception):
    """A problem with the user's input (config, names, files) and how to fix it.

    The message is one line: what is wrong, then what to do about it.
    """


class ConfigError(ContlearnError, ValueError):
    """A config key or value is unknown, malformed or out of range."""


class DataError(ContlearnError, OSError):
    """A data file is missing, truncated or fails its checksum."""


class StoreError(ContlearnError, OSError):
    """Something could not be written to the run directory (disk full, file-size limit, ...)."""


class RunDirError(ContlearnError):
    """A run directory cannot be used (already holds a run, is not a run, ...)."""
