"""Atomic file writes: a kill at any moment leaves the previous file or the complete new one.

A write goes to a temporary file beside the target (``.<name>.<random>.atomic.tmp``), is fsynced and renamed over
the target. A writer killed mid-write (SIGKILL, power loss) leaves its temporary file behind; the next
:func:`atomic_write` of any process into the same folder removes such leftovers, but only those of dead writers:

- a writer holds an exclusive ``flock`` on its temporary file from before the file gets its ``.atomic.tmp`` name
  until after the rename, and the kernel drops the lock when the writer dies, so a leftover is a temporary file
  whose lock can be taken. A live writer (another run in the same folder, another thread) keeps its lock and its
  file;
- between creating the file (named ``.atomic.init``) and locking it a writer holds no lock for a few microseconds:
  ``.atomic.init`` files are removed only when older than :data:`INIT_GRACE_S`;
- on a file system without ``flock`` a temporary file is named plain ``.<name>.<random>.tmp`` and never removed
  automatically (nothing can tell a dead writer from a live one there).

Other temporary files (other programs', other naming) are never touched.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

try:
    import fcntl
except ImportError:  # Windows: no flock, so no automatic clean-up
    fcntl = None

__all__ = [
    "atomic_save_figure",
    "atomic_write",
    "atomic_write_all",
    "atomic_write_text",
    "remove_stale_temp_files",
    "TEMP_SUFFIX",
    "INIT_GRACE_S",
]

TEMP_SUFFIX = ".atomic.tmp"
_INIT_SUFFIX = ".atomic.init"
_UNLOCKED_SUFFIX = ".tmp"
INIT_GRACE_S = 60.0
# folders this process has swept already: leftovers come from writers that died before it started, so once is enough
_swept: set[str] = set()


def _try_lock(fd: int) -> bool:
    """An exclusive non-blocking ``flock`` on ``fd``: False when another open file holds it or flock is unsupported."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        return False
    return True


def _remove_if_dead(path: Path) -> bool:
    """Remove ``path`` when no live process holds its lock; True when removed."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False  # gone already, or not ours to read
    try:
        if not _try_lock(fd):
            return False
        # the name may have been renamed over the target by a writer that finished in between: check it is the
        # same file before unlinking the name
        mine = os.fstat(fd)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            return False
        if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
            return False
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: str | os.PathLike, init_grace_s: float = INIT_GRACE_S) -> list[Path]:
    """Remove the temporary files that killed :func:`atomic_write` calls left in ``folder``.

    Only ``.*.atomic.tmp`` files whose writer is dead (their ``flock`` can be taken) and ``.*.atomic.init`` files
    older than ``init_grace_s`` seconds; a live writer's file, in this or any other process, is kept.

    Returns:
        the removed files.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    for entry in entries:
        name = entry.name
        if not name.startswith("."):
            continue
        path = Path(entry.path)
        if name.endswith(TEMP_SUFFIX):
            if _remove_if_dead(path):
                removed.append(path)
        elif name.endswith(_INIT_SUFFIX):
            try:
                old = now - entry.stat(follow_symlinks=False).st_mtime > init_grace_s
            except FileNotFoundError:
                continue
            if old:
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _prepare(path: Path, write: Callable[[BinaryIO], None]) -> tuple[int, str]:
    """A locked, fsynced temporary file beside ``path`` holding ``write``'s output; returns (fd, temp name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.path.abspath(path.parent)
    if folder not in _swept:
        remove_stale_temp_files(folder)
        _swept.add(folder)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_INIT_SUFFIX, dir=path.parent)
    try:
        # locked before it carries the name a sweep looks for: a sweep never meets a live, unlocked .atomic.tmp
        final = tmp[: -len(_INIT_SUFFIX)] + (TEMP_SUFFIX if _try_lock(fd) else _UNLOCKED_SUFFIX)
        os.rename(tmp, final)
        tmp = final
        # mkstemp creates 0600 files; give the result the mode a plain open() would (umask applies)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb", closefd=False) as f:
            write(f)
            f.flush()
            os.fsync(fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        os.close(fd)
        raise
    return fd, tmp


def _sync_folder(folder: Path) -> None:
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the file's data itself is synced


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, fsync it, then ``os.replace`` it into place.

    A kill at any moment leaves either the previous file or the complete new one, never a partial file. The
    first write of a process into a folder removes the temporary files of dead writers there (see the module
    docstring). The file gets the mode a plain ``open()`` would give it (``0o666`` less the process umask).
    """
    return atomic_write_all({path: write})[0]


def atomic_write_all(files: Mapping[str | os.PathLike, Callable[[BinaryIO], None]]) -> list[Path]:
    """:func:`atomic_write` for several files that belong together: every file is written to its temporary
    sibling first and only then are they all renamed into place, so an error while writing any of them (a bad
    value, a full disk) leaves none of them changed. A kill between the renames can still leave some renamed.

    Returns:
        the paths, in the order given.
    """
    prepared: list[tuple[Path, int, str]] = []
    try:
        for path, write in files.items():
            fd, tmp = _prepare(Path(path), write)
            prepared.append((Path(path), fd, tmp))
        for path, _, tmp in prepared:
            os.replace(tmp, path)
    except BaseException:
        for _, _, tmp in prepared:
            Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        for _, fd, _ in prepared:
            os.close(fd)  # releases the lock, after the rename
    for folder in {path.parent for path, _, _ in prepared}:
        _sync_folder(folder)
    return [path for path, _, _ in prepared]


def atomic_save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure as PNG through :func:`atomic_write` (the figure stays open: the caller closes it)."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", **savefig_kwargs))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` through :func:`atomic_write`."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))
