"""``medssl suggest``: which unlabeled volumes to annotate next (active learning).

Every volume under a datalist key (``unlabeled`` by default) is segmented on the model grid through the
:class:`~medssl.inference.Predictor`'s sliding window (its memory bound, precision and the checkpoint's
preprocessing) and scored by one strategy; higher means "label this one first":

* ``entropy``: mean normalised predictive entropy ``H(p) / log C`` of the softmax over the *foreground-probable
  region*, the voxels with ``1 - p(background) >= foreground_threshold`` (0.1). The whole-volume mean would be
  dominated by confidently-background air and table, so a scan with a larger field of view would look more
  certain; a volume with no foreground-probable voxel scores 0.
* ``mc_dropout``: ``samples`` stochastic passes with the dropout layers in train mode (everything else, e.g.
  BatchNorm, in eval mode); the score is the mean mutual information ``H(mean_t p_t) - mean_t H(p_t)`` (BALD,
  Houlsby et al. 2011, normalised by ``log C``) over the foreground-probable region of the mean softmax: the part
  of the uncertainty that more labels can remove. A network without active dropout is refused. It holds a
  float32 ``C``-channel sum on the model grid beside the Predictor's float16 map (not in its memory estimate).
* ``teacher_student``: mean ``KL(p_teacher || p_student)`` (nats) over the union of both foreground-probable
  regions, the student being ``--model`` and the teacher a Mean Teacher's EMA network. KL rather than
  ``1 - Dice`` of the two argmaxes: it is continuous, so volumes whose labels agree but whose confidence differs
  still rank, and it needs no class to be present; the teacher is the reference because it is the target the
  student was trained towards.
* ``random``: a seeded uniform draw per volume, the control; no network runs.

Diversity (:func:`select`): greedy selection of ``diversity-adjusted score = score / max score - diversity *
max similarity to the volumes already chosen``. The similarity is computed from a descriptor of the
*prediction*, not from encoder features (medssl's networks have no common encoder interface): the softmax
average-pooled to a ``4 × 4 × 4`` grid per class (class volumes and their coarse layout), compared by an RBF kernel
``exp(-d² / median d²)`` so that identical volumes have similarity 1 and a typical pair ``exp(-1)``. ``random``
uses no descriptor: the control stays a pure random draw.

Scores are cached per volume in ``out/.suggest_cache`` keyed by the model (and teacher) file hash, the strategy
and its settings and the image file's path, size and time, so an interrupted run resumes where it stopped.

Example::

    scores = score_volumes("runs/mt/model_student.pt", records, "teacher_student", teacher="runs/mt/last.pt")
    chosen = select(scores, count=4, diversity=0.5)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medssl.errors import CheckpointError, ConfigError, DataError

__all__ = [
    "STRATEGIES",
    "FOREGROUND_THRESHOLD",
    "Score",
    "Suggestion",
    "active_dropout",
    "load_teacher_state",
    "normalised_entropy",
    "score_volumes",
    "select",
    "similarity_matrix",
    "write_label_datalist",
    "plot_suggestions",
    "suggest",
]

logger = logging.getLogger(__name__)

STRATEGIES = ("entropy", "mc_dropout", "teacher_student", "random")
FOREGROUND_THRESHOLD = 0.1
TO_LABEL_KEY = "to_label"
CACHE_DIR = ".suggest_cache"
_CACHE_VERSION = "1"
_POOL = 4  # descriptor grid per axis
_EPS = 1e-6
_SLAB = 16  # planes per chunk of the voxel-wise maps (bounds the float32 copies)


@dataclass
class Score:
    """One volume's score.

    Attributes:
        case: case name (the image file name without extension).
        image: absolute image path.
        score: the strategy's score (higher: label first).
        strategy: the strategy's name.
        descriptor: prediction descriptor for diversity (``C * 64`` floats), ``None`` for ``random``.
        slice_index: the most uncertain axial plane (last axis of the model grid), ``None`` for ``random``.
        image_slice: that plane of the preprocessed image, ``(X, Y)``.
        uncertainty_slice: that plane of the voxel-wise uncertainty, ``(X, Y)``.
    """

    case: str
    image: str
    score: float
    strategy: str
    descriptor: np.ndarray | None = None
    slice_index: int | None = None
    image_slice: np.ndarray | None = None
    uncertainty_slice: np.ndarray | None = None


@dataclass
class Suggestion:
    """One chosen volume: ``rank`` (1 = label first), its :class:`Score` and the diversity-adjusted score."""

    rank: int
    score: Score
    adjusted_score: float


# ---------------------------------------------------------------------------------------------- voxel maps


def _slabs(n: int):
    for z in range(0, n, _SLAB):
        yield slice(z, min(z + _SLAB, n))


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """``H(p) / log C`` per voxel in ``[0, 1]``: ``probs`` ``(C, X, Y, Z)`` → float32 ``(X, Y, Z)``."""
    c = int(probs.shape[0])
    out = torch.empty(probs.shape[1:], dtype=torch.float32)
    for zs in _slabs(int(probs.shape[-1])):
        p = probs[..., zs].float().clamp_min(_EPS)
        out[..., zs] = -(p * p.log()).sum(0) / math.log(max(c, 2))
    return out


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    out = torch.empty(teacher.shape[1:], dtype=torch.float32)
    for zs in _slabs(int(teacher.shape[-1])):
        t = teacher[..., zs].float().clamp_min(_EPS)
        s = student[..., zs].float().clamp_min(_EPS)
        out[..., zs] = (t * (t.log() - s.log())).sum(0).clamp_min(0.0)
    return out


def _foreground(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    return (1.0 - probs[0].float()) >= threshold


def _descriptor(probs: torch.Tensor) -> np.ndarray:
    """Softmax average-pooled to ``4 × 4 × 4`` per class, flattened; computed one z bin at a time."""
    z = int(probs.shape[-1])
    edges = np.linspace(0, z, _POOL + 1).round().astype(int)
    parts = []
    for z0, z1 in zip(edges[:-1], edges[1:]):
        z1 = max(z1, z0 + 1)
        slab = probs[..., z0:z1].float()[None]
        parts.append(F.adaptive_avg_pool3d(slab, (_POOL, _POOL, 1))[0, ..., 0])
    return torch.stack(parts, -1).flatten().numpy().astype(np.float32)


def active_dropout(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The dropout layers of ``network`` with a drop probability above 0 (what Monte-Carlo dropout samples)."""
    from medssl.losses.consistency import _DROPOUT

    return [m for m in network.modules() if isinstance(m, _DROPOUT) and float(getattr(m, "p", 0.0)) > 0.0]


