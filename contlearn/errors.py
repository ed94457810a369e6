"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

from pathlib import Path


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


class RunInterrupted(Exception):  # noqa: N818 - an outcome, not an error
    """A run stopped on a signal after saving a checkpoint; ``code`` is 128 + signal.

    (Here, beside the errors, so that the command line can catch it without importing torch.)
    """

    def __init__(self, path: Path, step: int, signum: int, saved: bool) -> None:
        self.path, self.step, self.code = path, step, 128 + signum
        how = f"continue with `contlearn resume {path}`" if saved else "no checkpoint was saved"
        super().__init__(f"interrupted at step {step}; metrics flushed; {how}")
