"""Corrupted views for self-supervised reconstruction + contrastive pretraining.

A view is one of {in-painting, out-painting} followed by local pixel shuffling (Zhou et al., "Models Genesis",
MedIA 2021, https://arxiv.org/abs/2004.07882), built on MONAI's ``RandCoarseDropout`` / ``RandCoarseShuffle``.
:func:`ssl_two_view_transforms` copies the clean crop into a target key and two view keys and corrupts each view
with its own transform instances, so the two views are drawn independently.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import CopyItemsd, MapTransform, RandCoarseDropout, RandCoarseShuffled, RandomizableTransform

__all__ = [
    "RandInOutPaintd",
    "ssl_view_transforms",
    "ssl_two_view_transforms",
]


class RandInOutPaintd(RandomizableTransform, MapTransform):
    """In-painting or out-painting, chosen at random per call (one choice and one set of holes for all ``keys``).

    - in-painting: ``in_holes`` boxes of edge ``in_min_size..in_max_size`` are filled with uniform noise in the
      image's [min, max]; voxels outside the boxes are unchanged.
    - out-painting: ``out_holes`` boxes of edge ``out_min_size..out_max_size`` keep their voxels; everything
      outside them is replaced with uniform noise.

    Args:
        keys: keys of the (C, H, W, D) images to corrupt.
        prob: probability of corrupting at all.
        inpaint_prob: probability of in-painting (else out-painting) when corrupting.
        in_holes, in_min_size, in_max_size: in-painting boxes (recipe: 6, 5, 32).
        out_holes, out_min_size, out_max_size: out-painting boxes (recipe: 6, 20, 64).
        allow_missing_keys: skip absent keys.

    After a call, ``last_mode`` is ``"inpaint"``, ``"outpaint"`` or ``None`` and ``hole_coords`` the boxes used
    (``(slice(None), slice, slice, slice)`` tuples).
    """

    backend = RandCoarseDropout.backend

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 1.0,
        inpaint_prob: float = 0.5,
        in_holes: int = 6,
        in_min_size: Sequence[int] | int = 5,
        in_max_size: Sequence[int] | int = 32,
        out_holes: int = 6,
        out_min_size: Sequence[int] | int = 20,
        out_max_size: Sequence[int] | int = 64,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if not 0.0 <= inpaint_prob <= 1.0:
            raise ValueError(f"inpaint_prob must be in [0, 1], got {inpaint_prob}")
        self.inpaint_prob = inpaint_prob
        self.inpaint = RandCoarseDropout(
            holes=in_holes, spatial_size=in_min_size, max_spatial_size=in_max_size, dropout_holes=True, prob=1.0
        )
        self.outpaint = RandCoarseDropout(
            holes=out_holes, spatial_size=out_min_size, max_spatial_size=out_max_size, dropout_holes=False, prob=1.0
        )
        self.inpaint.set_random_state(state=self.R)
        self.outpaint.set_random_state(state=self.R)
        self.last_mode: str | None = None
        self.hole_coords: list = []

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        # the inner transforms draw from this transform's generator, so one seed fixes the whole view
        self.inpaint.set_random_state(state=self.R)
        self.outpaint.set_random_state(state=self.R)
        return self

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self._inpaint_now = self.R.rand() < self.inpaint_prob

    def __call__(self, data: Mapping[Hashable, np.ndarray]) -> dict[Hashable, np.ndarray]:
        d = dict(data)
        self.randomize()
        self.last_mode, self.hole_coords = None, []
        if not self._do_transform:
            return d
        first = self.first_key(d)
        if first == ():
            return d
        dropper = self.inpaint if self._inpaint_now else self.outpaint
        dropper.randomize(d[first].shape[1:])
        self.last_mode = "inpaint" if self._inpaint_now else "outpaint"
        self.hole_coords = list(dropper.hole_coords)
        for key in self.key_iterator(d):
            d[key] = dropper(img=d[key], randomize=False)
        return d


def ssl_view_transforms(
    key: str,
    *,
    inpaint_prob: float = 0.5,
    in_holes: int = 6,
    in_min_size: int = 5,
    in_max_size: int = 32,
    out_holes: int = 6,
    out_min_size: int = 20,
    out_max_size: int = 64,
    shuffle_prob: float = 0.8,
    shuffle_holes: int = 10,
    shuffle_size: int = 8,
) -> list:
    """One view recipe for ``key``: :class:`RandInOutPaintd` then ``RandCoarseShuffled`` (local pixel shuffle)."""
    return [
        RandInOutPaintd(
            keys=key,
            inpaint_prob=inpaint_prob,
            in_holes=in_holes,
            in_min_size=in_min_size,
            in_max_size=in_max_size,
            out_holes=out_holes,
            out_min_size=out_min_size,
            out_max_size=out_max_size,
        ),
        RandCoarseShuffled(keys=key, prob=shuffle_prob, holes=shuffle_holes, spatial_size=shuffle_size),
    ]


def ssl_two_view_transforms(
    image_key: str = "image",
    clean_key: str = "gt_image",
    second_key: str = "image_2",
    **view_kwargs,
) -> list:
    """Copy ``image_key`` to ``clean_key`` and ``second_key``, then corrupt ``image_key`` and ``second_key``.

    Each view gets its own transform instances, hence its own random draws. Append the result to a
    preprocessing chain after the random crop.

    Args:
        image_key: the clean crop on input, view 1 on output.
        clean_key: where the clean crop is kept (reconstruction target).
        second_key: view 2.
        view_kwargs: passed to :func:`ssl_view_transforms` (hole counts and sizes, probabilities).

    Example::

        chain = tcia_ssl_preprocessing() + [RandSpatialCropSamplesd(...)] + ssl_two_view_transforms()
    """
    if len({image_key, clean_key, second_key}) != 3:
        raise ValueError(f"image_key, clean_key and second_key must differ, got {(image_key, clean_key, second_key)}")
    return [
        CopyItemsd(keys=image_key, times=2, names=[clean_key, second_key]),
        *ssl_view_transforms(image_key, **view_kwargs),
        *ssl_view_transforms(second_key, **view_kwargs),
    ]