# --------------------------------------------------------------------------------------------- the models


def _same_network(a: Mapping[str, Any], b: Mapping[str, Any], where) -> bool:
    from medssl.checkpoint import NETWORKS, check_network_config

    ta, ka = check_network_config(a, where)
    tb, kb = check_network_config(b)
    return NETWORKS[ta] == NETWORKS[tb] and ka == kb


def load_teacher_state(teacher: str | os.PathLike | Mapping[str, Any], model_network: Mapping[str, Any]):
    """The teacher's weights for a student whose network config is ``model_network``.

    Accepts a Mean Teacher ``last.pt`` (its ``teacher`` entry: the EMA state dict, beside the student's network
    config) or a checkpoint of the teacher itself (``model_teacher.pt``, whose BatchNorm statistics were
    re-estimated: prefer it for BatchNorm networks). Either way the network config must match the model's.

    Raises:
        CheckpointError: unreadable, or its network differs from the model's.
    """
    from medssl.checkpoint import load_checkpoint

    where = None if isinstance(teacher, Mapping) else teacher
    ckpt = dict(teacher) if isinstance(teacher, Mapping) else load_checkpoint(teacher)
    if not isinstance(ckpt.get("network"), Mapping) or "state_dict" not in ckpt:
        raise CheckpointError(where, "teacher checkpoint needs 'network' and 'state_dict' (or 'teacher') entries")
    if not _same_network(ckpt["network"], model_network, where):
        raise CheckpointError(
            where,
            f"teacher network {ckpt['network'].get('_target_')} does not match the model's "
            f"{model_network.get('_target_')} (same class and arguments needed)",
        )
    state = ckpt["teacher"] if "teacher" in ckpt else ckpt["state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(where, f"'teacher' is a {type(state).__name__}, not a state dict")
    return state


class _Scorer:
    """A predictor (and teacher) set up for one strategy; :meth:`score` runs one volume."""

    def __init__(self, model, strategy, *, teacher, samples, seed, foreground_threshold, predictor_options):
        from medssl.checkpoint import build_network, load_checkpoint
        from medssl.inference import Predictor

        self.strategy, self.samples, self.seed = strategy, int(samples), int(seed)
        self.threshold = float(foreground_threshold)
        self.predictor = None
        self.teacher = None
        if strategy == "random":
            return
        where = None if isinstance(model, Mapping) else model
        ckpt = dict(model) if isinstance(model, Mapping) else load_checkpoint(model)
        self.predictor = Predictor(ckpt, progress=False, **predictor_options)
        self.predictor.model_path = None if where is None else Path(where)
        if strategy == "mc_dropout" and not active_dropout(self.predictor.network):
            raise CheckpointError(
                where,
                f"mc_dropout needs dropout layers with p > 0, but {ckpt['network']['_target_']} has none "
                "(train it with dropout, e.g. dropout_rate > 0, or use --strategy entropy)",
            )
        if strategy == "teacher_student":
            state = load_teacher_state(teacher, ckpt["network"])
            net = build_network({"network": ckpt["network"], "state_dict": state}, where=_where_of(teacher))
            self.teacher = self.predictor.prepare_network(net)

    def score(self, path: str) -> tuple[float, torch.Tensor, torch.Tensor, np.ndarray, torch.Tensor]:
        """``(score, uncertainty map, region, descriptor, image)`` of one volume on the model grid."""
        from medssl.inference.volume import read_volume

        volume = read_volume(path)
        predictor = self.predictor
        image = predictor.preprocess(volume)
        if self.strategy == "entropy":
            probs = predictor.model_grid_probabilities(image, volume)
            uncertainty, region = normalised_entropy(probs), _foreground(probs, self.threshold)
        elif self.strategy == "mc_dropout":
            probs, uncertainty, region = self._mc_dropout(image, volume)
        else:
            probs = predictor.model_grid_probabilities(image, volume)
            teacher = predictor.model_grid_probabilities(image, volume, self.teacher)
            uncertainty = _kl(teacher, probs)
            region = _foreground(probs, self.threshold) | _foreground(teacher, self.threshold)
        score = float(uncertainty[region].mean()) if bool(region.any()) else 0.0
        return score, uncertainty * region, region, _descriptor(probs), image[0].float()

    def _mc_dropout(self, image, volume):
        from medssl.losses.consistency import dropout_on

        network = self.predictor.network
        devices = [_network_device(network)] if _network_device(network) is not None else []
        total = mean_entropy = None
        # the same seed for every volume: its score does not depend on the order or on resuming
        with torch.random.fork_rng(devices=devices), dropout_on(network):
            torch.manual_seed(self.seed)
            for _ in range(self.samples):
                p = self.predictor.model_grid_probabilities(image, volume)
                h = normalised_entropy(p)
                total = p.float() if total is None else total.add_(p.float())
                mean_entropy = h if mean_entropy is None else mean_entropy.add_(h)
        mean = total.div_(self.samples)
        information = (normalised_entropy(mean) - mean_entropy / self.samples).clamp_min_(0.0)
        return mean, information, _foreground(mean, self.threshold)


def _where_of(source: Any) -> str | None:
    return None if isinstance(source, Mapping) or source is None else str(source)


def _network_device(network: torch.nn.Module) -> int | None:
    param = next(network.parameters(), None)
    if param is None or param.device.type != "cuda":
        return None
    return param.device.index or 0


# ------------------------------------------------------------------------------------------------ scoring


def _cache_key(record_path: str, settings: Mapping[str, Any]) -> str:
    st = os.stat(record_path)
    text = json.dumps({**settings, "image": record_path, "size": st.st_size, "mtime": st.st_mtime_ns}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _read_cache(path: Path, case: str, image: str, strategy: str) -> Score | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return Score(
                case,
                image,
                float(z["score"]),
                strategy,
                z["descriptor"].astype(np.float32),
                int(z["slice_index"]),
                z["image_slice"].astype(np.float32),
                z["uncertainty_slice"].astype(np.float32),
            )
    except (OSError, KeyError, ValueError) as e:  # unreadable entry: recompute it
        logger.warning("%s: ignoring unreadable cache entry (%s)", path, e)
        return None


def _write_cache(path: Path, s: Score) -> None:
    from medssl.atomic import atomic_write

    buf = io.BytesIO()
    np.savez(
        buf,
        score=np.float64(s.score),
        descriptor=s.descriptor,
        slice_index=np.int64(s.slice_index),
        image_slice=s.image_slice.astype(np.float16),
        uncertainty_slice=s.uncertainty_slice.astype(np.float16),
    )
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _eta(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def score_volumes(
    model: str | os.PathLike | Mapping[str, Any] | None,
    records: Sequence[Mapping[str, Any]],
    strategy: str,
    *,
    teacher: str | os.PathLike | Mapping[str, Any] | None = None,
    samples: int = 8,
    seed: int = 0,
    foreground_threshold: float = FOREGROUND_THRESHOLD,
    cache_dir: str | os.PathLike | None = None,
    device: str = "auto",
    precision: str = "auto",
    overlap: float = 0.25,
    sw_batch_size: int = 4,
) -> list[Score]:
    """Score every record's image by ``strategy`` (see the module docstring); one :class:`Score` per record.

    Args:
        model: the checkpoint (path or loaded dict); ``None`` is allowed for ``random`` only.
        records: datalist items with an absolute ``image`` path (e.g. ``load_datalist(...).items("unlabeled")``).
        strategy: one of :data:`STRATEGIES`.
        teacher: ``teacher_student`` only: a Mean Teacher ``last.pt`` or ``model_teacher.pt`` (or its dict)
            whose network matches ``model``'s (:func:`load_teacher_state`).
        samples: ``mc_dropout`` passes (at least 2).
        seed: ``random``'s draw and ``mc_dropout``'s dropout masks.
        foreground_threshold: a voxel is foreground-probable when ``1 - p(background)`` reaches it.
        cache_dir: per-volume cache folder (resume); ``None``: no cache. Used only when ``model`` and
            ``teacher`` are files (their hashes key the entries).
        device, precision, overlap, sw_batch_size: as for :class:`~medssl.inference.Predictor`.

    Raises:
        ConfigError: unknown strategy, ``samples`` < 2, a missing or unexpected teacher, no model.
        CheckpointError: unreadable checkpoint, a teacher of another network, ``mc_dropout`` on a network
            without active dropout.
        DataError: an unreadable volume, one too large for memory.

    Example::

        records = load_datalist("data/ct/datalist.json", keys="unlabeled").items("unlabeled")
        scores = score_volumes("runs/ft/model.pt", records, "entropy")
    """
    from medssl.inference.volume import case_name
    from medssl.study_fingerprint import file_sha256

    if strategy not in STRATEGIES:
        raise ConfigError("strategy", f"unknown strategy {strategy!r} (use one of {', '.join(STRATEGIES)})")
    if strategy == "mc_dropout" and int(samples) < 2:
        raise ConfigError("samples", f"mc_dropout needs at least 2 samples, got {samples}")
    if (teacher is not None) != (strategy == "teacher_student"):
        why = "teacher_student needs a teacher (--teacher)" if teacher is None else f"{strategy} uses no teacher"
        raise ConfigError("teacher", why)
    if model is None and strategy != "random":
        raise ConfigError("model", f"{strategy} needs a model checkpoint")
    if not 0.0 < float(foreground_threshold) <= 1.0:
        raise ConfigError("foreground_threshold", f"must be in (0, 1], got {foreground_threshold}")
    cases = [(case_name(r["image"]), str(r["image"])) for r in records]
    if strategy == "random":
        draws = np.random.default_rng(int(seed)).random(len(cases))
        return [Score(c, p, float(d), strategy) for (c, p), d in zip(cases, draws)]

    scorer = _Scorer(
        model,
        strategy,
        teacher=teacher,
        samples=samples,
        seed=seed,
        foreground_threshold=foreground_threshold,
        predictor_options={
            "device": device,
            "precision": precision,
            "overlap": overlap,
            "sw_batch_size": sw_batch_size,
        },
    )
    settings = None
    files = [m for m in (model, teacher) if m is not None]
    if cache_dir is not None and not any(isinstance(m, Mapping) for m in files):
        p = scorer.predictor
        settings = {
            "version": _CACHE_VERSION,
            "models": [file_sha256(m) for m in files],
            "strategy": strategy,
            "samples": int(samples) if strategy == "mc_dropout" else None,
            "seed": int(seed) if strategy == "mc_dropout" else None,
            "threshold": float(foreground_threshold),
            "window": [p.overlap, p.mode, p.sw_batch_size, p.precision],
        }
    scores: list[Score] = []
    start, computed = time.perf_counter(), 0
    for k, (case, path) in enumerate(cases, 1):
        entry = Path(cache_dir) / f"{case}-{_cache_key(path, settings)}.npz" if settings else None
        cached = _read_cache(entry, case, path, strategy) if entry is not None and entry.is_file() else None
        if cached is not None:
            scores.append(cached)
            logger.info("volume %d of %d: %s score %.4g (cached)", k, len(cases), case, cached.score)
            continue
        value, uncertainty, _, descriptor, image = scorer.score(path)
        z = int(torch.argmax(uncertainty.sum((0, 1))))
        s = Score(case, path, value, strategy, descriptor, z, image[..., z].numpy(), uncertainty[..., z].numpy())
        if entry is not None:
            _write_cache(entry, s)
        scores.append(s)
        computed += 1
        elapsed = time.perf_counter() - start
        left = len(cases) - k
        logger.info(
            "volume %d of %d: %s score %.4g (ETA %s)", k, len(cases), case, value, _eta(elapsed / computed * left)
        )
    return scores


# ---------------------------------------------------------------------------------------------- selection


def similarity_matrix(descriptors: np.ndarray) -> np.ndarray:
    """RBF similarity ``exp(-d² / median d²)`` of ``(N, D)`` descriptors (median over the distinct pairs);
    identical rows have similarity 1."""
    x = np.asarray(descriptors, dtype=np.float64)
    d2 = np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0.0)
    off = d2[~np.eye(len(x), dtype=bool)]
    positive = off[off > 0]
    scale = float(np.median(positive)) if positive.size else 1.0
    return np.exp(-d2 / scale)


def select(scores: Sequence[Score], count: int, *, diversity: float = 0.5) -> list[Suggestion]:
    """Greedy diverse selection of ``count`` volumes (deterministic: ties go to the earlier record).

    Each step takes the volume maximising ``score / max score - diversity * max similarity`` to those already
    chosen (:func:`similarity_matrix` of the descriptors). With ``diversity=0``, or scores without descriptors
    (``random``), it is the plain ranking by score.

    Raises:
        ConfigError: ``count`` < 1 or ``diversity`` < 0.
    """
    if int(count) < 1:
        raise ConfigError("count", f"count must be >= 1, got {count}")
    if float(diversity) < 0:
        raise ConfigError("diversity", f"diversity must be >= 0, got {diversity}")
    n = len(scores)
    values = np.array([s.score for s in scores], dtype=np.float64)
    top = float(np.abs(values).max()) if n else 0.0
    norm = values / top if top > 0 else np.zeros(n)
    use = diversity > 0 and n > 1 and all(s.descriptor is not None for s in scores)
    sim = similarity_matrix(np.stack([s.descriptor for s in scores])) if use else np.zeros((n, n))
    chosen: list[Suggestion] = []
    penalty = np.zeros(n)
    remaining = list(range(n))
    while remaining and len(chosen) < int(count):
        adjusted = norm - diversity * penalty
        best = max(remaining, key=lambda i: (adjusted[i], -i))
        chosen.append(Suggestion(len(chosen) + 1, scores[best], float(adjusted[best])))
        remaining.remove(best)
        penalty = np.maximum(penalty, sim[best])
    return chosen


# ------------------------------------------------------------------------------------------------ outputs


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
