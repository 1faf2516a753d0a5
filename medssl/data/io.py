"""Read 3D medical image files (NIfTI, NRRD, MetaImage) with one clear :class:`DataError` per problem.

Headers are read first and cheaply (:func:`read_image_info`); voxel data only when asked
(:func:`read_image_data`). Both report geometry in the same convention as nibabel: shape in ``(x, y, z)``
order and a 4×4 voxel-to-world affine in RAS+ millimetres, so a NRRD image and a NIfTI label can be compared
directly. SimpleITK works in LPS+, hence the sign flip of the first two world axes.

A trailing singleton 4th dimension (``(x, y, z, 1)``, common in NIfTI files written by some converters) is
accepted and treated as 3D; any other dimensionality is an error.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medssl.errors import DataError

__all__ = ["ImageInfo", "NIFTI_SUFFIXES", "ITK_SUFFIXES", "image_suffix", "read_image_info", "read_image_data"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class ImageInfo:
    """Header facts of one 3D image.

    Attributes:
        path: the file.
        shape: voxels along ``(x, y, z)``; a trailing singleton 4th dimension is dropped.
        affine: 4×4 voxel-index-to-RAS+-millimetre matrix.
        spacing: voxel size in mm along ``(x, y, z)`` (column norms of the affine).
        dtype: on-disk voxel type after scaling (e.g. ``float64`` for a NIfTI with ``scl_slope``).
    """

    path: Path
    shape: tuple[int, int, int]
    affine: np.ndarray
    spacing: tuple[float, float, float]
    dtype: np.dtype


def image_suffix(path: str | os.PathLike) -> str:
    """The recognised suffix of ``path`` (``".nii.gz"``, ``".nrrd"``, ...), or ``""`` when unsupported."""
    name = Path(path).name.lower()
    for suffix in NIFTI_SUFFIXES + ITK_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def _check_file(path: Path) -> str:
    suffix = image_suffix(path)
    if not suffix:
        raise DataError(path, f"unsupported file type (expected one of {', '.join(NIFTI_SUFFIXES + ITK_SUFFIXES)})")
    if not path.is_file():
        raise DataError(path, "file not found")
    size = path.stat().st_size
    if size == 0:
        raise DataError(path, "file is empty (0 bytes)")
    if suffix == ".nii.gz":
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic != b"\x1f\x8b":
            raise DataError(path, f"not gzip-compressed although the name ends in .gz (first bytes {magic!r})")
    return suffix


def _spatial_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        kind = f"{len(shape)}D"
        raise DataError(
            path, f"is {kind} (shape {tuple(shape)}); expected a 3D volume (a trailing singleton 4th dim is accepted)"
        )
    return tuple(int(s) for s in shape)


def _check_spacing(path: Path, spacing: tuple[float, ...]) -> tuple[float, float, float]:
    spacing = tuple(float(s) for s in spacing[:3])
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise DataError(path, f"voxel spacing must be finite and > 0, got {spacing}")
    return spacing


def _itk_affine(direction, spacing, origin) -> np.ndarray:
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(origin, dtype=float)
    return affine


def _one_line(exc: Exception) -> str:
    """The gist of a reader's exception on one line (ITK's last line names the actual problem)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if isinstance(exc, RuntimeError) and lines else " ".join(lines)
    return f"{type(exc).__name__}: {text[:300]}"


def _check_size(path: Path, header, available: int) -> None:
    """Refuse a NIfTI whose header declares more voxel bytes than the file holds, before allocating them."""
    shape = header.get_data_shape()
    needed = int(header.get_data_offset()) + int(np.prod(shape, dtype=np.float64)) * header.get_data_dtype().itemsize
    if needed > available:
        raise DataError(
            path,
            f"header declares {tuple(int(s) for s in shape)} voxels of {header.get_data_dtype()} ({needed} bytes) but "
            f"the {'uncompressed ' if path.name.endswith('.gz') else ''}file holds {available} bytes "
            "(truncated file or corrupt dimensions)",
        )


