"""What both phantoms share: warped anatomy coordinates, a tissue/label canvas, rendering, checks and writers.

Arrays are ``(x, y, z)`` in RAS voxel order; anatomy is laid out in normalised coordinates ``(u, v, w) ∈ [-1, 1]³``
spanning the field of view (see :mod:`medssl.data.phantoms`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from medssl.errors import ConfigError

__all__ = [
    "DATALIST_NAME",
    "tissue_index",
    "normalised_axis",
    "smooth_field",
    "Canvas",
    "jittered",
    "scaled",
    "render_tissues",
    "check_shape",
    "check_seed",
    "centred_affine",
    "validation_count",
    "write_nifti",
    "write_nrrd",
]

DATALIST_NAME = "datalist.json"


def tissue_index(table: Mapping[str, tuple]) -> dict[str, int]:
    """Tissue name → its index in ``table`` (the value a :class:`Canvas` paints into its tissue map)."""
    return {name: i for i, name in enumerate(table)}


def normalised_axis(n: int) -> np.ndarray:
    """Voxel centres of an axis of ``n`` voxels in normalised coordinates, ``-1 + 1/n ... 1 - 1/n``."""
    return ((np.arange(n, dtype=np.float32) + 0.5) / n) * 2 - 1


def smooth_field(shape: Sequence[int], rng: np.random.Generator, nodes: Sequence[int], amp: float) -> np.ndarray:
    """A smooth random field of shape ``shape``: Gaussian-RBF interpolation of ``N(0, amp²)`` values on a coarse
    ``nodes`` grid (separable, so it costs one small einsum instead of a filter over the volume)."""
    mats = []
    for n, k in zip(shape, nodes):
        x = normalised_axis(n)
        centres = np.linspace(-1, 1, k, dtype=np.float32)
        width = 0.6 * 2.0 / (k - 1)
        m = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / width) ** 2)
        mats.append(m / m.sum(axis=1, keepdims=True))
    coarse = rng.normal(0.0, amp, size=tuple(nodes)).astype(np.float32)
    return np.einsum("ia,jb,kc,abc->ijk", *mats, coarse, optimize=True).astype(np.float32)


class Canvas:
    """Tissue and label maps painted with primitives defined in warped, body-scaled anatomy coordinates.

    Anatomy coordinates of a voxel are ``(grid + displacement) / scale``; shapes are evaluated only inside a
    bounding box (found from the displacement's range), which keeps a case well under a second.
    """

    def __init__(self, shape, rng, *, warp_amp: float, warp_nodes, scale=(1.0, 1.0, 1.0)):
        self.shape = tuple(int(s) for s in shape)
        self.scale = np.asarray(scale, dtype=np.float32)
        self.coords, self._dmin, self._dmax = [], [], []
        for d, n in enumerate(self.shape):
            disp = smooth_field(self.shape, rng, warp_nodes, warp_amp)
            bshape = [1, 1, 1]
            bshape[d] = n
            self.coords.append((normalised_axis(n).reshape(bshape) + disp) / self.scale[d])
            self._dmin.append(float(disp.min()))
            self._dmax.append(float(disp.max()))
        self.voxel = np.asarray([2.0 / (n * s) for n, s in zip(self.shape, self.scale)], dtype=np.float32)
        self.tissue = np.zeros(self.shape, dtype=np.uint8)
        self.label = np.zeros(self.shape, dtype=np.uint8)

    def box(self, lo, hi) -> tuple[slice, ...] | None:
        """Index box holding every voxel whose anatomy coordinates may fall in ``[lo, hi]``; None when empty."""
        box = []
        for d, n in enumerate(self.shape):
            x0 = float(lo[d]) * self.scale[d] - self._dmax[d]
            x1 = float(hi[d]) * self.scale[d] - self._dmin[d]
            i0 = max(int(np.floor((x0 + 1) / 2 * n - 0.5)), 0)
            i1 = min(int(np.ceil((x1 + 1) / 2 * n - 0.5)) + 1, n)
            if i1 <= i0:
                return None
            box.append(slice(i0, i1))
        return tuple(box)

    def radii(self, radii, minvox: float) -> np.ndarray:
        return np.maximum(np.asarray(radii, dtype=np.float32), minvox * self.voxel)

    def ellipsoid(self, centre, radii, angle: float = 0.0, minvox: float = 1.5):
        """``(box, q)``: ``q`` is the squared normalised radius (``q <= 1`` inside), rotated by ``angle`` in u-v."""
        r = self.radii(radii, minvox)
        c = np.asarray(centre, dtype=np.float32)
        ext = np.array([max(r[0], r[1]), max(r[0], r[1]), r[2]], dtype=np.float32)
        box = self.box(c - ext, c + ext)
        if box is None:
            return None, None
        u, v, w = (x[box] - ci for x, ci in zip(self.coords, c))
        ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        q = ((ca * u + sa * v) / r[0]) ** 2 + ((ca * v - sa * u) / r[1]) ** 2 + (w / r[2]) ** 2
        return box, q

    def capsule(self, points, radii, minvox: float = 1.5):
        """``(box, q)`` of a tube along a polyline: ``q`` is the squared distance in radius units (inside ``<= 1``)."""
        r = self.radii(radii, minvox)
        pts = np.asarray(points, dtype=np.float32)
        box = self.box(pts.min(0) - r, pts.max(0) + r)
        if box is None:
            return None, None
        p = [x[box] / ri for x, ri in zip(self.coords, r)]
        q = None
        for a, b in zip(pts[:-1] / r, pts[1:] / r):
            ab = b - a
            t = ((p[0] - a[0]) * ab[0] + (p[1] - a[1]) * ab[1] + (p[2] - a[2]) * ab[2]) / max(float(ab @ ab), 1e-12)
            np.clip(t, 0.0, 1.0, out=t)
            d2 = (p[0] - a[0] - t * ab[0]) ** 2 + (p[1] - a[1] - t * ab[1]) ** 2 + (p[2] - a[2] - t * ab[2]) ** 2
            q = d2 if q is None else np.minimum(q, d2)
        return box, q

    def paint(self, box, mask, tissue: int, label: int = 0, within: np.ndarray | None = None) -> None:
        """Set tissue and label where ``mask`` (an array over ``box``); ``within`` is a full-volume restriction."""
        if box is None:
            return
        if within is not None:
            mask = mask & within[box]
        self.tissue[box][mask] = tissue
        self.label[box][mask] = label


def jittered(rng: np.random.Generator, x, sd: float) -> np.ndarray:
    return np.asarray(x, dtype=np.float32) + rng.normal(0.0, sd, size=np.shape(x)).astype(np.float32)


def scaled(rng: np.random.Generator, r, lo: float = 0.85, hi: float = 1.15) -> np.ndarray:
    return np.asarray(r, dtype=np.float32) * rng.uniform(lo, hi, size=np.shape(r)).astype(np.float32)


def render_tissues(canvas: Canvas, table: Mapping[str, tuple], rng: np.random.Generator, texture_sigma) -> np.ndarray:
    """Per-tissue mean (jittered per case) plus per-tissue amplitude times one smooth texture field."""
    spec = np.asarray(list(table.values()), dtype=np.float32)
    means = spec[:, 0] + rng.normal(0.0, 1.0, size=len(spec)).astype(np.float32) * spec[:, 2]
    texture = ndimage.gaussian_filter(rng.standard_normal(canvas.shape, dtype=np.float32), texture_sigma)
    texture /= max(float(texture.std()), 1e-6)
    return means[canvas.tissue] + spec[canvas.tissue, 1] * texture


def check_shape(kind: str, shape, minimum: Sequence[int]) -> tuple[int, int, int]:
    """``shape`` as three ints, each at least ``minimum`` (the smallest volume the ``kind`` phantom is made for).

    Raises:
        ConfigError: not three integers, or smaller than ``minimum``.
    """
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ConfigError("shape", f"must be three integers, got {shape!r}") from None
    minimum = tuple(minimum)
    if len(shape) != 3 or any(s < m for s, m in zip(shape, minimum)):
        raise ConfigError("shape", f"must be three integers >= {minimum} for {kind}, got {shape}")
    return shape


def check_seed(seed) -> int:
    """``seed`` as an int.

    Raises:
        ConfigError: not a non-negative integer (a bool is refused too).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError("seed", f"must be a non-negative integer, got {seed!r}")
    return int(seed)


def centred_affine(shape, spacing, z_origin: float | None = None) -> np.ndarray:
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * s for n, s in zip(shape, spacing)]
    if z_origin is not None:
        affine[2, 3] = z_origin
    return affine


def validation_count(cases: int) -> int:
    """How many of ``cases`` labeled cases go to ``validation``: 20 %, at least one."""
    return max(1, int(round(0.2 * cases)))


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def write_nrrd(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write an ``(x, y, z)`` array with a RAS affine as NRRD; ITK geometry is LPS, hence the sign flips."""
    import SimpleITK as sitk

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(x) for x in (ras_to_lps @ affine[:3, :3] @ np.diag(1.0 / spacing)).ravel()])
    img.SetOrigin([float(x) for x in ras_to_lps @ affine[:3, 3]])
    sitk.WriteImage(img, str(path), useCompression=True)
