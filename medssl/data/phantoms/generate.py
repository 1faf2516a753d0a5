"""Phantom datasets on disk: generate one atomically (``medssl phantom``) or reuse the one a bundle expects."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medssl.data.phantoms.common import DATALIST_NAME, check_seed, check_shape
from medssl.data.phantoms.ct_abdomen import CT_DEFAULT_SHAPE, CT_MIN_SHAPE, organ_subset, write_ct_dataset
from medssl.data.phantoms.la_mri import LA_DEFAULT_SHAPE, LA_MIN_SHAPE, write_la_dataset
from medssl.errors import ConfigError, DataError

__all__ = ["PHANTOM_KINDS", "generate_phantom_dataset", "ensure_phantom"]

logger = logging.getLogger(__name__)

PHANTOM_KINDS = ("ct-abdomen", "la-mri")
# kind -> (default shape, smallest shape, dataset writer)
_KINDS = {
    "ct-abdomen": (CT_DEFAULT_SHAPE, CT_MIN_SHAPE, write_ct_dataset),
    "la-mri": (LA_DEFAULT_SHAPE, LA_MIN_SHAPE, write_la_dataset),
}


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        if (out / DATALIST_NAME).is_file():
            raise DataError(out, f"already holds a dataset ({DATALIST_NAME}); delete it or choose another folder")
        raise DataError(out, "exists and is not empty; choose a new or empty output folder")


def _generate(kind, out_dir, cases, unlabeled, seed, shape, *, concurrent_ok: bool, organs=None) -> Path:
    if kind not in PHANTOM_KINDS:
        raise ConfigError("kind", f"must be one of {', '.join(PHANTOM_KINDS)}, got {kind!r}")
    if organs is not None:
        if kind != "ct-abdomen":
            raise ConfigError("organs", f"only the ct-abdomen phantom has an organ set, not {kind}")
        kept = organ_subset(organs)  # validated before anything is written
        organs = [name for k, name in kept.items() if k]
    if isinstance(cases, bool) or not isinstance(cases, (int, np.integer)) or cases < 2:
        raise ConfigError("cases", f"needs at least 2 labeled cases (training + validation), got {cases!r}")
    if isinstance(unlabeled, bool) or not isinstance(unlabeled, (int, np.integer)) or unlabeled < 0:
        raise ConfigError("unlabeled", f"must be a non-negative integer, got {unlabeled!r}")
    seed = check_seed(seed)
    default, minimum, writer = _KINDS[kind]
    shape = check_shape(kind, default if shape is None else shape, minimum)
    out = Path(out_dir).absolute()
    _check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    logger.info("writing %s phantom (%d labeled + %d unlabeled, seed %d, shape %s) to %s", kind, cases, unlabeled,
                seed, shape, out)  # fmt: skip
    # Everything goes to a hidden sibling folder that is renamed at the end, so a killed run never leaves a
    # half-written dataset at ``out`` (at worst a stale ``.<name>.tmp-*`` folder beside it).
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        data = writer(tmp, seed, int(cases), int(unlabeled), shape, organs)
        data["phantom"] = {"kind": kind, "seed": seed, "cases": int(cases), "unlabeled": int(unlabeled),
                           "shape": list(shape)}  # fmt: skip
        if organs is not None:
            data["phantom"]["organs"] = organs
        (tmp / DATALIST_NAME).write_text(json.dumps(data, indent=2) + "\n")
        try:
            os.replace(tmp, out)  # atomic; replaces ``out`` only when it is an empty folder
        except OSError:
            if concurrent_ok and (out / DATALIST_NAME).is_file():
                logger.info("%s was generated concurrently by another process; keeping that one", out)
                shutil.rmtree(tmp, ignore_errors=True)
                return out / DATALIST_NAME
            _check_out_dir(out)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("%s phantom written in %.1f s: %s", kind, time.perf_counter() - start, out / DATALIST_NAME)
    return out / DATALIST_NAME


def generate_phantom_dataset(
    kind: str,
    out_dir: str | os.PathLike,
    *,
    cases: int = 6,
    unlabeled: int = 4,
    seed: int = 0,
    shape: Sequence[int] | None = None,
    organs: Sequence[str | int] | None = None,
) -> Path:
    """Write a phantom dataset and its Decathlon datalist (``medssl phantom``).

    ``ct-abdomen`` writes ``imagesTr/``, ``labelsTr/`` and ``imagesUn/`` NIfTI files; ``la-mri`` writes the LA 2018
    raw layout ``raw/<CASEID>/lgemri.nrrd`` (+ ``laendo.nrrd``, 0/255, for labeled cases) and converts it with
    :func:`medssl.data.prepare.prepare_la2018`. Of the ``cases`` labeled cases the last
    ``max(1, round(0.2 * cases))`` form ``validation``, the others ``training``; the ``unlabeled`` cases follow
    (case indices ``cases ... cases + unlabeled - 1``). Paths in the datalist are relative to its folder.
    Generation happens in a temporary sibling folder renamed into place at the end.

    Args:
        kind: ``"ct-abdomen"`` or ``"la-mri"``.
        out_dir: folder to create; it must not exist or be empty.
        cases: labeled cases, at least 2.
        unlabeled: unlabeled cases.
        seed: non-negative seed; case ``i`` uses the generator seeded with ``(seed, i)``.
        shape: ``(x, y, z)`` voxels; default :data:`CT_DEFAULT_SHAPE` or :data:`LA_DEFAULT_SHAPE`.
        organs: ``ct-abdomen`` only: the organs to label (names or BTCV indices), renumbered ``1..K`` in BTCV
            order; the others stay in the image and become background (see :func:`organ_subset`). Default: all 13.

    Returns:
        Path of ``out_dir/datalist.json``.

    Raises:
        ConfigError: unknown kind, fewer than 2 cases, negative counts or seed, too small a shape.
        DataError: ``out_dir`` exists and is not empty (including a previous phantom: use
            :func:`ensure_phantom` to reuse one).

    Example::

        datalist = generate_phantom_dataset("ct-abdomen", "data/ct_phantom", cases=6, unlabeled=4)
    """
    return _generate(kind, out_dir, cases, unlabeled, seed, shape, concurrent_ok=False, organs=organs)


def ensure_phantom(kind: str, out_dir: str | os.PathLike, **kwargs) -> Path:
    """Return ``out_dir/datalist.json``, generating the phantom first (and logging it) only when it is missing.

    Bundles call this for their default data folder under ``data/``. Safe when several processes call it at
    once: each generates into its own temporary folder and the first rename wins; the others discard theirs.
    An existing dataset is reused as it is; when its recorded parameters differ from ``kwargs`` a warning says so.

    Args:
        kind: ``"ct-abdomen"`` or ``"la-mri"``.
        out_dir: the dataset folder.
        kwargs: ``cases``, ``unlabeled``, ``seed``, ``shape``, ``organs`` as in :func:`generate_phantom_dataset`.

    Raises:
        DataError: ``out_dir`` exists, is not empty and holds no ``datalist.json``.
    """
    out = Path(out_dir)
    datalist = out / DATALIST_NAME
    if datalist.is_file():
        _warn_if_different(datalist, kind, kwargs)
        return datalist
    logger.info("no %s in %s: generating the %s phantom", DATALIST_NAME, out, kind)
    params = {"cases": 6, "unlabeled": 4, "seed": 0, "shape": None, "organs": None, **kwargs}
    unknown = set(params) - {"cases", "unlabeled", "seed", "shape", "organs"}
    if unknown:
        raise TypeError(f"ensure_phantom() got unexpected keyword arguments {sorted(unknown)}")
    return _generate(kind, out, params["cases"], params["unlabeled"], params["seed"], params["shape"],
                     concurrent_ok=True, organs=params["organs"])  # fmt: skip


def _warn_if_different(datalist: Path, kind: str, kwargs: Mapping) -> None:
    try:
        recorded = json.loads(datalist.read_text()).get("phantom", {})
    except (OSError, ValueError):
        return  # the datalist validator reports unreadable files with their reason
    wanted = {"kind": kind, **{k: list(v) if k == "shape" and v is not None else v for k, v in kwargs.items()}}
    if wanted.get("organs") is not None:
        wanted["organs"] = [name for k, name in organ_subset(wanted["organs"]).items() if k]
    differ = {k: (recorded.get(k), v) for k, v in wanted.items() if v is not None and recorded.get(k) != v}
    if differ:
        logger.warning("%s: reusing the existing phantom although its parameters differ (recorded, requested): %s",
                       datalist, differ)  # fmt: skip
