"""Errors that reach the user as one line: ``medssl: error: <file>: <problem>`` and exit code 2."""

from __future__ import annotations

import os

__all__ = ["MedsslError", "DataError", "CheckpointError", "ConfigError", "ErrorList"]


class MedsslError(Exception):
    """A user-facing error about one file (or one setting).

    Args:
        path: the file (or config id) the problem is about; ``None`` when no file is involved.
        problem: what is wrong, in words a user can act on.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        return self.problem if self.path is None else f"{self.path}: {self.problem}"


class DataError(MedsslError, ValueError):
    """An input image, label or datalist is missing, unreadable or inconsistent."""


class CheckpointError(MedsslError, ValueError):
    """A checkpoint is missing, corrupt, unsafe or does not fit the target model."""


class ConfigError(MedsslError, ValueError):
    """A configuration value is invalid (the path is the config id)."""


class ErrorList(MedsslError):
    """Several independent problems found in one pass, reported together (one per line)."""

    def __init__(self, errors: list[MedsslError]):
        if not errors:
            raise ValueError("ErrorList needs at least one error")
        self.errors = list(errors)
        super().__init__(None, "\n".join(str(e) for e in self.errors))
