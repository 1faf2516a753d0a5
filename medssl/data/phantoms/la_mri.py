"""The LGE-MRI left-atrium phantom (LA 2018 look-alike) and its dataset writer (the LA 2018 raw layout)."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from medssl.data.phantoms.common import (
    DATALIST_NAME,
    Canvas,
    centred_affine,
    check_seed,
    check_shape,
    jittered,
    render_tissues,
    scaled,
    smooth_field,
    tissue_index,
    validation_count,
    write_nrrd,
)

__all__ = [
    "LA_LABELS",
    "LA_DEFAULT_SHAPE",
    "LA_MIN_SHAPE",
    "LA_SPACING",
    "make_la_mri",
    "la_case_id",
    "write_la_dataset",
]

logger = logging.getLogger(__name__)

LA_LABELS: dict[int, str] = {0: "background", 1: "left atrium"}
LA_DEFAULT_SHAPE = (128, 128, 80)
LA_MIN_SHAPE = (32, 32, 32)
LA_SPACING = 0.625

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


_LA = tissue_index(_LA_TISSUES)


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
    seed, shape = check_seed(seed), check_shape("la-mri", shape, LA_MIN_SHAPE)
    rng = np.random.default_rng([seed, int(case)])
    c = Canvas(shape, rng, warp_amp=0.05, warp_nodes=(5, 5, 5))
    t = _LA
    c.tissue[:] = t["fat"]

    def paint(shape_fn, tissue, label=0, level=1.0):
        box, q = shape_fn
        if box is not None:
            c.paint(box, q <= level, t[tissue], label)

    for side in (-1, 1):
        paint(c.ellipsoid(jittered(rng, (0.95 * side, -0.2, 0.0), 0.04), scaled(rng, (0.55, 0.9, 1.6))), "lung")
    paint(c.capsule([(-1.3, 1.05, -1.3), (1.3, 1.05, -1.3), (1.3, 1.05, 1.3)], (0.3, 0.1, 0.3)), "muscle")
    box, q = c.capsule([(0.0, -1.05, -1.3), (0.0, -1.05, 1.3)], (0.25, 0.2, 0.2))
    paint((box, q), "bone")
    paint(c.capsule([(-0.05, -0.62, -1.3), (-0.08, -0.6, 1.3)], scaled(rng, (0.09, 0.08, 0.1))), "esophagus")
    # non-LA blood pools: same "blood" tissue as the LA so that intensity cannot separate them
    paint(c.capsule([(-0.3, -0.75, -1.3), (-0.3, -0.72, 1.3)], scaled(rng, (0.16, 0.16, 0.1))), "blood")
    lv_c, lv_r, lv_a = jittered(rng, (-0.35, 0.55, -0.55), 0.04), scaled(rng, (0.45, 0.4, 0.5)), rng.uniform(0.3, 0.7)
    paint(c.ellipsoid(lv_c, lv_r, lv_a), "myocardium")
    paint(c.ellipsoid(lv_c, lv_r, lv_a), "blood", level=0.5)
    rv = (jittered(rng, (0.2, 0.78, -0.6), 0.04), scaled(rng, (0.4, 0.25, 0.45)), rng.uniform(-0.3, 0.0))
    paint(c.ellipsoid(*rv), "myocardium")
    paint(c.ellipsoid(*rv), "blood", level=0.7)
    ra = (jittered(rng, (0.58, 0.15, -0.05), 0.04), scaled(rng, (0.3, 0.3, 0.35)))
    paint(c.ellipsoid(*ra), "myocardium")
    paint(c.ellipsoid(*ra), "blood", level=0.75)
    aorta = [jittered(rng, (0.1, 0.38, -0.5), 0.03), jittered(rng, (0.08, 0.34, 1.3), 0.03)]
    paint(c.capsule(aorta, scaled(rng, (0.17, 0.17, 0.17))), "blood")
    paint(c.capsule([(-0.18, 0.62, -0.1), (-0.2, 0.38, 0.8)], scaled(rng, (0.15, 0.15, 0.15))), "blood")
    paint(c.capsule([(-0.15, 0.34, 0.78), jittered(rng, (0.65, 0.1, 0.68), 0.04)], (0.1, 0.1, 0.1)), "blood")

    # left atrium: walls of body, veins and appendage first, then every lumen (label 1) so that the walls never
    # cut the ostia
    la_c = jittered(rng, (0.0, -0.12, 0.05), 0.04)
    la_r = scaled(rng, (0.4, 0.28, 0.3))
    la_a = rng.uniform(-0.25, 0.25)
    wall = 0.06
    lumens = [(c.ellipsoid(la_c, la_r, la_a), c.ellipsoid(la_c, la_r + wall, la_a))]
    directions = [(0.75, -0.5, 0.45), (0.75, -0.5, -0.35), (-0.75, -0.5, 0.45), (-0.75, -0.5, -0.35)]
    for d in directions:
        d = jittered(rng, d, 0.08)
        d /= np.linalg.norm(d)
        start = la_c + 0.7 * la_r * d
        end = la_c + la_r * d + d * rng.uniform(0.25, 0.4)
        radius = np.full(3, rng.uniform(0.07, 0.09), dtype=np.float32)
        lumens.append((c.capsule([start, end], radius), c.capsule([start, end], radius + wall * 0.7)))
    d = np.float32((-0.6, 0.6, 0.45)) / np.linalg.norm((-0.6, 0.6, 0.45))
    laa = [la_c + 0.8 * la_r * d, la_c + la_r * d + d * rng.uniform(0.12, 0.2)]
    lumens.append((c.capsule(laa, (0.07, 0.07, 0.07)), c.capsule(laa, (0.07 + wall, 0.07 + wall, 0.07 + wall))))
    fibrosis = smooth_field(shape, rng, (7, 7, 7), 1.0) > rng.uniform(0.3, 0.6)
    for _, outer in lumens:
        box, q = outer
        if box is not None:
            c.paint(box, q <= 1, t["myocardium"])
            c.paint(box, (q <= 1) & fibrosis[box], t["enhanced wall"])
    for inner, _ in lumens:
        paint(inner, "blood", 1)
    if not c.label.any():
        raise RuntimeError(f"phantom seed {seed} case {case} shape {shape} has no left atrium")

    image = render_tissues(c, _LA_TISSUES, rng, texture_sigma=1.5)
    image = ndimage.gaussian_filter(image, 0.7)
    image *= np.exp(smooth_field(shape, rng, (3, 3, 3), 0.3))
    sigma = np.float32(rng.uniform(0.03, 0.06))
    real = image + sigma * rng.standard_normal(shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(shape, dtype=np.float32)
    image = np.sqrt(real**2 + imag**2) * 1000
    image = np.clip(np.rint(image), 0, 32767).astype(np.int16)
    return image, c.label, centred_affine(shape, (LA_SPACING,) * 3)


def la_case_id(seed: int, case: int) -> str:
    """A 20-character uppercase alphanumeric case id, like the LA 2018 ones, derived from ``(seed, case)``."""
    digest = hashlib.sha256(f"medssl-la-mri/{int(seed)}/{int(case)}".encode()).digest()
    return base64.b32encode(digest).decode("ascii")[:20]


def write_la_dataset(tmp: Path, seed: int, cases: int, unlabeled: int, shape, organs=None) -> dict:
    """Write the LA 2018 raw layout (``raw/<CASEID>/lgemri.nrrd`` + ``laendo.nrrd``) into ``tmp`` and convert it
    with :func:`medssl.data.prepare.prepare_la2018`; returns the datalist dict.

    Arguments as :func:`medssl.data.phantoms.generate_phantom_dataset` (already checked; ``organs`` is unused).
    """
    from medssl.data.prepare import prepare_la2018

    ids = [la_case_id(seed, i) for i in range(cases + unlabeled)]
    for i, case_id in enumerate(ids):
        start = time.perf_counter()
        image, label, affine = make_la_mri(seed, shape, case=i)
        folder = tmp / "raw" / case_id
        folder.mkdir(parents=True)
        write_nrrd(folder / "lgemri.nrrd", image, affine)
        if i < cases:
            write_nrrd(folder / "laendo.nrrd", (label * 255).astype(np.uint8), affine)
        logger.debug("la-mri case %d (%s) written in %.2f s", i, case_id, time.perf_counter() - start)
    validation_ids = ids[cases - validation_count(cases) : cases]
    datalist = Path(prepare_la2018(tmp / "raw", tmp / DATALIST_NAME, validation_ids=validation_ids))
    data = json.loads(datalist.read_text())
    data.setdefault("name", "medssl-phantom-la-mri")
    data["description"] = f"medssl phantom la-mri (synthetic LGE-MRI left atrium, LA 2018 layout), seed {seed}"
    data.setdefault("labels", {str(k): v for k, v in LA_LABELS.items()})
    data.setdefault("spacing", f"{LA_SPACING} mm isotropic")
    return data
