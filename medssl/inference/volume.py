"""Input volumes and output files of ``medssl infer``: find, read, and write on exactly the input's grid.

Outputs are NIfTI whatever the input format, so that every viewer opens them:

* **NIfTI input**: the output header is a copy of the input header (data type, scaling and intent changed; NIfTI-2
  becomes NIfTI-1 when the shape allows), so
  the qform, the sform and their codes are the input's and every reader (nibabel, SimpleITK, viewers that prefer
  the qform) places the output exactly where it places the input.
* **NRRD / MetaImage input**: the RAS affine from :func:`medssl.data.io.read_image_info` is written as both qform
  and sform with code 1 (scanner), so SimpleITK reads back the input's origin, spacing and direction.

Label maps are ``uint8`` (up to 256 classes; ``int16`` beyond) with intent ``label``. Probability maps are 4D
``(X, Y, Z, C)``: NIfTI-1 has no float16 type, so they are stored as ``int16`` with ``scl_slope = 1/32767``
(readers return floats in ``[0, 1]``; resolution 3e-5, finer than float16 near 1). Every file is written through
:func:`medssl.atomic.atomic_write` (temporary file + rename).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medssl.atomic import atomic_write, atomic_write_text
from medssl.data.io import NIFTI_SUFFIXES, image_suffix, read_image_data, read_image_info
from medssl.errors import DataError

__all__ = [
    "LABEL_SUFFIX",
    "PROBABILITY_SUFFIX",
    "PROBABILITY_SCALE",
    "Volume",
    "case_name",
    "find_inputs",
    "read_volume",
    "write_labels",
    "write_probabilities",
    "write_sidecar",
]

logger = logging.getLogger(__name__)

LABEL_SUFFIX = "_seg.nii.gz"
PROBABILITY_SUFFIX = "_prob.nii.gz"
PROBABILITY_SCALE = 32767  # stored int16 value of probability 1.0
_OUTPUT_SUFFIXES = (LABEL_SUFFIX, PROBABILITY_SUFFIX)


@dataclass
class Volume:
    """One input scan.

    Attributes:
        path: the file.
        data: voxels ``(X, Y, Z)`` in the file's own axis order and type.
        affine: 4×4 voxel-index-to-RAS+-millimetre matrix (nibabel convention).
        header: the NIfTI header (``None`` for NRRD / MetaImage inputs).
    """

    path: Path
    data: np.ndarray
    affine: np.ndarray
    header: Any = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def case_name(path: str | os.PathLike) -> str:
    """File name without its image extension (``"case_01.nii.gz"`` → ``"case_01"``), as ``medssl evaluate`` expects."""
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: -len(suffix)] if suffix else Path(name).stem


def find_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into the list of image files to segment (folders: sorted, non-recursive).

    Files in a folder that are not images, or are medssl outputs (``*_seg.nii.gz``, ``*_prob.nii.gz``), are
    skipped with a log message. A path named explicitly is always kept, so that reading it reports its problem.

    Raises:
        DataError: a path that does not exist, or a folder without images.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files, skipped = [], []
            for child in sorted(path.iterdir()):
                if child.name.startswith(".") or not child.is_file():
                    continue
                if not image_suffix(child) or child.name.endswith(_OUTPUT_SUFFIXES):
                    skipped.append(child.name)
                else:
                    files.append(child)
            if skipped:
                logger.info("%s: skipping %d non-input files: %s", path, len(skipped), ", ".join(skipped[:5]))
            if not files:
                raise DataError(path, "folder holds no images (.nii, .nii.gz, .nrrd, .mha, .mhd)")
            found += files
        elif path.exists() or image_suffix(path):
            found.append(path)
        else:
            raise DataError(path, "input does not exist")
    return found


def _itk_affine(path: Path) -> np.ndarray | None:
    """The affine SimpleITK reads from a NIfTI header (RAS+), or ``None`` when it cannot read it."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    dim = reader.GetDimension()
    if dim < 3:
        return None
    direction = np.asarray(reader.GetDirection()).reshape(dim, dim)[:3, :3]
    flip = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = flip @ direction @ np.diag(reader.GetSpacing()[:3])
    affine[:3, 3] = flip @ np.asarray(reader.GetOrigin()[:3])
    return affine


