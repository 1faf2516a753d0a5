"""``medssl.inference.Predictor``: segment scans with a self-describing checkpoint, on exactly the input grid.

Pipeline per volume (all settings except the run options come from the checkpoint, so inference matches
training):

1. read the scan (:func:`medssl.inference.volume.read_volume`) and estimate the peak memory; stop with a
   :class:`~medssl.errors.DataError` stating the estimate when it does not fit;
2. the checkpoint's preprocessing chain (:func:`medssl.transforms.presets.preprocessing_from_summary`) without
   the training-time foreground crop, so the prediction covers the whole field of view;
3. :func:`medssl.inference.window.sliding_window_segment` in the precision ``auto`` picks (a bf16 network on
   a CPU with fast native bf16, fp32 on others; bf16 or AMP on CUDA): logits
   are blended slab by slab and argmax-ed as slabs complete;
4. labels back to the input grid through the separable voxel map (:mod:`medssl.inference.grid`): nearest
   neighbour, then, on label boundaries only, the argmax of linearly interpolated float16 probabilities;
   optional per-class largest connected component;
5. atomic writes of ``<name>_seg.nii.gz`` (+ ``<name>_seg.json`` sidecar, + ``<name>_prob.nii.gz``).

Inverting labels instead of probabilities (the MONAI tutorial recipe: ``Invertd`` on the C-channel softmax,
then argmax) avoids a full-resolution float32 ``C × X × Y × Z`` map; the two agree except on voxels near label
boundaries, which ``bench/inference.py`` measures.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ErrorList,
    MedsslError,
    ResourceError,
    attempted_allocation,
    is_out_of_memory,
)
from medssl.inference.grid import (
    axis_map,
    labels_to_input_grid,
    model_grid_shape,
    probabilities_to_input_grid,
    refine_boundaries,
)
from medssl.inference.volume import (
    LABEL_SUFFIX,
    PROBABILITY_SUFFIX,
    Volume,
    case_name,
    find_inputs,
    read_volume,
    write_labels,
    write_probabilities,
    write_sidecar,
)
from medssl.inference.window import count_windows, sliding_window_segment
from medssl.progress import Progress, progress_enabled, stderr_is_terminal

__all__ = ["Prediction", "InferenceReport", "Predictor", "infer", "largest_components", "available_memory"]

logger = logging.getLogger(__name__)

MODES = ("gaussian", "constant")
INTERPOLATIONS = ("linear", "nearest")


@dataclass
class Prediction:
    """Result of :meth:`Predictor.predict_volume`.

    Attributes:
        labels: ``(X, Y, Z)`` integer labels on the input grid.
        probabilities: ``(X, Y, Z, C)`` int16 (probability × 32767) on the input grid, or ``None``.
        seconds: wall time of preprocessing, network and inversion.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None
    seconds: float


@dataclass
class InferenceReport:
    """What :meth:`Predictor.predict_paths` wrote and what failed."""

    written: dict[str, list[Path]] = field(default_factory=dict)
    failures: list[MedsslError] = field(default_factory=list)

    def summary(self) -> str:
        total = len(self.written) + len(self.failures)
        text = f"{len(self.written)} of {total} volumes segmented"
        return text + (f"; {len(self.failures)} failed" if self.failures else "")


