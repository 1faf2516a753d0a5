"""Errors that reach the user as one line: ``medssl: error: <file>: <problem>`` and exit code 2."""

from __future__ import annotations

import os
import re

__all__ = [
    "MedsslError",
    "DataError",
    "CheckpointError",
    "ConfigError",
    "ResourceError",
    "ErrorList",
    "is_out_of_memory",
    "attempted_allocation",
    "run_reporting_errors",
]


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


class ResourceError(MedsslError, MemoryError):
    """The machine (CPU RAM or accelerator memory) cannot hold what a command attempted; the message says what
    was attempted and which option lowers it."""


class ErrorList(MedsslError):
    """Several independent problems found in one pass, reported together (one per line)."""

    def __init__(self, errors: list[MedsslError]):
        if not errors:
            raise ValueError("ErrorList needs at least one error")
        self.errors = list(errors)
        super().__init__(None, "\n".join(str(e) for e in self.errors))


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure: ``MemoryError``, ``torch.OutOfMemoryError`` (CUDA) or the
    ``RuntimeError`` of torch's CPU allocator ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def attempted_allocation(error: BaseException) -> str | None:
    """The size of the failed allocation as the allocator states it, in GiB for the CPU allocator's bytes."""
    found = re.search(r"[Tt]ried to allocate (\d[\d.]* ?(?:[KMGT]i?B|bytes))", str(error))
    if not found:
        return None
    text = found.group(1)
    if text.endswith("bytes"):
        return f"{int(text.split()[0]) / 2**30:.2f} GiB"
    return text


def run_reporting_errors(fn, *args, **kwargs) -> int:
    """Call ``fn`` for a ``python -m medssl.X`` entry point: 0 when it returns, 2 after printing a
    :class:`MedsslError` as ``medssl: error: <file>: <problem>`` lines on stderr (as the ``medssl`` CLI does)."""
    import sys

    try:
        fn(*args, **kwargs)
    except MedsslError as e:
        for line in str(e).splitlines():
            print(f"medssl: error: {line}", file=sys.stderr, flush=True)
        return 2
    return 0
