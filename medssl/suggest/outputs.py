"""``medssl suggest``'s outputs: ``suggestions.csv``, the PNG of the most uncertain planes, the datalist copy with a
``to_label`` key, and :func:`suggest`, which runs scoring, selection and the writes."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medssl.errors import ConfigError, DataError
from medssl.suggest.scoring import score_volumes
from medssl.suggest.selection import Suggestion, select

__all__ = ["TO_LABEL_KEY", "CACHE_DIR", "write_label_datalist", "plot_suggestions", "suggest"]

logger = logging.getLogger(__name__)

TO_LABEL_KEY = "to_label"
CACHE_DIR = ".suggest_cache"


def _csv_text(suggestions: Sequence[Suggestion]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "case", "score", "strategy", "adjusted_score", "image"])
    for s in suggestions:
        w.writerow(
            [s.rank, s.score.case, f"{s.score.score:.6g}", s.score.strategy, f"{s.adjusted_score:.6g}", s.score.image]
        )
    return buf.getvalue()


def plot_suggestions(suggestions: Sequence[Suggestion], *, max_panels: int = 8):
    """A matplotlib figure: per suggestion (up to ``max_panels``) its most uncertain axial plane of the
    preprocessed image in grey with the voxel-wise uncertainty overlaid; ``None`` when no score has a slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in suggestions if s.score.image_slice is not None][:max_panels]
    if not shown:
        return None
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    vmax = max(float(np.max(s.score.uncertainty_slice)) for s in shown) or 1.0
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, shown):
        sc = s.score
        # rows of the array are x: transpose so the plane reads as an axial image (x across, y up)
        ax.imshow(sc.image_slice.T, cmap="gray", origin="lower")
        u = np.ma.masked_less_equal(sc.uncertainty_slice.T, 0.0)
        im = ax.imshow(u, cmap="inferno", alpha=0.6, origin="lower", vmin=0.0, vmax=vmax)
        ax.set_title(f"{s.rank}. {sc.case}\n{sc.strategy} {sc.score:.3g}, z={sc.slice_index}", fontsize=8)
    fig.colorbar(im, ax=list(axes.flat), shrink=0.6, label="uncertainty")
    return fig


def write_label_datalist(
    datalist: str | os.PathLike,
    images: Sequence[str],
    out: str | os.PathLike,
    *,
    key: str = "unlabeled",
    dataset_dir: str | os.PathLike | None = None,
) -> str:
    """The text of a copy of ``datalist`` with the items whose image is in ``images`` moved from ``key`` to
    ``to_label`` (appended after any already there); the input file is only read.

    Relative paths stay valid: when ``dataset_dir`` is not given (paths relative to the datalist's folder) and
    ``out`` lies in another folder, every relative ``image`` / ``label`` path is rewritten relative to ``out``'s
    folder.

    Raises:
        DataError: ``out`` is the datalist itself, or an image is not under ``key``.
    """
    from medssl.data.datalist import PATH_FIELDS

    src, out = Path(datalist), Path(out)
    if out.resolve() == src.resolve():
        raise DataError(out, "refusing to overwrite the input datalist; write the copy to another file")
    raw = json.loads(src.read_text(encoding="utf-8"))
    base = Path(os.path.abspath(dataset_dir if dataset_dir is not None else src.parent))

    def image_of(entry) -> str:
        value = entry if isinstance(entry, str) else entry.get("image")
        return os.path.normpath(base / Path(value).expanduser()) if isinstance(value, str) else ""

    wanted = {os.path.normpath(p) for p in images}
    keep, moved = [], []
    for entry in raw.get(key, []):
        (moved if image_of(entry) in wanted else keep).append(entry)
    missing = wanted - {image_of(e) for e in moved}
    if missing:
        raise DataError(src, f"not under {key!r}: {sorted(missing)}")
    new = dict(raw)
    new[key] = keep
    new[TO_LABEL_KEY] = list(raw.get(TO_LABEL_KEY, [])) + moved
    new_base = Path(os.path.abspath(out.parent))
    if dataset_dir is None and new_base != base:

        def rebase(value):
            if isinstance(value, str) and not os.path.isabs(value):
                return os.path.relpath(base / value, new_base)
            if isinstance(value, list):
                return [rebase(v) for v in value]
            return value

        for k, entries in new.items():
            if isinstance(entries, list) and k not in ("labels",):
                new[k] = [
                    rebase(e)
                    if isinstance(e, str)
                    else {f: rebase(v) if f in PATH_FIELDS else v for f, v in e.items()}
                    if isinstance(e, dict)
                    else e
                    for e in entries
                ]
    return json.dumps(new, indent=2) + "\n"