def available_memory() -> int | None:
    """Bytes the kernel reports as available (``MemAvailable``), or ``None`` off Linux."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def largest_components(labels: np.ndarray, classes: Iterable[int] | None = None) -> np.ndarray:
    """Keep, for every foreground class, only its largest 26-connected component (the rest becomes 0), in place."""
    from scipy import ndimage

    present = np.unique(labels) if classes is None else np.asarray(list(classes))
    structure = np.ones((3, 3, 3), dtype=bool)
    for c in present:
        if c == 0:
            continue
        mask = labels == c
        comp, n = ndimage.label(mask, structure=structure)
        if n > 1:
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            labels[mask & (comp != int(np.argmax(sizes)))] = 0
    return labels


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class Predictor:
    """Segment 3D scans with a medssl checkpoint; predictions land on exactly the input grid.

    Args:
        model: path of a ``model.pt`` (or the loaded checkpoint dict). Its ``network``, ``state_dict``,
            ``preprocessing`` (with ``roi_size``) and ``labels`` are used.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        precision: ``"auto"`` (default: :func:`medssl.precision.resolve_precision` picks one of the others for
            this hardware), ``"bf16"`` (on CPU the network is cast to bfloat16 in channels-last memory; on CUDA
            bf16 autocast), ``"amp"`` (fp16 autocast on CUDA, fp32 on CPU) or ``"fp32"``. The resolved value
            is kept in ``self.precision`` and written to each sidecar.
        overlap: sliding-window overlap in ``[0, 1)``.
        sw_batch_size: windows per network call.
        mode: window blending, ``"gaussian"`` or ``"constant"``.
        probabilities: also write ``<name>_prob.nii.gz`` (see :mod:`medssl.inference.volume`).
        largest_component: keep the largest connected component of each class.
        interpolation: how labels return to the input grid. ``"linear"`` (default): the argmax of linearly
            interpolated probabilities, as MONAI's ``Invertd`` recipe gives, computed only on label boundaries
            (:func:`~medssl.inference.grid.refine_boundaries`; keeps a float16 ``C``-channel map on the model
            grid). ``"nearest"``: nearest-neighbour labels only (least memory; boundaries may shift by half a
            model voxel).
        progress: report "volume k/N" with ETA and, on a terminal, a bar of windows per volume, when progress
            is enabled (:func:`medssl.progress.progress_enabled`: the CLI's terminal / ``--verbose`` rule).
        memory_limit: bytes the estimate must fit in (default: the available memory reported by the OS).
        compile: run the network's forward through ``torch.compile`` (``False`` by default; ``True``, or
            ``"auto"``: :func:`medssl.compile.resolve_compile`). The first windows then include the compile time;
            ``compile_cache_dir`` holds inductor's cache (default: inductor's own, or ``$TORCHINDUCTOR_CACHE_DIR``).
        compile_cache_dir: a folder for the compile cache (``torch_compile_cache`` is made inside it).

    Raises:
        CheckpointError: the checkpoint cannot be read, its network config is refused (not an allowed class
            with literal arguments: :func:`medssl.checkpoint.check_network_config`, checked before anything is
            built), it is not a segmentation model, or lacks preprocessing or roi size.
        ConfigError: invalid device, precision, overlap, batch size, mode or compile (or ``compile`` on a CPU
            without a C++ compiler).
        ResourceError: out of memory while building the network or moving it to ``device``.

    Example::

        predictor = Predictor("runs/btcv/model.pt")  # precision auto
        report = predictor.predict_paths(["scans/"], "runs/infer")
    """

    def __init__(
        self,
        model: str | os.PathLike | Mapping[str, Any],
        *,
        device: str | torch.device = "auto",
        precision: str = "auto",
        overlap: float = 0.25,
        sw_batch_size: int = 4,
        mode: str = "gaussian",
        probabilities: bool = False,
        largest_component: bool = False,
        interpolation: str = "linear",
        progress: bool = True,
        memory_limit: int | None = None,
        compile: bool | str = False,
        compile_cache_dir: str | os.PathLike | None = None,
    ):
        from medssl.checkpoint import build_network, check_network_config, load_checkpoint, out_of_memory_building
        from medssl.precision import PRECISIONS, resolve_device, resolve_precision

        if precision not in PRECISIONS:
            raise ConfigError("precision", f"unknown precision {precision!r} (use one of {', '.join(PRECISIONS)})")
        if not 0.0 <= float(overlap) < 1.0:
            raise ConfigError("overlap", f"overlap must be in [0, 1), got {overlap}")
        if int(sw_batch_size) < 1:
            raise ConfigError("sw_batch_size", f"sw_batch_size must be >= 1, got {sw_batch_size}")
        if interpolation not in INTERPOLATIONS:
            raise ConfigError("interpolation", f"unknown interpolation {interpolation!r} (use linear or nearest)")
        if mode not in MODES:
            raise ConfigError("mode", f"unknown blending mode {mode!r} (use gaussian or constant)")
        self.model_path = None if isinstance(model, Mapping) else Path(model)
        ckpt = dict(model) if isinstance(model, Mapping) else load_checkpoint(model)
        where = self.model_path
        target, _ = check_network_config(ckpt.get("network"), where)  # before any of it is read
        pre = dict(ckpt.get("preprocessing") or {})
        if not pre.get("intensity"):
            raise CheckpointError(where, "checkpoint has no 'preprocessing' summary; cannot preprocess like training")
        roi = pre.get("roi_size") or ckpt["network"].get("img_size")
        if roi is None:
            raise CheckpointError(where, "checkpoint gives no roi_size (preprocessing.roi_size or network img_size)")
        roi = [int(roi)] * 3 if isinstance(roi, (int, float)) else [int(r) for r in roi]
        if len(roi) != 3:
            raise CheckpointError(where, f"roi_size must have 3 values, got {roi}")
        self.preprocessing = pre
        self.roi_size = tuple(roi)
        self.labels = {str(k): str(v) for k, v in (ckpt.get("labels") or {}).items()}
        out_channels = ckpt["network"].get("out_channels")
        if out_channels is None and not self.labels:
            raise CheckpointError(
                where, f"not a segmentation checkpoint (stage {ckpt.get('stage')!r}: no labels, no out_channels)"
            )
        self.num_classes = int(out_channels) if out_channels is not None else len(self.labels)
        if not self.labels:
            self.labels = {str(i): f"class_{i}" for i in range(self.num_classes)}
        self.stage = ckpt.get("stage")
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device, training=False)
        self.overlap = float(overlap)
        self.sw_batch_size = int(sw_batch_size)
        self.mode = mode
        self.probabilities = bool(probabilities)
        self.largest_component = bool(largest_component)
        self.interpolation = interpolation
        self.progress = bool(progress)
        self.memory_limit = memory_limit
        network = build_network(ckpt, where=where)
        oom = None
        try:
            self.network = network.to(self.device).eval()
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            n_values = sum(int(t.numel()) for t in network.parameters())
            oom = out_of_memory_building(where, target, n_values, e, device=str(self.device))
        if oom is not None:  # raised here, so the failed allocation's frames are freed
            del network
            raise oom
        self._bf16_network = self.device.type == "cpu" and self.precision == "bf16"
        if self._bf16_network:
            # CPU autocast re-casts activations around every norm layer (copies took ~40% of UNETR's time); a bf16
            # network in channels-last memory runs oneDNN's bf16 kernels end to end.
            self.network = self.network.to(dtype=torch.bfloat16, memory_format=torch.channels_last_3d)
        from medssl.compile import compile_network

        self.network = compile_network(
            self.network, compile, self.device, compile_cache_dir, precision=self.precision, training=False
        )
        self._transform = self._build_transform()

    # ------------------------------------------------------------------------------------------ pieces

    def _build_transform(self):
        from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

        from medssl.transforms.presets import preprocessing_from_summary

        try:
            chain = preprocessing_from_summary(self.preprocessing, keys=("image",), crop_foreground=False)
        except ValueError as e:
            raise CheckpointError(self.model_path, f"invalid preprocessing summary: {e}") from e
        # the volume is read by medssl (one-line errors, NRRD LPS→RAS), not by LoadImaged
        return Compose([t for t in chain if not isinstance(t, (LoadImaged, EnsureChannelFirstd))])

    def estimate_memory(self, volume_shape, affine) -> dict[str, int]:
        """Estimated bytes of the large arrays for one volume of ``volume_shape`` with ``affine``, by item.

        Network weights and activations (a few windows) are not included.
        """
        n_in = int(np.prod(volume_shape))
        shape_m = model_grid_shape(
            volume_shape, affine, self.preprocessing.get("spacing"), self.preprocessing.get("orientation")
        )
        shape_m = tuple(max(s, r) for s, r in zip(shape_m, self.roi_size))
        n_m = int(np.prod(shape_m))
        c = self.num_classes
        parts = {
            "input": n_in * (4 + 4),  # file data + float32 copy
            "model-grid image": 2 * n_m * 4,  # resampling source and result
            "slab buffers": (c + 1) * shape_m[0] * shape_m[1] * 3 * self.roi_size[2] * 4,
            "labels": n_m + 2 * n_in,
        }
        if self.probabilities or self.interpolation == "linear":
            parts["model-grid probabilities (float16)"] = c * n_m * 2
        if self.interpolation == "linear":
            parts["boundary refinement"] = 2 * n_in + (1 << 17) * (c + 8) * 4
        if self.probabilities:
            parts["probability output"] = c * n_in * 2 + 3 * n_in * 4
        return parts

    def _out_of_memory_running(self, volume: Volume, error: BaseException, n_windows: int) -> ResourceError:
        roi = "x".join(map(str, self.roi_size))
        per_call = min(self.sw_batch_size, n_windows)
        size = f"{per_call} window{'s' * (per_call != 1)} of {roi} voxels per call, {self.precision} on {self.device}"
        attempted = attempted_allocation(error)
        if attempted:
            size += f"; tried to allocate {attempted}"
        advice = []
        if per_call > 1:
            advice.append("lower --sw-batch-size")
        if self.precision == "fp32":
            advice.append("use --precision bf16 (CPU) / amp (CUDA)")
        if self.device.type != "cpu":
            advice.append("use --device cpu")
        advice = ", or ".join(advice) if advice else "use a machine with more memory"
        return ResourceError(
            volume.path,
            f"out of memory while running the network ({size}); {advice} (the window is the checkpoint's roi_size)",
        )

    def _check_memory(self, volume: Volume) -> None:
        parts = self.estimate_memory(volume.data.shape[:3], volume.affine)
        total = sum(parts.values())
        limit = self.memory_limit if self.memory_limit is not None else available_memory()
        if self.memory_limit is None and limit is not None:
            limit += volume.data.nbytes  # already read: part of the estimate, no longer of the free memory
        if limit is not None and total > limit:
            detail = ", ".join(f"{k} {_gib(v)}" for k, v in parts.items())
            raise DataError(
                volume.path,
                f"needs an estimated {_gib(total)} ({detail}) but only {_gib(limit)} is available; "
                "use a machine with more memory, or --interpolation nearest and no --probabilities",
            )

    def _preprocess(self, volume: Volume) -> tuple[torch.Tensor, np.ndarray]:
        from monai.data import MetaTensor

        data = np.asarray(volume.data, dtype=np.float32)
        finite = np.isfinite(data)
        if not finite.all():
            # before preprocessing: intensity clipping turns +/-inf into in-range values
            raise DataError(volume.path, f"{int(finite.size - finite.sum())} voxels are NaN or infinite")
        image = MetaTensor(
            torch.from_numpy(data[None]),
            affine=torch.as_tensor(volume.affine, dtype=torch.float64),
        )
        out = self._transform({"image": image})["image"]
        affine = np.asarray(out.affine, dtype=np.float64)
        tensor = out.as_tensor()
        if not bool(torch.isfinite(tensor).all()):
            raise DataError(volume.path, "image contains NaN or infinite values")
        return tensor, affine

    # ------------------------------------------------------------------------------------------ public

    def _segment_model_grid(
        self, image: torch.Tensor, volume: Volume, network: torch.nn.Module, probabilities: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sliding window on a preprocessed ``image``; an allocation failure becomes a :class:`ResourceError`."""
        from tqdm import tqdm

        from medssl.precision import autocast

        n_windows = count_windows(image.shape[1:], self.roi_size, self.overlap)
        oom = None
        show = self.progress and progress_enabled() and stderr_is_terminal()  # a bar only where one is watched
        with tqdm(total=n_windows, desc=volume.path.name, unit="win", disable=not show, leave=False) as bar:
            try:
                return sliding_window_segment(
                    image,
                    network,
                    self.roi_size,
                    sw_batch_size=self.sw_batch_size,
                    overlap=self.overlap,
                    mode=self.mode,
                    device=self.device,
                    autocast=contextlib.nullcontext() if self._bf16_network else autocast(self.device, self.precision),
                    input_dtype=torch.bfloat16 if self._bf16_network else torch.float32,
                    channels_last=self._bf16_network,
                    probabilities=probabilities,
                    progress=bar.update,
                )
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                oom = self._out_of_memory_running(volume, e, n_windows)
        # raised outside the handler: the failed call's activations are freed first
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        raise oom

    def prepare_network(self, network: torch.nn.Module) -> torch.nn.Module:
        """Another network of this checkpoint's architecture (e.g. a Mean Teacher's EMA teacher) on this
        predictor's device and precision, in eval mode, so :meth:`model_grid_probabilities` can run it."""
        network = network.to(self.device).eval()
        if self._bf16_network:
            network = network.to(dtype=torch.bfloat16, memory_format=torch.channels_last_3d)
        return network

    def preprocess(self, volume: Volume) -> torch.Tensor:
        """``volume`` after the checkpoint's preprocessing: ``(in_channels, X, Y, Z)`` on the model grid.

        Raises:
            DataError: the volume does not fit in memory (estimate), or has NaN / infinite voxels.
        """
        self._check_memory(volume)
        return self._preprocess(volume)[0]

    def model_grid_probabilities(self, image: torch.Tensor, volume: Volume, network: torch.nn.Module | None = None):
        """Softmax probabilities ``(C, X, Y, Z)`` (float16, CPU) of a :meth:`preprocess`-ed ``image`` on the model
        grid, through the same memory-bounded sliding window as :meth:`predict_volume`.

        Args:
            image: the output of :meth:`preprocess` for ``volume``.
            volume: the read volume (for messages).
            network: the network to run (default: the checkpoint's); dropout layers in train mode stay so, which
                is how Monte-Carlo dropout samples (see :mod:`medssl.suggest`).

        Raises:
            ResourceError: out of memory while running the network.
        """
        _, probs = self._segment_model_grid(image, volume, self.network if network is None else network, True)
        return probs

    def predict_volume(self, volume: Volume) -> Prediction:
        """Segment one read volume; labels (and probabilities) on ``volume``'s grid."""
        start = time.perf_counter()
        self._check_memory(volume)
        image, model_affine = self._preprocess(volume)
        amap = axis_map(model_affine, volume.affine)
        labels_m, probs_m = self._segment_model_grid(
            image, volume, self.network, self.probabilities or self.interpolation == "linear"
        )
        del image
        shape = volume.data.shape[:3]
        labels = labels_to_input_grid(labels_m.numpy(), amap, shape)
        if self.interpolation == "linear":
            n = refine_boundaries(labels, labels_m.numpy(), probs_m.numpy(), amap)
            logger.debug("%s: %d boundary voxels interpolated", volume.path, n)
        if self.largest_component:
            largest_components(labels)
        probs = None
        if self.probabilities:
            probs = probabilities_to_input_grid(probs_m.numpy(), amap, shape)
        return Prediction(labels=labels, probabilities=probs, seconds=time.perf_counter() - start)

    def output_paths(self, path: str | os.PathLike, output_dir: str | os.PathLike) -> dict[str, Path]:
        """Where the outputs of input ``path`` go: ``labels``, ``sidecar`` and (if asked) ``probabilities``."""
        name, out = case_name(path), Path(output_dir)
        paths = {"labels": out / f"{name}{LABEL_SUFFIX}", "sidecar": out / f"{name}{LABEL_SUFFIX[:-7]}.json"}
        if self.probabilities:
            paths["probabilities"] = out / f"{name}{PROBABILITY_SUFFIX}"
        return paths

    def predict_file(
        self, path: str | os.PathLike, output_dir: str | os.PathLike, *, protected: Iterable[Path] = ()
    ) -> list[Path]:
        """Segment one file and write its outputs atomically; returns the written paths.

        Args:
            protected: resolved paths never to overwrite (the inputs); ``path`` itself is always protected.

        Raises:
            DataError: unreadable / not 3D / empty input, too large for memory, or an output that would
                overwrite an input.
            ResourceError: out of memory while running the network (the message gives the windows per call
                and the options that lower it).
        """
        path = Path(path)
        outputs = self.output_paths(path, output_dir)
        guarded = {Path(p).resolve() for p in protected} | {path.resolve()}
        for out in outputs.values():
            if out.resolve() in guarded:
                raise DataError(out, "refusing to overwrite an input; choose another output folder")
        volume = read_volume(path)
        pred = self.predict_volume(volume)
        written: list[Path] = []
        try:
            if pred.probabilities is not None:
                written.append(write_probabilities(outputs["probabilities"], pred.probabilities, volume))
            written.append(
                write_sidecar(
                    outputs["sidecar"],
                    self.labels,
                    source=str(path),
                    model=str(self.model_path) if self.model_path else None,
                    stage=self.stage,
                    precision=self.precision,
                    overlap=self.overlap,
                    mode=self.mode,
                    largest_component=self.largest_component,
                    interpolation=self.interpolation,
                    probabilities=outputs["probabilities"].name if "probabilities" in outputs else None,
                )
            )
            written.append(write_labels(outputs["labels"], pred.labels, volume))
        except BaseException:
            for p in written:  # all outputs of a case or none
                p.unlink(missing_ok=True)
            raise
        logger.info("%s: segmented in %.1f s -> %s", path, pred.seconds, outputs["labels"])
        return [outputs["labels"], *[p for p in written if p != outputs["labels"]]]

    def predict_paths(
        self,
        inputs: str | os.PathLike | Iterable[str | os.PathLike],
        output_dir: str | os.PathLike,
        *,
        raise_on_error: bool = True,
        on_error: Callable[[MedsslError], None] | None = None,
    ) -> InferenceReport:
        """Segment files and folders of files; a failing volume does not stop the others.

        Args:
            inputs: image files and/or folders of images.
            output_dir: folder of the outputs.
            raise_on_error: raise :class:`ErrorList` at the end when a volume failed (otherwise the failures are
                in the returned report only).
            on_error: called with each volume's error as soon as it fails (e.g. the CLI prints its one-line
                message there); default: a logged warning.

        Raises:
            DataError: before any work: ``output_dir`` is a file, an input path does not exist, a folder has no
                images.
            ErrorList: after all volumes were tried, one line per failed volume and a summary line (when
                ``raise_on_error``).
        """
        if Path(output_dir).exists() and not Path(output_dir).is_dir():
            raise DataError(output_dir, "output must be a folder, but a file of that name exists")
        files = find_inputs(inputs)
        protected = [p.resolve() for p in files]
        report, seen = InferenceReport(), {}
        # a volume's progress line comes before its error line, so errors stay the last lines on stderr
        with Progress(len(files), "infer", unit="volume", enabled=self.progress) as progress:
            for path in files:
                name = case_name(path)
                try:
                    if name in seen:
                        raise DataError(path, f"same case name '{name}' as {seen[name]}; its outputs would collide")
                    seen[name] = path
                    report.written[str(path)] = self.predict_file(path, output_dir, protected=protected)
                    progress.advance(path.name)
                except MedsslError as e:
                    progress.advance(f"{path.name} failed")
                    if on_error is None:
                        logger.warning("%s (continuing with the next volume)", e)
                    else:
                        on_error(e)
                    report.failures.append(e)
        # the summary reaches the caller (return value or ErrorList), not the log: nothing follows the errors
        if report.failures and raise_on_error:
            raise ErrorList(report.failures + [DataError(None, report.summary())])
        return report


def infer(
    model: str | os.PathLike,
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    device: str = "auto",
    precision: str = "auto",
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    mode: str = "gaussian",
    probabilities: bool = False,
    largest_component: bool = False,
    interpolation: str = "linear",
    progress: bool = True,
    raise_on_error: bool = True,
    on_error: Callable[[MedsslError], None] | None = None,
) -> InferenceReport:
    """``medssl infer``: :class:`Predictor` on files / folders.

    Every volume is tried; a failed one leaves no output. ``raise_on_error`` and ``on_error`` as in
    :meth:`Predictor.predict_paths`.

    Raises:
        ErrorList: when ``raise_on_error`` and any volume failed: one line per failed volume and a summary line.
    """
    predictor = Predictor(
        model,
        device=device,
        precision=precision,
        overlap=overlap,
        sw_batch_size=sw_batch_size,
        mode=mode,
        probabilities=probabilities,
        largest_component=largest_component,
        interpolation=interpolation,
        progress=progress,
    )
    return predictor.predict_paths(inputs, output_dir, raise_on_error=raise_on_error, on_error=on_error)