def _read_error(path: Path, suffix: str, exc: Exception) -> DataError:
    if suffix == ".nii.gz" and isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
        return DataError(path, f"corrupt or truncated gzip stream ({_one_line(exc)})")
    return DataError(path, f"cannot read image (corrupt or truncated file?): {_one_line(exc)}")


def read_image_info(path: str | os.PathLike) -> ImageInfo:
    """Read the header of a 3D image: shape, affine, spacing and dtype, without loading the voxels.

    Args:
        path: a ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd`` file.

    Raises:
        DataError: missing, empty, unsupported, not-gzip-with-.gz-suffix, unparsable, not 3D, or spacing <= 0.
    """
    path = Path(path)
    suffix = _check_file(path)
    if suffix in NIFTI_SUFFIXES:
        import nibabel as nib

        try:
            img = nib.load(str(path))
            shape = tuple(img.shape)
            affine = np.asarray(img.affine, dtype=float)
            dtype = img.get_data_dtype()
            if img.dataobj.slope not in (None, 1.0) or img.dataobj.inter not in (None, 0.0):
                dtype = np.dtype(np.float64)
        except Exception as exc:
            raise _read_error(path, suffix, exc) from exc
        spatial = _spatial_shape(path, shape)
        if int(img.header["sform_code"]) == 0:
            # without an sform the grid comes from pixdim, where nibabel's header check silently turns 0 into 1
            # and -x into x: read the header again unchecked
            with (gzip.open if suffix == ".nii.gz" else open)(path, "rb") as f:
                raw_header = type(img.header).from_fileobj(f, check=False)
            pixdim = tuple(float(p) for p in raw_header["pixdim"][1:4])
            if not all(np.isfinite(p) and p > 0 for p in pixdim):
                raise DataError(path, f"voxel spacing must be finite and > 0, got pixdim {pixdim} (no sform)")
        # The affine is what readers use; nibabel silently replaces zero pixdims in the header by 1.
        spacing = _check_spacing(path, np.linalg.norm(affine[:3, :3], axis=0))
        return ImageInfo(path, spatial, affine, spacing, np.dtype(dtype))

    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _read_error(path, suffix, exc) from exc
    if reader.GetNumberOfComponents() != 1:
        raise DataError(path, f"has {reader.GetNumberOfComponents()} components per voxel; expected a scalar image")
    spatial = _spatial_shape(path, tuple(reader.GetSize()))
    spacing = _check_spacing(path, reader.GetSpacing())
    affine = _itk_affine(
        np.asarray(reader.GetDirection()).reshape(reader.GetDimension(), -1)[:3, :3], spacing, reader.GetOrigin()[:3]
    )
    dtype = np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1] * reader.GetDimension(), reader.GetPixelID())).dtype)
    return ImageInfo(path, spatial, affine, spacing, dtype)


def read_image_data(path: str | os.PathLike) -> np.ndarray:
    """Read the voxels of a 3D image as an array of shape ``(x, y, z)`` (trailing singleton dim dropped).

    Raises:
        DataError: everything :func:`read_image_info` checks, plus truncated or corrupt voxel data.
    """
    path = Path(path)
    info = read_image_info(path)
    suffix = image_suffix(path)
    try:
        if suffix == ".nii.gz":
            import nibabel as nib

            # Reading the stream to its end makes gzip verify the CRC and length; nibabel alone stops after
            # the voxels it needs, so a corrupt stored block would pass as (garbage) data.
            with gzip.open(path, "rb") as f:
                raw = f.read()
            klass = nib.Nifti2Image if raw[:4] in (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c") else nib.Nifti1Image
            _check_size(path, klass.header_class.from_fileobj(io.BytesIO(raw)), len(raw))
            data = np.asanyarray(klass.from_bytes(raw).dataobj)
        elif suffix == ".nii":
            import nibabel as nib

            _check_size(path, nib.load(str(path)).header, path.stat().st_size)
            data = np.asanyarray(nib.load(str(path)).dataobj)
        else:
            import SimpleITK as sitk

            # SimpleITK arrays are (z, y, x); transpose to the nibabel (x, y, z) convention.
            data = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).T
    except DataError:
        raise
    except Exception as exc:
        raise _read_error(path, suffix, exc) from exc
    return data.reshape(info.shape)