def suggest(
    model: str | os.PathLike | None,
    datalist: str | os.PathLike,
    out: str | os.PathLike,
    *,
    count: int,
    strategy: str = "entropy",
    teacher: str | os.PathLike | None = None,
    key: str = "unlabeled",
    dataset_dir: str | os.PathLike | None = None,
    diversity: float = 0.5,
    samples: int = 8,
    seed: int = 0,
    write_datalist: str | os.PathLike | None = None,
    cache: bool = True,
    device: str = "auto",
    precision: str = "auto",
    overlap: float = 0.25,
    sw_batch_size: int = 4,
) -> dict[str, Path]:
    """``medssl suggest``: score the volumes under ``key``, choose ``count`` diverse ones, write the outputs.

    Writes, all together once every volume is scored (:func:`medssl.atomic.atomic_write_all`, so a failure
    leaves none of them): ``out/suggestions.csv`` (rank, case, score, strategy, adjusted_score, image),
    ``out/suggestions.png`` (:func:`plot_suggestions`; not for ``random``) and, if asked, ``write_datalist``
    (:func:`write_label_datalist`). Per-volume scores are cached in ``out/.suggest_cache`` (resume).

    Returns:
        ``{"csv": ..., "png": ..., "datalist": ...}`` for the files written.

    Raises:
        ConfigError, CheckpointError, DataError: as :func:`score_volumes` and :func:`select`, plus: the datalist
            lacks ``key`` or it is empty, ``out`` is a file — all before anything is written.
    """
    from medssl.atomic import atomic_write_all
    from medssl.data.datalist import load_datalist

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(out, "output must be a folder, but a file of that name exists")
    if int(count) < 1:
        raise ConfigError("count", f"count must be >= 1, got {count}")
    if write_datalist is not None and Path(write_datalist).resolve() == Path(datalist).resolve():
        raise DataError(write_datalist, "refusing to overwrite the input datalist; write the copy to another file")
    records = load_datalist(datalist, dataset_dir=dataset_dir, keys=[key]).items(key)
    if not records:
        raise DataError(datalist, f"{key!r} holds no volumes to score")
    scores = score_volumes(
        model,
        records,
        strategy,
        teacher=teacher,
        samples=samples,
        seed=seed,
        cache_dir=out / CACHE_DIR if cache else None,
        device=device,
        precision=precision,
        overlap=overlap,
        sw_batch_size=sw_batch_size,
    )
    chosen = select(scores, count, diversity=diversity)
    files: dict[Path, Any] = {}
    paths = {"csv": out / "suggestions.csv"}
    files[paths["csv"]] = _csv_text(chosen).encode()
    fig = plot_suggestions(chosen)
    if fig is not None:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths["png"] = out / "suggestions.png"
        files[paths["png"]] = buf.getvalue()
    if write_datalist is not None:
        text = write_label_datalist(
            datalist, [s.score.image for s in chosen], write_datalist, key=key, dataset_dir=dataset_dir
        )
        paths["datalist"] = Path(write_datalist)
        files[paths["datalist"]] = text.encode()
    atomic_write_all({p: (lambda f, data=data: f.write(data)) for p, data in files.items()})
    for s in chosen:
        logger.debug("%d. %s %.4g (adjusted %.4g)", s.rank, s.score.case, s.score.score, s.adjusted_score)
    return paths
