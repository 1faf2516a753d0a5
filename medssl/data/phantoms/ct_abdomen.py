"""The contrast CT abdomen phantom: the 13 BTCV organs among look-alike tissue, and its dataset writer."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from medssl.data.phantoms.common import (
    Canvas,
    centred_affine,
    check_seed,
    check_shape,
    jittered,
    render_tissues,
    scaled,
    tissue_index,
    validation_count,
    write_nifti,
)
from medssl.errors import ConfigError

__all__ = ["BTCV_LABELS", "CT_DEFAULT_SHAPE", "CT_MIN_SHAPE", "make_ct_abdomen", "organ_subset", "write_ct_dataset"]

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
CT_DEFAULT_SHAPE = (160, 160, 64)
CT_MIN_SHAPE = (48, 48, 24)

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


_CT = tissue_index(_CT_TISSUES)


def _ct_anatomy(c: Canvas, rng: np.random.Generator, cavity: np.ndarray) -> None:
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
        box, q = c.ellipsoid(jittered(rng, (0.5 * side, -0.25, 1.25), 0.03), scaled(rng, (0.42, 0.45, 0.5)))
        c.paint(box, q <= 1, t["lung"], 0, cavity)
    # paraspinal and psoas muscles
    for side in (-1, 1):
        box, q = c.capsule([(0.2 * side, -0.66, -1.3), (0.2 * side, -0.66, 1.3)], (0.15, 0.1, 0.2))
        c.paint(box, q <= 1, t["muscle"])
        box, q = c.capsule(
            [(0.12 * side, -0.42, 0.1), (0.2 * side, -0.32, -1.3)], scaled(rng, (0.08, 0.07, 0.1)), minvox=1.0
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
        box, q = c.capsule(pts, scaled(rng, (0.08, 0.08, 0.16), 0.75, 1.25))
        c.paint(box, q <= 1, t["bowel wall"], 0, cavity)
        lumen = rng.choice(["bowel fluid", "bowel contrast", "gas", "bowel wall"], p=[0.35, 0.25, 0.2, 0.2])
        if box is not None:
            c.paint(box, q <= 0.45, t[lumen], 0, cavity)

    # liver: right lobe + left lobe, intrahepatic vessels keep the liver label
    liver_c = jittered(rng, (0.42, 0.05, 0.45), 0.03)
    box, q = organ(c.ellipsoid(liver_c, scaled(rng, (0.4, 0.45, 0.5)), rng.uniform(-0.15, 0.15)), "liver", 6)
    organ(c.ellipsoid(jittered(rng, (0.02, 0.3, 0.56), 0.03), scaled(rng, (0.32, 0.2, 0.26)), 0.2), "liver", 6)
    hilum = jittered(rng, (0.3, 0.0, 0.38), 0.02)
    ivc_top = np.array((0.13, -0.2, 0.8), dtype=np.float32)
    liver_mask = c.label == 6
    for end in ((0.62, 0.2, 0.5), (0.35, 0.35, 0.62), (0.0, 0.3, 0.62)):
        box, q = c.capsule([jittered(rng, end, 0.03), ivc_top], (0.03, 0.03, 0.06), minvox=1.0)
        c.paint(box, q <= 1, t["liver vessel"], 6, liver_mask)
    for end in ((0.6, 0.0, 0.28), (0.35, 0.22, 0.58)):
        box, q = c.capsule([hilum, jittered(rng, end, 0.03)], (0.03, 0.03, 0.06), minvox=1.0)
        c.paint(box, q <= 1, t["liver vessel"], 6, liver_mask)

    organ(c.ellipsoid(jittered(rng, (-0.58, -0.28, 0.42), 0.03), scaled(rng, (0.15, 0.24, 0.28)), 0.5), "spleen", 1)
    # stomach: wall, fluid content and an anterior gas cap above an air-fluid level (the patient is supine)
    sc = jittered(rng, (-0.4, 0.22, 0.35), 0.03)
    sr = scaled(rng, (0.24, 0.24, 0.36))
    box, q = organ(c.ellipsoid(sc, sr, rng.uniform(-0.3, 0.3)), "stomach wall", 7, inner=(0.7, "stomach content"))
    if box is not None:
        level = sc[1] + sr[1] * rng.uniform(0.2, 0.6)
        c.paint(box, (q <= 0.7) & (c.coords[1][box] > level), t["gas"], 7, cavity)
    organ(c.ellipsoid(jittered(rng, (0.3, 0.3, 0.06), 0.02), scaled(rng, (0.08, 0.11, 0.16)), 0.3), "gallbladder", 4)
    for side, label, z in ((1, 2, -0.24), (-1, 3, -0.14)):
        centre = jittered(rng, (0.36 * side, -0.35, z), 0.03)
        shape_fn = c.ellipsoid(centre, scaled(rng, (0.13, 0.15, 0.3)), side * rng.uniform(0.2, 0.5))
        organ(shape_fn, "kidney cortex", label, inner=(0.45, "kidney medulla"))
    pancreas = [(0.16, 0.05, 0.0), (0.02, 0.08, 0.08), (-0.2, 0.0, 0.14), (-0.42, -0.12, 0.2)]
    pancreas = [jittered(rng, p, 0.025) for p in pancreas]
    organ(c.capsule(pancreas, scaled(rng, (0.065, 0.06, 0.1))), "pancreas", 11)
    eso = [jittered(rng, (-0.03, -0.27, 1.2), 0.02), jittered(rng, (-0.12, -0.12, 0.72), 0.02)]
    organ(c.capsule(eso, scaled(rng, (0.05, 0.045, 0.08))), "esophagus", 5)

    # unlabeled vessels (SMA, SMV, renal veins) share the contrast range of the labeled ones
    aorta_u = float(rng.uniform(-0.1, -0.04))
    for pts in (
        [(aorta_u, -0.16, 0.2), (-0.05, 0.12, -0.2), (-0.05, 0.18, -0.9)],
        [(0.05, -0.02, 0.08), (0.06, 0.15, -0.3), (0.06, 0.2, -0.9)],
        [(0.28, -0.3, -0.2), (0.13, -0.2, -0.12)],
        [(-0.28, -0.3, -0.12), (-0.05, -0.12, -0.1), (0.13, -0.2, -0.1)],
    ):
        box, q = c.capsule([jittered(rng, p, 0.015) for p in pts], (0.03, 0.03, 0.06), minvox=1.0)
        c.paint(box, q <= 1, t["vessel"], 0, cavity)
    confluence = jittered(rng, (0.05, -0.05, 0.1), 0.02)
    splenic = [confluence, pancreas[2] + np.float32([0.0, -0.08, 0.02]), jittered(rng, (-0.45, -0.2, 0.3), 0.02)]
    organ(c.capsule([confluence, jittered(rng, (0.22, 0.0, 0.3), 0.02), hilum], (0.04, 0.04, 0.07)), "portal vein", 10)
    organ(c.capsule(splenic, (0.035, 0.035, 0.07)), "portal vein", 10)
    ivc = [(0.13, -0.2, -1.3), jittered(rng, (0.13, -0.2, 0.0), 0.015), ivc_top]
    organ(c.capsule(ivc, scaled(rng, (0.065, 0.05, 0.1))), "inferior vena cava", 9)
    aorta = [(aorta_u, -0.22, -1.3), (aorta_u - 0.02, -0.2, 1.3)]
    organ(c.capsule(aorta, scaled(rng, (0.055, 0.055, 0.1), 0.9, 1.1)), "aorta", 8)
    # adrenals last: thin, above and medial to the kidneys
    organ(c.ellipsoid(jittered(rng, (0.21, -0.31, 0.2), 0.015), (0.045, 0.07, 0.12), 0.6), "adrenal", 12)
    organ(c.ellipsoid(jittered(rng, (-0.23, -0.28, 0.24), 0.015), (0.045, 0.07, 0.12), -0.6), "adrenal", 13)


def _ct_skeleton(c: Canvas, rng: np.random.Generator, rho: np.ndarray, v_centre: float) -> None:
    """Vertebrae (cortex, marrow, discs, canal, spinous process) and ribs; bone overrides everything."""
    t = _CT
    period, phase = float(rng.uniform(0.26, 0.32)), float(rng.uniform(0, 1))
    box, q = c.capsule([(0.0, -0.47, -1.3), (0.0, -0.47, 1.3)], scaled(rng, (0.13, 0.11, 0.1), 0.9, 1.1))
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
    seed, shape = check_seed(seed), check_shape("ct-abdomen", shape, CT_MIN_SHAPE)
    rng = np.random.default_rng([seed, int(case)])
    in_plane, slice_mm = round(float(rng.uniform(0.6, 0.9)), 3), round(float(rng.uniform(2.5, 5.0)), 3)
    spacing = (in_plane, in_plane, slice_mm)
    scale = (rng.uniform(0.92, 1.0), rng.uniform(0.9, 1.0), 1.0)
    c = Canvas(shape, rng, warp_amp=0.035, warp_nodes=(5, 5, 4), scale=scale)

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

    image = render_tissues(c, _CT_TISSUES, rng, texture_sigma=(1.5, 1.5, 0.7))
    image = ndimage.gaussian_filter(image, (0.6, 0.6, 0.4))
    image += np.float32(rng.uniform(8.0, 18.0)) * rng.standard_normal(shape, dtype=np.float32)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    # table position: the top slice sits 100-200 mm below the scanner isocentre's z = 0
    z_origin = -float(rng.uniform(100.0, 200.0)) - (shape[2] - 1) * slice_mm
    return image, c.label, centred_affine(shape, spacing, round(z_origin, 2))


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


def write_ct_dataset(tmp: Path, seed: int, cases: int, unlabeled: int, shape, organs=None) -> dict:
    """Write ``imagesTr/``, ``labelsTr/`` and ``imagesUn/`` NIfTI cases into ``tmp``; returns the datalist dict.

    Arguments as :func:`medssl.data.phantoms.generate_phantom_dataset` (already checked); ``organs`` keeps a
    subset of the BTCV labels (:func:`organ_subset`).
    """
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
            write_nifti(tmp / "imagesTr" / name, image, affine)
            write_nifti(tmp / "labelsTr" / name, label, affine)
            labeled.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
        else:
            write_nifti(tmp / "imagesUn" / name, image, affine)
            unlabeled_items.append({"image": f"imagesUn/{name}"})
        spacings.append(np.diag(affine)[:3])
        logger.debug("ct-abdomen case %d written in %.2f s", i, time.perf_counter() - start)
    n_val = validation_count(cases)
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
