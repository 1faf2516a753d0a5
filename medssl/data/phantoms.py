"""Deterministic synthetic phantoms: a contrast CT abdomen with the 13 BTCV organs and an LGE-MRI left atrium.

They exist so that every pipeline (preparers, validators, SSL pretraining, fine-tuning, Mean Teacher, inference,
evaluation) runs end to end on a fresh machine without downloading data, on volumes that cannot be segmented by
intensity alone (see :func:`intensity_threshold_baseline`).

Conventions (both phantoms):
    * Arrays are indexed ``(x, y, z)`` in **RAS voxel order**: array axis 0 increases towards the patient's Right,
      axis 1 towards Anterior, axis 2 towards Superior. The affine is ``diag(spacing)`` plus an origin, so
      ``nibabel.aff2axcodes(affine) == ("R", "A", "S")``.
    * Anatomy is laid out in normalised coordinates ``(u, v, w) ∈ [-1, 1]³`` spanning the field of view, so a
      different ``shape`` scales the whole body to the volume (``--shape``). The CT phantom is therefore a
      "miniature" abdomen: at the default 160×160×64 and 0.6–0.9 mm in-plane spacing the in-plane field of view
      is 96–144 mm. Small organs keep a minimum radius of 1.5 voxels per axis so that they survive small shapes.
    * One :class:`numpy.random.Generator` per case, seeded with ``(seed, case)``: the same seed gives identical
      arrays and affines, another seed gives other cases.

Per-case variation: spacing, body outline (elliptic with random harmonics), a smooth random displacement field
that deforms every structure, per-organ position/size/rotation jitter, per-tissue mean intensity, noise level.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from medssl.errors import ConfigError, DataError

__all__ = [
    "BTCV_LABELS",
    "LA_LABELS",
    "PHANTOM_KINDS",
    "CT_DEFAULT_SHAPE",
    "LA_DEFAULT_SHAPE",
    "make_ct_abdomen",
    "make_la_mri",
    "la_case_id",
    "generate_phantom_dataset",
    "ensure_phantom",
    "intensity_threshold_baseline",
    "organ_subset",
]

logger = logging.getLogger(__name__)

BTCV_LABELS: dict[int, str] = {
    0: "background",
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior vena cava",
    10: "portal and splenic veins",
    11: "pancreas",
    12: "right adrenal gland",
    13: "left adrenal gland",
}
LA_LABELS: dict[int, str] = {0: "background", 1: "left atrium"}
PHANTOM_KINDS = ("ct-abdomen", "la-mri")
CT_DEFAULT_SHAPE = (160, 160, 64)
LA_DEFAULT_SHAPE = (128, 128, 80)
_MIN_SHAPE = {"ct-abdomen": (48, 48, 24), "la-mri": (32, 32, 32)}
LA_SPACING = 0.625
DATALIST_NAME = "datalist.json"

# CT tissues: name -> (mean HU, texture amplitude HU, per-case standard deviation of the mean). Parenchymal organs
# share 85-150 HU and contrast vessels 150-190 HU, with unlabeled look-alikes (bowel, muscle, other vessels).
_CT_TISSUES = {
    "air": (-1000, 5, 0),
    "subcutaneous fat": (-100, 10, 8),
    "visceral fat": (-90, 15, 8),
    "muscle": (50, 8, 6),
    "lung": (-850, 40, 20),
    "cortical bone": (650, 80, 60),
    "rib": (450, 60, 40),
    "marrow": (230, 40, 30),
    "disc": (85, 10, 5),
    "csf": (12, 5, 3),
    "bowel wall": (45, 12, 8),
    "bowel fluid": (15, 10, 8),
    "bowel contrast": (170, 35, 30),
    "gas": (-700, 80, 50),
    "spleen": (110, 8, 12),
    "kidney cortex": (150, 10, 15),
    "kidney medulla": (95, 10, 10),
    "gallbladder": (15, 5, 6),
    "esophagus": (50, 8, 6),
    "liver": (95, 8, 12),
    "liver vessel": (160, 10, 15),
    "stomach wall": (75, 8, 8),
    "stomach content": (25, 15, 10),
    "aorta": (190, 6, 15),
    "inferior vena cava": (150, 8, 15),
    "portal vein": (170, 6, 15),
    "pancreas": (85, 15, 10),
    "adrenal": (50, 6, 6),
    "vessel": (170, 8, 15),
}
# LGE-MRI tissues in arbitrary units (scaled by 1000 on output): blood pools of every chamber look alike.
_LA_TISSUES = {
    "air": (0.02, 0.01, 0.0),
    "fat": (0.42, 0.05, 0.03),
    "lung": (0.06, 0.02, 0.01),
    "muscle": (0.22, 0.03, 0.02),
    "bone": (0.3, 0.05, 0.03),
    "esophagus": (0.3, 0.04, 0.03),
    "myocardium": (0.12, 0.03, 0.02),
    "enhanced wall": (0.8, 0.05, 0.05),
    "blood": (0.55, 0.04, 0.05),
}


def _tissue_index(table: Mapping[str, tuple]) -> dict[str, int]:
    return {name: i for i, name in enumerate(table)}


_CT = _tissue_index(_CT_TISSUES)
_LA = _tissue_index(_LA_TISSUES)


# ------------------------------------------------------------------------------------------- geometry helpers


def _axis(n: int) -> np.ndarray:
    """Voxel centres of an axis of ``n`` voxels in normalised coordinates, ``-1 + 1/n ... 1 - 1/n``."""
    return ((np.arange(n, dtype=np.float32) + 0.5) / n) * 2 - 1


def _smooth_field(shape: Sequence[int], rng: np.random.Generator, nodes: Sequence[int], amp: float) -> np.ndarray:
    """A smooth random field of shape ``shape``: Gaussian-RBF interpolation of ``N(0, amp²)`` values on a coarse
    ``nodes`` grid (separable, so it costs one small einsum instead of a filter over the volume)."""
    mats = []
    for n, k in zip(shape, nodes):
        x = _axis(n)
        centres = np.linspace(-1, 1, k, dtype=np.float32)
        width = 0.6 * 2.0 / (k - 1)
        m = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / width) ** 2)
        mats.append(m / m.sum(axis=1, keepdims=True))
    coarse = rng.normal(0.0, amp, size=tuple(nodes)).astype(np.float32)
    return np.einsum("ia,jb,kc,abc->ijk", *mats, coarse, optimize=True).astype(np.float32)


class _Canvas:
    """Tissue and label maps painted with primitives defined in warped, body-scaled anatomy coordinates.

    Anatomy coordinates of a voxel are ``(grid + displacement) / scale``; shapes are evaluated only inside a
    bounding box (found from the displacement's range), which keeps a case well under a second.
    """

    def __init__(self, shape, rng, *, warp_amp: float, warp_nodes, scale=(1.0, 1.0, 1.0)):
        self.shape = tuple(int(s) for s in shape)
        self.scale = np.asarray(scale, dtype=np.float32)
        self.coords, self._dmin, self._dmax = [], [], []
        for d, n in enumerate(self.shape):
            disp = _smooth_field(self.shape, rng, warp_nodes, warp_amp)
            bshape = [1, 1, 1]
            bshape[d] = n
            self.coords.append((_axis(n).reshape(bshape) + disp) / self.scale[d])
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


def _jitter(rng: np.random.Generator, x, sd: float) -> np.ndarray:
    return np.asarray(x, dtype=np.float32) + rng.normal(0.0, sd, size=np.shape(x)).astype(np.float32)


def _scale(rng: np.random.Generator, r, lo: float = 0.85, hi: float = 1.15) -> np.ndarray:
    return np.asarray(r, dtype=np.float32) * rng.uniform(lo, hi, size=np.shape(r)).astype(np.float32)


def _render(canvas: _Canvas, table: Mapping[str, tuple], rng: np.random.Generator, texture_sigma) -> np.ndarray:
    """Per-tissue mean (jittered per case) plus per-tissue amplitude times one smooth texture field."""
    spec = np.asarray(list(table.values()), dtype=np.float32)
    means = spec[:, 0] + rng.normal(0.0, 1.0, size=len(spec)).astype(np.float32) * spec[:, 2]
    texture = ndimage.gaussian_filter(rng.standard_normal(canvas.shape, dtype=np.float32), texture_sigma)
    texture /= max(float(texture.std()), 1e-6)
    return means[canvas.tissue] + spec[canvas.tissue, 1] * texture


def _check_shape(kind: str, shape) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ConfigError("shape", f"must be three integers, got {shape!r}") from None
    minimum = _MIN_SHAPE[kind]
    if len(shape) != 3 or any(s < m for s, m in zip(shape, minimum)):
        raise ConfigError("shape", f"must be three integers >= {minimum} for {kind}, got {shape}")
    return shape


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError("seed", f"must be a non-negative integer, got {seed!r}")
    return int(seed)


def _centred_affine(shape, spacing, z_origin: float | None = None) -> np.ndarray:
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * s for n, s in zip(shape, spacing)]
    if z_origin is not None:
        affine[2, 3] = z_origin
    return affine


# ------------------------------------------------------------------------------------------------ CT abdomen


def _ct_anatomy(c: _Canvas, rng: np.random.Generator, cavity: np.ndarray) -> None:
    """Paint muscles, bowel, the 13 BTCV organs and unlabeled vessels (later paint overrides earlier)."""
    t = _CT

    def organ(shape_fn, tissue, label, within=cavity, inner=None):
        box, q = shape_fn
        if box is not None:
            c.paint(box, q <= 1.0, t[tissue], label, within)
            if inner is not None:
                c.paint(box, q <= inner[0], t[inner[1]], label, within)
        return box, q

    # lung bases in the top slices, behind and beside the liver dome
    for side in (-1, 1):
        box, q = c.ellipsoid(_jitter(rng, (0.5 * side, -0.25, 1.25), 0.03), _scale(rng, (0.42, 0.45, 0.5)))
        c.paint(box, q <= 1, t["lung"], 0, cavity)
    # paraspinal and psoas muscles
    for side in (-1, 1):
        box, q = c.capsule([(0.2 * side, -0.66, -1.3), (0.2 * side, -0.66, 1.3)], (0.15, 0.1, 0.2))
        c.paint(box, q <= 1, t["muscle"])
        box, q = c.capsule(
            [(0.12 * side, -0.42, 0.1), (0.2 * side, -0.32, -1.3)], _scale(rng, (0.08, 0.07, 0.1)), minvox=1.0
        )
        c.paint(box, q <= 1, t["muscle"], 0, cavity)
    # small bowel loops and colon: soft tissue, fluid, oral contrast and gas that mimic organ intensities
    loops = [
        [(0.6, -0.05, -1.1), (0.58, 0.05, -0.1)],
        [(0.5, 0.3, -0.2), (0.0, 0.38, -0.3), (-0.5, 0.3, -0.15)],
        [(-0.6, 0.0, -0.1), (-0.62, -0.05, -1.1)],
    ]
    for _ in range(int(rng.integers(10, 16))):
        p0 = rng.uniform((-0.5, -0.1, -1.0), (0.5, 0.5, -0.2))
        loops.append([p0, p0 + rng.normal(0, (0.2, 0.15, 0.25)), p0 + rng.normal(0, (0.25, 0.15, 0.3))])
    for pts in loops:
        box, q = c.capsule(pts, _scale(rng, (0.08, 0.08, 0.16), 0.75, 1.25))
        c.paint(box, q <= 1, t["bowel wall"], 0, cavity)
        lumen = rng.choice(["bowel fluid", "bowel contrast", "gas", "bowel wall"], p=[0.35, 0.25, 0.2, 0.2])
        if box is not None:
            c.paint(box, q <= 0.45, t[lumen], 0, cavity)

    # liver: right lobe + left lobe, intrahepatic vessels keep the liver label
    liver_c = _jitter(rng, (0.42, 0.05, 0.45), 0.03)
    box, q = organ(c.ellipsoid(liver_c, _scale(rng, (0.4, 0.45, 0.5)), rng.uniform(-0.15, 0.15)), "liver", 6)
    organ(c.ellipsoid(_jitter(rng, (0.02, 0.3, 0.56), 0.03), _scale(rng, (0.32, 0.2, 0.26)), 0.2), "liver", 6)
    hilum = _jitter(rng, (0.3, 0.0, 0.38), 0.02)
    ivc_top = np.array((0.13, -0.2, 0.8), dtype=np.float32)
    liver_mask = c.label == 6
    for end in ((0.62, 0.2, 0.5), (0.35, 0.35, 0.62), (0.0, 0.3, 0.62)):
        box, q = c.capsule([_jitter(rng, end, 0.03), ivc_top], (0.03, 0.03, 0.06), minvox=1.0)
        c.paint(box, q <= 1, t["liver vessel"], 6, liver_mask)
    for end in ((0.6, 0.0, 0.28), (0.35, 0.22, 0.58)):
        box, q = c.capsule([hilum, _jitter(rng, end, 0.03)], (0.03, 0.03, 0.06), minvox=1.0)
        c.paint(box, q <= 1, t["liver vessel"], 6, liver_mask)

    organ(c.ellipsoid(_jitter(rng, (-0.58, -0.28, 0.42), 0.03), _scale(rng, (0.15, 0.24, 0.28)), 0.5), "spleen", 1)
    # stomach: wall, fluid content and an anterior gas cap above an air-fluid level (the patient is supine)
    sc = _jitter(rng, (-0.4, 0.22, 0.35), 0.03)
    sr = _scale(rng, (0.24, 0.24, 0.36))
    box, q = organ(c.ellipsoid(sc, sr, rng.uniform(-0.3, 0.3)), "stomach wall", 7, inner=(0.7, "stomach content"))
    if box is not None:
        level = sc[1] + sr[1] * rng.uniform(0.2, 0.6)
        c.paint(box, (q <= 0.7) & (c.coords[1][box] > level), t["gas"], 7, cavity)
    organ(c.ellipsoid(_jitter(rng, (0.3, 0.3, 0.06), 0.02), _scale(rng, (0.08, 0.11, 0.16)), 0.3), "gallbladder", 4)
    for side, label, z in ((1, 2, -0.24), (-1, 3, -0.14)):
        centre = _jitter(rng, (0.36 * side, -0.35, z), 0.03)
        shape_fn = c.ellipsoid(centre, _scale(rng, (0.13, 0.15, 0.3)), side * rng.uniform(0.2, 0.5))
        organ(shape_fn, "kidney cortex", label, inner=(0.45, "kidney medulla"))
    pancreas = [(0.16, 0.05, 0.0), (0.02, 0.08, 0.08), (-0.2, 0.0, 0.14), (-0.42, -0.12, 0.2)]
    pancreas = [_jitter(rng, p, 0.025) for p in pancreas]
    organ(c.capsule(pancreas, _scale(rng, (0.065, 0.06, 0.1))), "pancreas", 11)
    eso = [_jitter(rng, (-0.03, -0.27, 1.2), 0.02), _jitter(rng, (-0.12, -0.12, 0.72), 0.02)]
    organ(c.capsule(eso, _scale(rng, (0.05, 0.045, 0.08))), "esophagus", 5)

    # unlabeled vessels (SMA, SMV, renal veins) share the contrast range of the labeled ones
    aorta_u = float(rng.uniform(-0.1, -0.04))
    for pts in (
        [(aorta_u, -0.16, 0.2), (-0.05, 0.12, -0.2), (-0.05, 0.18, -0.9)],
        [(0.05, -0.02, 0.08), (0.06, 0.15, -0.3), (0.06, 0.2, -0.9)],
        [(0.28, -0.3, -0.2), (0.13, -0.2, -0.12)],
        [(-0.28, -0.3, -0.12), (-0.05, -0.12, -0.1), (0.13, -0.2, -0.1)],
    ):
        box, q = c.capsule([_jitter(rng, p, 0.015) for p in pts], (0.03, 0.03, 0.06), minvox=1.0)
        c.paint(box, q <= 1, t["vessel"], 0, cavity)
    confluence = _jitter(rng, (0.05, -0.05, 0.1), 0.02)
    splenic = [confluence, pancreas[2] + np.float32([0.0, -0.08, 0.02]), _jitter(rng, (-0.45, -0.2, 0.3), 0.02)]
    organ(c.capsule([confluence, _jitter(rng, (0.22, 0.0, 0.3), 0.02), hilum], (0.04, 0.04, 0.07)), "portal vein", 10)
    organ(c.capsule(splenic, (0.035, 0.035, 0.07)), "portal vein", 10)
    ivc = [(0.13, -0.2, -1.3), _jitter(rng, (0.13, -0.2, 0.0), 0.015), ivc_top]
    organ(c.capsule(ivc, _scale(rng, (0.065, 0.05, 0.1))), "inferior vena cava", 9)
    aorta = [(aorta_u, -0.22, -1.3), (aorta_u - 0.02, -0.2, 1.3)]
    organ(c.capsule(aorta, _scale(rng, (0.055, 0.055, 0.1), 0.9, 1.1)), "aorta", 8)
    # adrenals last: thin, above and medial to the kidneys
    organ(c.ellipsoid(_jitter(rng, (0.21, -0.31, 0.2), 0.015), (0.045, 0.07, 0.12), 0.6), "adrenal", 12)
    organ(c.ellipsoid(_jitter(rng, (-0.23, -0.28, 0.24), 0.015), (0.045, 0.07, 0.12), -0.6), "adrenal", 13)


def _ct_skeleton(c: _Canvas, rng: np.random.Generator, rho: np.ndarray, v_centre: float) -> None:
    """Vertebrae (cortex, marrow, discs, canal, spinous process) and ribs; bone overrides everything."""
    t = _CT
    period, phase = float(rng.uniform(0.26, 0.32)), float(rng.uniform(0, 1))
    box, q = c.capsule([(0.0, -0.47, -1.3), (0.0, -0.47, 1.3)], _scale(rng, (0.13, 0.11, 0.1), 0.9, 1.1))
    if box is not None:
        disc = ((c.coords[2][box] / period + phase) % 1.0) < 0.22
        c.paint(box, q <= 1, t["cortical bone"])
        c.paint(box, (q <= 0.55) & ~disc, t["marrow"])
        c.paint(box, (q <= 1) & disc, t["disc"])
    box, q = c.capsule([(0.0, -0.64, -1.3), (0.0, -0.64, 1.3)], (0.085, 0.075, 0.1))
    c.paint(box, q <= 1, t["cortical bone"])
    box, q = c.capsule([(0.0, -0.68, -1.3), (0.0, -0.68, 1.3)], (0.025, 0.12, 0.1), minvox=1.0)
    if box is not None:
        c.paint(box, (q <= 1) & (((c.coords[2][box] / period + phase) % 1.0) >= 0.3), t["cortical bone"])
    box, q = c.capsule([(0.0, -0.64, -1.3), (0.0, -0.64, 1.3)], (0.05, 0.045, 0.1), minvox=1.0)
    c.paint(box, q <= 1, t["csf"])
    # ribs: oblique bands in the muscle wall of the upper abdomen, absent anteriorly (costal cartilage gap)
    box = c.box((-2, -2, -0.1), (2, 2, 2))
    if box is not None:
        u, v, w = (x[box] for x in c.coords)
        theta = np.arctan2(v - v_centre, u)
        rib_period = float(rng.uniform(0.26, 0.34))
        band = ((w - 0.25 * np.sin(theta)) / rib_period + float(rng.uniform(0, 1))) % 1.0 < 0.3
        ring = (rho[box] >= 0.83) & (rho[box] <= 0.89)
        gap = (np.abs(theta - np.pi / 2) < 0.7) | (np.abs(theta + np.pi / 2) < 0.45)
        c.paint(box, ring & band & ~gap & (w > -0.1), t["rib"])


def make_ct_abdomen(
    seed: int, shape: Sequence[int] = CT_DEFAULT_SHAPE, *, case: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One contrast-enhanced abdominal CT phantom with the 13 BTCV organs.

    Air, a deformed elliptic body outline with subcutaneous fat and a muscle wall, visceral fat, lung bases,
    bowel loops (soft tissue, fluid, oral contrast, gas), vertebrae and ribs, the 13 organs of
    :data:`BTCV_LABELS` at their usual positions (liver right-anterior-superior, spleen left-posterior, kidneys
    either side of the spine, aorta left-anterior of the spine with the IVC to its right, ...) and unlabeled
    vessels. Organ means overlap (parenchyma 85-150 HU, vessels 150-190 HU, look-alike bowel and muscle), then
    texture, partial-volume blur (Gaussian, σ 0.6 voxel in-plane / 0.4 through-plane) and white noise
    (σ 8-18 HU). Spacing is 0.6-0.9 mm in-plane and 2.5-5 mm between slices.

    Args:
        seed: non-negative dataset seed.
        shape: ``(x, y, z)`` voxels, at least ``(48, 48, 24)``; the anatomy is scaled to the volume. All 13
            organs are present at every shape ≥ 64×64×32 (tested); adrenals are then only a few voxels.
        case: case index; the generator is seeded with ``(seed, case)``.

    Returns:
        ``(image, label, affine)``: image ``int16`` HU of shape ``shape``, label ``uint8`` in ``0..13``, 4×4
        ``float64`` affine in RAS voxel order (``aff2axcodes == ("R", "A", "S")``).

    Raises:
        ConfigError: a negative seed or a shape that is too small.

    Example::

        image, label, affine = make_ct_abdomen(0, (96, 96, 48))
    """
    seed, shape = _check_seed(seed), _check_shape("ct-abdomen", shape)
    rng = np.random.default_rng([seed, int(case)])
    in_plane, slice_mm = round(float(rng.uniform(0.6, 0.9)), 3), round(float(rng.uniform(2.5, 5.0)), 3)
    spacing = (in_plane, in_plane, slice_mm)
    scale = (rng.uniform(0.92, 1.0), rng.uniform(0.9, 1.0), 1.0)
    c = _Canvas(shape, rng, warp_amp=0.035, warp_nodes=(5, 5, 4), scale=scale)

    u, v, w = c.coords
    v_centre = -0.08
    theta = np.arctan2(v - v_centre, u)
    outline = np.ones_like(theta)
    for k in (2, 3, 4):
        outline += np.float32(rng.uniform(-0.035, 0.035)) * np.cos(k * theta + np.float32(rng.uniform(0, 2 * np.pi)))
    outline *= 1 + np.float32(rng.uniform(0.0, 0.05)) * w
    rho = np.sqrt((u / 0.94) ** 2 + ((v - v_centre) / 0.76) ** 2) / outline
    del theta, outline
    c.tissue[rho <= 1.0] = _CT["subcutaneous fat"]
    c.tissue[rho <= 0.9] = _CT["muscle"]
    cavity = rho <= 0.82
    c.tissue[cavity] = _CT["visceral fat"]

    _ct_anatomy(c, rng, cavity)
    _ct_skeleton(c, rng, rho, v_centre)
    missing = sorted(set(range(1, 14)) - set(np.unique(c.label).tolist()))
    if missing:  # a bug, not a user error: every organ is meant to survive every allowed shape
        raise RuntimeError(f"phantom seed {seed} case {case} shape {shape} lost organs {missing}")

    image = _render(c, _CT_TISSUES, rng, texture_sigma=(1.5, 1.5, 0.7))
    image = ndimage.gaussian_filter(image, (0.6, 0.6, 0.4))
    image += np.float32(rng.uniform(8.0, 18.0)) * rng.standard_normal(shape, dtype=np.float32)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    # table position: the top slice sits 100-200 mm below the scanner isocentre's z = 0
    z_origin = -float(rng.uniform(100.0, 200.0)) - (shape[2] - 1) * slice_mm
    return image, c.label, _centred_affine(shape, spacing, round(z_origin, 2))


# ----------------------------------------------------------------------------------------------------- LA MRI


def make_la_mri(
    seed: int, shape: Sequence[int] = LA_DEFAULT_SHAPE, *, case: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One LGE-MRI-like left-atrium phantom (LA 2018 challenge look-alike).

    Left-atrium body (deformed ellipsoid) with four pulmonary-vein stubs and an appendage (label 1) inside a dark
    myocardial wall with patchy enhancement; left and right ventricles, right atrium, ascending and descending
    aorta and pulmonary artery as unlabeled blood pools of the same intensity; mediastinal fat, lungs,
    esophagus and spine. Then partial-volume blur (σ 0.7 voxel), a smooth multiplicative bias field (about
    ±30 %) and Rician noise (magnitude of complex Gaussian noise, σ 3-6 % of the blood signal scale).
    Isotropic 0.625 mm spacing (Z.  Xiong et al., "A global benchmark of algorithms for segmenting the left
    atrium from late gadolinium-enhanced cardiac MRI", Medical Image Analysis 2021).

    Args:
        seed: non-negative dataset seed.
        shape: ``(x, y, z)`` voxels, at least ``(32, 32, 32)``; the anatomy is scaled to the volume.
        case: case index; the generator is seeded with ``(seed, case)``.

    Returns:
        ``(image, label, affine)``: image ``int16`` (about 0-1000), label ``uint8`` in ``{0, 1}``, 4×4 affine in
        RAS voxel order with 0.625 mm on the diagonal.

    Raises:
        ConfigError: a negative seed or a shape that is too small.
    """
    seed, shape = _check_seed(seed), _check_shape("la-mri", shape)
    rng = np.random.default_rng([seed, int(case)])
    c = _Canvas(shape, rng, warp_amp=0.05, warp_nodes=(5, 5, 5))
    t = _LA
    c.tissue[:] = t["fat"]

    def paint(shape_fn, tissue, label=0, level=1.0):
        box, q = shape_fn
        if box is not None:
            c.paint(box, q <= level, t[tissue], label)

    for side in (-1, 1):
        paint(c.ellipsoid(_jitter(rng, (0.95 * side, -0.2, 0.0), 0.04), _scale(rng, (0.55, 0.9, 1.6))), "lung")
    paint(c.capsule([(-1.3, 1.05, -1.3), (1.3, 1.05, -1.3), (1.3, 1.05, 1.3)], (0.3, 0.1, 0.3)), "muscle")
    box, q = c.capsule([(0.0, -1.05, -1.3), (0.0, -1.05, 1.3)], (0.25, 0.2, 0.2))
    paint((box, q), "bone")
    paint(c.capsule([(-0.05, -0.62, -1.3), (-0.08, -0.6, 1.3)], _scale(rng, (0.09, 0.08, 0.1))), "esophagus")
    # non-LA blood pools: same "blood" tissue as the LA so that intensity cannot separate them
    paint(c.capsule([(-0.3, -0.75, -1.3), (-0.3, -0.72, 1.3)], _scale(rng, (0.16, 0.16, 0.1))), "blood")
    lv_c, lv_r, lv_a = _jitter(rng, (-0.35, 0.55, -0.55), 0.04), _scale(rng, (0.45, 0.4, 0.5)), rng.uniform(0.3, 0.7)
    paint(c.ellipsoid(lv_c, lv_r, lv_a), "myocardium")
    paint(c.ellipsoid(lv_c, lv_r, lv_a), "blood", level=0.5)
    rv = (_jitter(rng, (0.2, 0.78, -0.6), 0.04), _scale(rng, (0.4, 0.25, 0.45)), rng.uniform(-0.3, 0.0))
    paint(c.ellipsoid(*rv), "myocardium")
    paint(c.ellipsoid(*rv), "blood", level=0.7)
    ra = (_jitter(rng, (0.58, 0.15, -0.05), 0.04), _scale(rng, (0.3, 0.3, 0.35)))
    paint(c.ellipsoid(*ra), "myocardium")
    paint(c.ellipsoid(*ra), "blood", level=0.75)
    aorta = [_jitter(rng, (0.1, 0.38, -0.5), 0.03), _jitter(rng, (0.08, 0.34, 1.3), 0.03)]
    paint(c.capsule(aorta, _scale(rng, (0.17, 0.17, 0.17))), "blood")
    paint(c.capsule([(-0.18, 0.62, -0.1), (-0.2, 0.38, 0.8)], _scale(rng, (0.15, 0.15, 0.15))), "blood")
    paint(c.capsule([(-0.15, 0.34, 0.78), _jitter(rng, (0.65, 0.1, 0.68), 0.04)], (0.1, 0.1, 0.1)), "blood")

    # left atrium: walls of body, veins and appendage first, then every lumen (label 1) so that the walls never
    # cut the ostia
    la_c = _jitter(rng, (0.0, -0.12, 0.05), 0.04)
    la_r = _scale(rng, (0.4, 0.28, 0.3))
    la_a = rng.uniform(-0.25, 0.25)
    wall = 0.06
    lumens = [(c.ellipsoid(la_c, la_r, la_a), c.ellipsoid(la_c, la_r + wall, la_a))]
    directions = [(0.75, -0.5, 0.45), (0.75, -0.5, -0.35), (-0.75, -0.5, 0.45), (-0.75, -0.5, -0.35)]
    for d in directions:
        d = _jitter(rng, d, 0.08)
        d /= np.linalg.norm(d)
        start = la_c + 0.7 * la_r * d
        end = la_c + la_r * d + d * rng.uniform(0.25, 0.4)
        radius = np.full(3, rng.uniform(0.07, 0.09), dtype=np.float32)
        lumens.append((c.capsule([start, end], radius), c.capsule([start, end], radius + wall * 0.7)))
    d = np.float32((-0.6, 0.6, 0.45)) / np.linalg.norm((-0.6, 0.6, 0.45))
    laa = [la_c + 0.8 * la_r * d, la_c + la_r * d + d * rng.uniform(0.12, 0.2)]
    lumens.append((c.capsule(laa, (0.07, 0.07, 0.07)), c.capsule(laa, (0.07 + wall, 0.07 + wall, 0.07 + wall))))
    fibrosis = _smooth_field(shape, rng, (7, 7, 7), 1.0) > rng.uniform(0.3, 0.6)
    for _, outer in lumens:
        box, q = outer
        if box is not None:
            c.paint(box, q <= 1, t["myocardium"])
            c.paint(box, (q <= 1) & fibrosis[box], t["enhanced wall"])
    for inner, _ in lumens:
        paint(inner, "blood", 1)
    if not c.label.any():
        raise RuntimeError(f"phantom seed {seed} case {case} shape {shape} has no left atrium")

    image = _render(c, _LA_TISSUES, rng, texture_sigma=1.5)
    image = ndimage.gaussian_filter(image, 0.7)
    image *= np.exp(_smooth_field(shape, rng, (3, 3, 3), 0.3))
    sigma = np.float32(rng.uniform(0.03, 0.06))
    real = image + sigma * rng.standard_normal(shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(shape, dtype=np.float32)
    image = np.sqrt(real**2 + imag**2) * 1000
    image = np.clip(np.rint(image), 0, 32767).astype(np.int16)
    return image, c.label, _centred_affine(shape, (LA_SPACING,) * 3)


def la_case_id(seed: int, case: int) -> str:
    """A 20-character uppercase alphanumeric case id, like the LA 2018 ones, derived from ``(seed, case)``."""
    digest = hashlib.sha256(f"medssl-la-mri/{int(seed)}/{int(case)}".encode()).digest()
    return base64.b32encode(digest).decode("ascii")[:20]


# --------------------------------------------------------------------------------------------------- writing


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def _write_nrrd(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write an ``(x, y, z)`` array with a RAS affine as NRRD; ITK geometry is LPS, hence the sign flips."""
    import SimpleITK as sitk

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(x) for x in (ras_to_lps @ affine[:3, :3] @ np.diag(1.0 / spacing)).ravel()])
    img.SetOrigin([float(x) for x in ras_to_lps @ affine[:3, 3]])
    sitk.WriteImage(img, str(path), useCompression=True)


def _n_validation(cases: int) -> int:
    return max(1, int(round(0.2 * cases)))


def organ_subset(organs: Sequence[str | int] | None) -> dict[int, str]:
    """The BTCV labels kept by a phantom with ``organs`` (names or BTCV indices), renumbered ``1..K`` in BTCV order.

    ``None`` keeps all 13 organs with their BTCV numbers.

    Raises:
        ConfigError: an unknown organ, a duplicate, or background.
    """
    if organs is None:
        return dict(BTCV_LABELS)
    by_name = {name: k for k, name in BTCV_LABELS.items() if k}
    chosen = []
    for organ in organs:
        text = str(organ).strip().lower().replace("_", " ")
        k = int(text) if text.isdigit() else by_name.get(text)
        if k not in BTCV_LABELS or k == 0:
            raise ConfigError("organs", f"unknown organ {organ!r} (use BTCV names or 1-13: {', '.join(by_name)})")
        if k in chosen:
            raise ConfigError("organs", f"organ {organ!r} is listed twice")
        chosen.append(k)
    if not chosen:
        raise ConfigError("organs", "needs at least one organ")
    return {0: "background", **{i: BTCV_LABELS[k] for i, k in enumerate(sorted(chosen), 1)}}


def _organ_lut(labels: Mapping[int, str]) -> np.ndarray:
    """BTCV label -> kept label (0 for organs that are left out, which then count as background)."""
    index = {name: k for k, name in BTCV_LABELS.items()}
    lut = np.zeros(256, dtype=np.uint8)
    for k, name in labels.items():
        lut[index[name]] = k
    return lut


def _write_ct(tmp: Path, seed: int, cases: int, unlabeled: int, shape, organs=None) -> dict:
    for sub in ("imagesTr", "labelsTr", "imagesUn"):
        (tmp / sub).mkdir()
    labels = organ_subset(organs)
    lut = _organ_lut(labels)
    labeled, unlabeled_items, spacings = [], [], []
    for i in range(cases + unlabeled):
        start = time.perf_counter()
        image, label, affine = make_ct_abdomen(seed, shape, case=i)
        label = lut[label]
        name = f"ct_{i:04d}.nii.gz"
        if i < cases:
            _write_nifti(tmp / "imagesTr" / name, image, affine)
            _write_nifti(tmp / "labelsTr" / name, label, affine)
            labeled.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
        else:
            _write_nifti(tmp / "imagesUn" / name, image, affine)
            unlabeled_items.append({"image": f"imagesUn/{name}"})
        spacings.append(np.diag(affine)[:3])
        logger.debug("ct-abdomen case %d written in %.2f s", i, time.perf_counter() - start)
    n_val = _n_validation(cases)
    spacings = np.asarray(spacings)
    return {
        "name": "medssl-phantom-ct-abdomen",
        "description": f"medssl phantom ct-abdomen (synthetic contrast CT with the 13 BTCV organs), seed {seed}",
        "modality": {"0": "CT"},
        "tensorImageSize": "3D",
        "labels": {str(k): v for k, v in labels.items()},
        "spacing": (
            "varies per case (read each header): in-plane 0.6-0.9 mm, slices 2.5-5 mm; this dataset "
            f"{spacings[:, 0].min():.3f}-{spacings[:, 0].max():.3f} mm in-plane, "
            f"{spacings[:, 2].min():.3f}-{spacings[:, 2].max():.3f} mm slices"
        ),
        "numTraining": cases - n_val,
        "numValidation": n_val,
        "numUnlabeled": unlabeled,
        "training": labeled[: cases - n_val],
        "validation": labeled[cases - n_val :],
        "unlabeled": unlabeled_items,
    }


def _write_la(tmp: Path, seed: int, cases: int, unlabeled: int, shape, organs=None) -> dict:
    from medssl.data.prepare import prepare_la2018

    ids = [la_case_id(seed, i) for i in range(cases + unlabeled)]
    for i, case_id in enumerate(ids):
        start = time.perf_counter()
        image, label, affine = make_la_mri(seed, shape, case=i)
        folder = tmp / "raw" / case_id
        folder.mkdir(parents=True)
        _write_nrrd(folder / "lgemri.nrrd", image, affine)
        if i < cases:
            _write_nrrd(folder / "laendo.nrrd", (label * 255).astype(np.uint8), affine)
        logger.debug("la-mri case %d (%s) written in %.2f s", i, case_id, time.perf_counter() - start)
    validation_ids = ids[cases - _n_validation(cases) : cases]
    datalist = Path(prepare_la2018(tmp / "raw", tmp / DATALIST_NAME, validation_ids=validation_ids))
    data = json.loads(datalist.read_text())
    data.setdefault("name", "medssl-phantom-la-mri")
    data["description"] = f"medssl phantom la-mri (synthetic LGE-MRI left atrium, LA 2018 layout), seed {seed}"
    data.setdefault("labels", {str(k): v for k, v in LA_LABELS.items()})
    data.setdefault("spacing", f"{LA_SPACING} mm isotropic")
    return data


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
    seed = _check_seed(seed)
    default = CT_DEFAULT_SHAPE if kind == "ct-abdomen" else LA_DEFAULT_SHAPE
    shape = _check_shape(kind, default if shape is None else shape)
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
        writer = _write_ct if kind == "ct-abdomen" else _write_la
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


# -------------------------------------------------------------------------------------------------- baseline


def intensity_threshold_baseline(
    image: np.ndarray, label: np.ndarray, labels: Mapping[int, str] | Iterable[int], n_quantiles: int = 41
) -> dict[int, float]:
    """Dice of the best global intensity window per organ: a lower bound that any learned model must beat.

    For organ ``k`` the candidate windows are all ``[lo, hi]`` with ``lo <= hi`` taken from ``n_quantiles``
    evenly spaced percentiles (0-100) of the image values inside the organ; the mask ``lo <= image <= hi`` over
    the whole volume is scored against ``label == k`` and the best Dice is kept. The thresholds are fitted on the
    very case they are scored on (an oracle), so the result is optimistic. Counting uses one sort of the image
    and binary searches, exact and O(N log N).

    Args:
        image: intensities, any shape.
        label: integer label map of the same shape.
        labels: label indices (or a ``{index: name}`` mapping); 0 (background) is ignored.
        n_quantiles: size of the percentile grid.

    Returns:
        ``{label: best Dice}``; ``nan`` for a label absent from ``label``.

    Raises:
        ValueError: shapes differ or ``n_quantiles < 2``.
    """
    image, label = np.asarray(image), np.asarray(label)
    if image.shape != label.shape:
        raise ValueError(f"image shape {image.shape} differs from label shape {label.shape}")
    if n_quantiles < 2:
        raise ValueError(f"n_quantiles must be >= 2, got {n_quantiles}")
    flat_image = np.sort(image, axis=None)
    result = {}
    for k in sorted(int(k) for k in labels):
        if k == 0:
            continue
        organ = np.sort(image[label == k])
        if organ.size == 0:
            result[k] = float("nan")
            continue
        edges = np.unique(np.percentile(organ, np.linspace(0, 100, n_quantiles), method="nearest"))
        lo, hi = np.meshgrid(edges, edges, indexing="ij")
        valid = lo <= hi
        lo, hi = lo[valid], hi[valid]
        in_window = np.searchsorted(flat_image, hi, "right") - np.searchsorted(flat_image, lo, "left")
        true_pos = np.searchsorted(organ, hi, "right") - np.searchsorted(organ, lo, "left")
        result[k] = float(np.max(2.0 * true_pos / (organ.size + in_window)))
    return result
