"""Progress reports: "k/N" with elapsed time and ETA, shown only where someone is watching.

One rule for every long loop (``medssl infer`` over volumes, ``check`` over datalist items, ``evaluate`` over
cases, the study over cells): a report is emitted only when the ``medssl.progress`` logger is enabled for INFO.
``medssl.cli.main`` sets that from the flags: on with ``--verbose`` or when stderr is a terminal, off with
``--quiet`` or when stderr is a file or pipe; a Python user turns it on with ``logging`` as usual. When on, a
terminal gets a tqdm bar (cleared when done), anything else one INFO line per finished item, e.g.
``infer: volume 2/5 ct_0003.nii.gz (elapsed 12s, ETA 18s)``. When off, nothing is printed and tqdm is not
imported, so the one-line errors of the CLI stay the last lines on stderr.

Example::

    for path in track(files, "infer", unit="volume", describe=lambda p: p.name):
        segment(path)
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["Progress", "format_seconds", "progress_enabled", "stderr_is_terminal", "track"]

logger = logging.getLogger("medssl.progress")

T = TypeVar("T")


def stderr_is_terminal() -> bool:
    """Whether ``sys.stderr`` (as it is now, e.g. replaced by pytest) is an interactive terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_enabled() -> bool:
    """Whether progress is reported: the ``medssl.progress`` logger is enabled for INFO."""
    return logger.isEnabledFor(logging.INFO)


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``2h03m``."""
    s = int(round(max(0.0, seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Counts finished items of a known total and reports "k/N" with elapsed time and ETA.

    Thread-safe, so items finishing in any order (parallel study cells) advance one counter. The ETA is the
    mean time per finished item times the items left, which also holds for items run several at a time.

    Args:
        total: number of items.
        desc: what is being done, first word of every report (``"infer"``).
        unit: what an item is (``"volume"``); in the log lines and the bar.
        enabled: report at all (default: :func:`progress_enabled`). ``False`` silences it whatever the logging.

    Example::

        with Progress(len(cells), "study", unit="cell") as progress:
            for cell in cells:
                run(cell)
                progress.advance(f"{cell}: Dice 0.81")
    """

    def __init__(self, total: int, desc: str, *, unit: str = "item", enabled: bool | None = None) -> None:
        if int(total) < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self.total, self.desc, self.unit = int(total), desc, unit
        self.enabled = progress_enabled() if enabled is None else bool(enabled) and progress_enabled()
        self.done = 0
        self._start = time.perf_counter()
        self._lock = threading.Lock()
        self._bar: Any = None
        if self.enabled and stderr_is_terminal():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)

    def eta(self) -> float | None:
        """Seconds left at the mean time per finished item; ``None`` before the first one finishes."""
        if self.done == 0:
            return None
        return (time.perf_counter() - self._start) / self.done * (self.total - self.done)

    def advance(self, note: str = "") -> None:
        """Count one finished item; ``note`` (e.g. its name or result) goes into the report."""
        with self._lock:
            self.done += 1
            if not self.enabled:
                return
            if self._bar is not None:
                if note:
                    self._bar.set_postfix_str(note, refresh=False)
                self._bar.update(1)
                return
            elapsed = format_seconds(time.perf_counter() - self._start)
            logger.info(
                "%s: %s %d/%d%s (elapsed %s, ETA %s)",
                self.desc,
                self.unit,
                self.done,
                self.total,
                f" {note}" if note else "",
                elapsed,
                format_seconds(self.eta() or 0.0),
            )

    def close(self) -> None:
        """Clear the bar (log lines need nothing)."""
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(
    items: Iterable[T],
    desc: str,
    *,
    unit: str = "item",
    describe: Callable[[T], str] | None = None,
    enabled: bool | None = None,
) -> Iterator[T]:
    """Yield ``items``, reporting each one as finished when the loop asks for the next (see :class:`Progress`).

    Args:
        items: the items; a sized collection (it is materialised as a list when it is not).
        desc: what is being done (``"evaluate"``).
        unit: what an item is (``"case"``).
        describe: the note for an item, e.g. its file name.
        enabled: as in :class:`Progress`.

    Yields:
        the items, unchanged and in order. An item whose loop body raises is not counted as finished.
    """
    items = items if isinstance(items, (list, tuple)) else list(items)
    with Progress(len(items), desc, unit=unit, enabled=enabled) as progress:
        for item in items:
            yield item
            progress.advance(describe(item) if describe is not None else "")
