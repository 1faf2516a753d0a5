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

Modules: :mod:`~medssl.data.phantoms.common` (canvas, warps, rendering, writers), :mod:`~.ct_abdomen`,
:mod:`~.la_mri` (one per phantom, each with its dataset writer), :mod:`~.generate` (a dataset on disk, atomically),
:mod:`~.baseline` (the intensity-threshold lower bound).
"""

from medssl.data.phantoms.baseline import intensity_threshold_baseline
from medssl.data.phantoms.ct_abdomen import BTCV_LABELS, CT_DEFAULT_SHAPE, make_ct_abdomen, organ_subset
from medssl.data.phantoms.generate import PHANTOM_KINDS, ensure_phantom, generate_phantom_dataset
from medssl.data.phantoms.la_mri import LA_DEFAULT_SHAPE, LA_LABELS, la_case_id, make_la_mri

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