def read_volume(path: str | os.PathLike) -> Volume:
    """Read one 3D scan with its geometry.

    For NIfTI the affine is nibabel's (sform when its code is set, else qform); when SimpleITK reads a
    different geometry from the same header (qform and sform disagree), a warning names both, since viewers
    differ in which one they trust. The output copies the header, so it agrees with the input either way.

    Raises:
        DataError: missing, unreadable, corrupt, not 3D (2D or 4D), or empty inputs.
    """
    path = Path(path)
    info = read_image_info(path)
    if min(info.shape) < 1:
        raise DataError(path, f"image is empty (shape {info.shape})")
    data = read_image_data(path)
    header = None
    if image_suffix(path) in NIFTI_SUFFIXES:
        import nibabel as nib

        header = nib.load(str(path)).header.copy()
        itk = _itk_affine(path)
        if itk is not None and not np.allclose(itk, info.affine, atol=1e-3):
            logger.warning(
                "%s: nibabel and SimpleITK read different geometry from this header (qform vs sform): "
                "model input uses nibabel's %s; the output copies the header",
                path,
                np.round(info.affine, 3).tolist(),
            )
    return Volume(path=path, data=data, affine=np.asarray(info.affine, dtype=np.float64), header=header)


def _nifti(volume: Volume, array: np.ndarray, *, intent: str, slope: float = 1.0, description: str = ""):
    """A NIfTI image of ``array`` on ``volume``'s grid (header copied from a NIfTI input)."""
    import nibabel as nib

    if volume.header is not None:
        header = volume.header.copy()
        klass = nib.Nifti1Image
        if isinstance(header, nib.Nifti2Header):
            if max(array.shape) <= np.iinfo(np.int16).max:  # NIfTI-1 opens in more tools (ITK reads no NIfTI-2)
                header = nib.Nifti1Header.from_header(header, check=False)
                header["sizeof_hdr"], header["magic"] = 348, b"n+1"  # NIfTI-2 values copied by name
            else:
                klass = nib.Nifti2Image
        header.set_data_dtype(array.dtype)
        header.set_data_shape(array.shape)
        img = klass(array, None, header=header)  # affine None: qform / sform and codes stay the input's
    else:
        img = nib.Nifti1Image(array, volume.affine)
        img.header.set_qform(volume.affine, code=1)
        img.header.set_sform(volume.affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
    header = img.header
    header.set_slope_inter(slope, 0.0)
    header.set_intent(intent, ())
    header["cal_min"], header["cal_max"] = (0, 1) if intent != "label" else (0, int(array.max(initial=0)))
    header["descrip"] = description.encode()[:79]
    return img


def _write_nifti_gz(path: Path, img) -> Path:
    import nibabel as nib

    def write(f):
        # stream through gzip: never hold the compressed and uncompressed copies at once
        with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=6, mtime=0) as gz:
            img.to_file_map({"image": nib.FileHolder(fileobj=gz), "header": nib.FileHolder(fileobj=gz)})

    return atomic_write(path, write)


def write_labels(path: str | os.PathLike, labels: np.ndarray, volume: Volume) -> Path:
    """Write an integer label map ``(X, Y, Z)`` on ``volume``'s grid to ``path`` (``.nii.gz``)."""
    if labels.shape != volume.data.shape[:3]:
        raise ValueError(f"labels shape {labels.shape} differs from the input shape {volume.data.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    return _write_nifti_gz(Path(path), _nifti(volume, labels, intent="label", description="medssl labels"))


def write_probabilities(path: str | os.PathLike, probabilities: np.ndarray, volume: Volume) -> Path:
    """Write probabilities ``(X, Y, Z, C)`` in ``[0, 1]`` as int16 with ``scl_slope = 1/32767`` (see module doc)."""
    if probabilities.shape[:3] != volume.data.shape[:3] or probabilities.ndim != 4:
        raise ValueError(f"probabilities shape {probabilities.shape} is not (*{volume.data.shape[:3]}, C)")
    if probabilities.dtype != np.int16:
        probabilities = np.rint(np.clip(probabilities, 0, 1) * PROBABILITY_SCALE).astype(np.int16)
    img = _nifti(volume, probabilities, intent="none", slope=1.0 / PROBABILITY_SCALE, description="medssl probs")
    return _write_nifti_gz(Path(path), img)


def write_sidecar(path: str | os.PathLike, labels: Mapping[str, str], **info: Any) -> Path:
    """Write the JSON sidecar: ``{"labels": {index: name}, **info}``."""
    return atomic_write_text(path, json.dumps({"labels": dict(labels), **info}, indent=2, default=str) + "\n")
