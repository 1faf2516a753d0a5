"""Score volumes by one strategy (:func:`score_volumes`), with a per-volume cache for resuming; see
:mod:`medssl.suggest` for what each strategy measures."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.errors import CheckpointError, ConfigError
from medssl.progress import format_seconds
from medssl.suggest.uncertainty import (
    FOREGROUND_THRESHOLD,
    active_dropout,
    descriptor,
    foreground,
    kl_divergence,
    normalised_entropy,
)

__all__ = ["STRATEGIES", "Score", "load_teacher_state", "score_volumes"]

logger = logging.getLogger(__name__)

STRATEGIES = ("entropy", "mc_dropout", "teacher_student", "random")
_CACHE_VERSION = "1"


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
            uncertainty, region = normalised_entropy(probs), foreground(probs, self.threshold)
        elif self.strategy == "mc_dropout":
            probs, uncertainty, region = self._mc_dropout(image, volume)
        else:
            probs = predictor.model_grid_probabilities(image, volume)
            teacher = predictor.model_grid_probabilities(image, volume, self.teacher)
            uncertainty = kl_divergence(teacher, probs)
            region = foreground(probs, self.threshold) | foreground(teacher, self.threshold)
        score = float(uncertainty[region].mean()) if bool(region.any()) else 0.0
        return score, uncertainty * region, region, descriptor(probs), image[0].float()

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
        return mean, information, foreground(mean, self.threshold)


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
            "volume %d of %d: %s score %.4g (ETA %s)",
            k,
            len(cases),
            case,
            value,
            format_seconds(elapsed / computed * left),
        )
    return scores
