"""What shaped a study cell's result, stored beside it, so a rerun never mixes results of different settings.

A study resumes: a finished cell is skipped and a killed one continues from its ``last.pt``. That is only right when
the rerun asks for the same thing. Each cell (and the study's own pretraining run) therefore stores in
``<cell>/cell.json`` one fingerprint per key of everything that shapes its result: the content of every bundle and
overlay file, the overrides, precision, budget, validation interval, seed, the datalist the cell trains on (its
content), the pretrained checkpoint (the SHA-256 of the file, or the fingerprint of the study's own pretraining
run that writes it) and the medssl version. A rerun whose fingerprints differ is refused with one line naming the
cell and the differing keys, unless ``redo_changed`` is given: then those cells are deleted and computed again.

``study.json`` at the study root keeps the history: one record per invocation (time, medssl version, the
configuration, each cell's fingerprint and the cells redone).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medssl.atomic import atomic_write_text
from medssl.errors import ConfigError

__all__ = ["CELL_FILE", "file_sha256", "content_sha256", "fingerprint", "claim_cells", "append_history"]

log = logging.getLogger(__name__)

CELL_FILE = "cell.json"
_FORMAT = "medssl-study-cell/1"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (read in chunks: pretrained checkpoints can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_sha256(value: Any) -> str:
    """SHA-256 of a JSON value in canonical form (sorted keys), so equal settings hash equally."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint(
    *,
    bundles: Sequence[str | os.PathLike],
    overlays: Sequence[str | os.PathLike],
    overrides: Mapping[str, Any],
    datalist: Any,
    pretrained: str | None,
    **settings: Any,
) -> dict[str, Any]:
    """Per-key fingerprint of one run: file contents and JSON values as SHA-256, plain settings as they are.

    Args:
        bundles: bundle config files (their content is hashed, keyed by file name).
        overlays: overlay files (content hashed, keyed by file name).
        overrides: bundle id overrides (hashed in canonical form).
        datalist: the datalist the run trains on, as a JSON value (hashed).
        pretrained: fingerprint of the pretrained checkpoint (``None``: from scratch).
        settings: plain values (budget, val_interval, seed, precision, …) stored as they are.
    """
    from medssl import __version__

    return {
        "bundles": {Path(p).name: file_sha256(p) for p in bundles},
        "overlays": {Path(p).name: file_sha256(p) for p in overlays},
        "overrides": content_sha256(dict(overrides)),
        "datalist": content_sha256(datalist),
        "pretrained": pretrained,
        **{k: v for k, v in settings.items()},
        "medssl_version": __version__,
    }


def _differing(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def claim_cells(root: str | os.PathLike, cells: Mapping[str, Mapping[str, Any]], *, redo_changed: bool) -> list[str]:
    """Check every cell's stored fingerprint before anything runs; write it for new cells.

    Args:
        root: folder holding the cell folders (``<out>/cells``; ``<out>`` for the pretraining run).
        cells: cell folder name → its :func:`fingerprint`.
        redo_changed: delete cells whose fingerprint differs (or that hold results without one) so that they are
            computed again, instead of refusing.

    Returns:
        the names of the cells deleted for recomputation.

    Raises:
        ConfigError: a cell was computed with other settings and ``redo_changed`` is false; the message names the
            cell, the differing keys and how many more cells differ.
    """
    root = Path(root)
    changed: dict[str, list[str]] = {}
    for name, fp in cells.items():
        cell_dir = root / name
        stored = _read(cell_dir / CELL_FILE)
        if stored is not None:
            diff = _differing(stored.get("keys", {}), fp)
            if diff:
                changed[name] = diff
        elif cell_dir.is_dir() and any(cell_dir.iterdir()):
            changed[name] = [f"(no {CELL_FILE}: results of an older medssl or another tool)"]
    if changed and not redo_changed:
        name, diff = next(iter(changed.items()))
        more = f" (and {len(changed) - 1} more cell(s))" if len(changed) > 1 else ""
        raise ConfigError(
            root / name / CELL_FILE,
            f"cell {name} was computed with different settings: {', '.join(diff)} differ{more}; "
            "rerun with --redo-changed to recompute the changed cells, or use another --out",
        )
    for name in changed:
        log.warning(f"recomputing {name}: its settings changed ({', '.join(changed[name])})")
        print(f"{name}: settings changed ({', '.join(changed[name])}), recomputing", flush=True)
        shutil.rmtree(root / name)
    for name, fp in cells.items():
        path = root / name / CELL_FILE
        if name in changed or not path.is_file():
            atomic_write_text(path, json.dumps({"format": _FORMAT, "cell": name, "keys": dict(fp)}, indent=2) + "\n")
    return list(changed)


def _read(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(
            path, f"cannot read the cell fingerprint ({e}); delete the cell folder to recompute it"
        ) from e
    if not isinstance(data, dict) or not isinstance(data.get("keys"), dict):
        raise ConfigError(path, "not a medssl study cell fingerprint; delete the cell folder to recompute it")
    return data


def append_history(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Append one invocation's record to ``study.json`` (``{"history": [...]}``), keeping earlier ones.

    A ``study.json`` of an older medssl (the bare configuration) becomes the first history record.
    """
    from medssl import __version__

    path = Path(path)
    history: list[Any] = []
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(path, f"cannot read the study history ({e})") from e
        history = list(old["history"]) if isinstance(old, dict) and "history" in old else [{"config": old}]
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "medssl_version": __version__, **dict(record)}
    history.append(entry)
    return atomic_write_text(path, json.dumps({"history": history}, indent=2, default=str) + "\n")
