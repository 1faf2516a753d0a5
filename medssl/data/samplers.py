"""Batches that mix labeled and unlabeled cases, for semi-supervised training (Mean Teacher, UA-MT).

Every batch holds ``labeled_batch_size`` labeled indices first, then ``batch_size - labeled_batch_size``
unlabeled ones. Labeled indices are visited once per epoch in a shuffled order; the unlabeled stream never
restarts: it is an endless chain of shuffled passes over the unlabeled indices, and epoch ``e`` takes the
``e``-th slice of that chain. Both orders are a pure function of ``(seed, epoch)``, so ``set_epoch`` makes
every epoch reproducible and a resumed run sees exactly the batches an uninterrupted run would have seen.

The idea of the two-stream batch comes from Tarvainen & Valpola, "Mean teachers are better role models"
(NeurIPS 2017, https://arxiv.org/abs/1703.01780) and its reuse in UA-MT (Yu et al., MICCAI 2019,
https://arxiv.org/abs/1907.07034). The published sampler restarts the unlabeled iterator every epoch and takes
its indices from hard-coded ranges; here indices come from the datalist (:func:`two_stream_items`).

Unlabeled cases have no label file. :class:`TwoStreamCollate` gives them a constant placeholder label
(``-1`` everywhere, shaped like the image) when the batch is collated, so a batch stays one dict of tensors;
:class:`~medssl.engines.mean_teacher.MeanTeacherTrainer` never reads labels past the labeled part and refuses a
labeled part that contains the placeholder.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from medssl.errors import DataError

__all__ = [
    "PLACEHOLDER_LABEL",
    "TwoStreamBatchSampler",
    "DistributedTwoStreamBatchSampler",
    "two_stream_items",
    "TwoStreamCollate",
]

PLACEHOLDER_LABEL = -1
"""Value of every voxel of the label given to unlabeled cases by :class:`TwoStreamCollate`."""

_LABELED, _UNLABELED = 0, 1  # stream ids mixed into the seed so the two orders are independent


def _check_indices(name: str, indices: Sequence[int]) -> np.ndarray:
    arr = np.asarray(list(indices))
    if arr.size == 0:
        raise ValueError(f"{name} is empty: a two-stream batch needs at least one index in each stream")
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a flat sequence of integer indices, got {list(indices)[:5]!r}...")
    if (arr < 0).any():
        raise ValueError(f"{name} holds negative indices, e.g. {int(arr[arr < 0][0])}")
    if len(np.unique(arr)) != arr.size:
        raise ValueError(f"{name} holds repeated indices ({arr.size - len(np.unique(arr))} duplicates)")
    return arr.astype(np.int64)


class TwoStreamBatchSampler(Sampler[list[int]]):
    """Batch sampler yielding ``labeled_batch_size`` labeled then ``batch_size - labeled_batch_size`` unlabeled indices.

    Use it as ``DataLoader(dataset, batch_sampler=sampler, collate_fn=TwoStreamCollate())``.

    One epoch is ``len(labeled_indices) // labeled_batch_size`` batches: each labeled index appears at most once
    per epoch (exactly once when the count divides evenly; the remainder is left out of that epoch, a different
    remainder each epoch). With fewer labeled indices than ``labeled_batch_size`` (one labeled scan, say), an
    epoch is one batch in which each labeled index appears ``ceil(labeled_batch_size / count)`` times or fewer
    (each fetch draws its own random crop, as ``num_samples`` crops of one volume would). The unlabeled stream
    continues across epochs, reshuffled at the start of every pass.

    Like ``DistributedSampler``, call :meth:`set_epoch` before each epoch (``MeanTeacherTrainer`` does) for
    reproducible epochs and exact resume. Without it, successive ``iter()`` calls use epochs 0, 1, 2, ...

    Args:
        labeled_indices: dataset indices of labeled cases.
        unlabeled_indices: dataset indices of unlabeled cases (disjoint from the labeled ones).
        batch_size: total batch size.
        labeled_batch_size: labeled cases per batch, ``1 <= labeled_batch_size < batch_size``.
        seed: non-negative seed of both shuffles.

    Raises:
        ValueError: empty or overlapping streams, or bad batch sizes.

    Example::

        items, lab, unlab = two_stream_items(datalist["training"], datalist["unlabeled"])
        sampler = TwoStreamBatchSampler(lab, unlab, batch_size=4, labeled_batch_size=2, seed=0)
        loader = DataLoader(Dataset(items, transform), batch_sampler=sampler, collate_fn=TwoStreamCollate())
    """

    def __init__(
        self,
        labeled_indices: Sequence[int],
        unlabeled_indices: Sequence[int],
        batch_size: int,
        labeled_batch_size: int,
        *,
        seed: int = 0,
    ) -> None:
        labeled = _check_indices("labeled_indices", labeled_indices)
        unlabeled = _check_indices("unlabeled_indices", unlabeled_indices)
        both = np.intersect1d(labeled, unlabeled)
        if both.size:
            raise ValueError(f"indices {both[:5].tolist()} are both labeled and unlabeled")
        if int(batch_size) != batch_size or batch_size < 2:
            raise ValueError(f"batch_size must be an integer >= 2 (labeled + unlabeled), got {batch_size!r}")
        if int(labeled_batch_size) != labeled_batch_size or not 1 <= labeled_batch_size < batch_size:
            raise ValueError(
                f"labeled_batch_size must be an integer in [1, batch_size - 1] = [1, {batch_size - 1}], "
                f"got {labeled_batch_size!r}"
            )
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.labeled_indices = labeled
        self.unlabeled_indices = unlabeled
        self.batch_size = int(batch_size)
        self.labeled_batch_size = int(labeled_batch_size)
        self.unlabeled_batch_size = self.batch_size - self.labeled_batch_size
        self.seed = int(seed)
        self.epoch = 0
        if len(self) < 1:
            raise ValueError(
                f"{len(self.labeled_indices)} labeled indices cannot give each rank one: an epoch would have no batch"
            )

    # the two hooks the distributed variant overrides
    def _labeled_count(self) -> int:
        return len(self.labeled_indices)

    def _labeled_for_epoch(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _LABELED, epoch])
        return self.labeled_indices[rng.permutation(len(self.labeled_indices))]

    def _unlabeled_pool(self) -> np.ndarray:
        return self.unlabeled_indices

    def _unlabeled_pass(self, pass_index: int) -> np.ndarray:
        pool = self._unlabeled_pool()
        rng = np.random.default_rng([self.seed, _UNLABELED, pass_index])
        return pool[rng.permutation(len(pool))]

    def __len__(self) -> int:
        count = self._labeled_count()
        return max(1, count // self.labeled_batch_size) if count > 0 else 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffles the next ``iter()`` produces."""
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` (pure: does not change the sampler's epoch)."""
        n_batches = len(self)
        labeled = self._labeled_for_epoch(epoch)
        if len(labeled) < self.labeled_batch_size:  # fewer labeled volumes than one batch: repeat them
            reps = -(-self.labeled_batch_size // len(labeled))
            labeled = np.concatenate([np.roll(labeled, -k) for k in range(reps)])
        labeled = labeled[: n_batches * self.labeled_batch_size]
        # the unlabeled stream is endless: epoch e reads positions [e * per_epoch, (e + 1) * per_epoch)
        per_epoch = n_batches * self.unlabeled_batch_size
        n_pool = len(self._unlabeled_pool())
        start = epoch * per_epoch
        first_pass, last_pass = start // n_pool, (start + per_epoch - 1) // n_pool
        chain = np.concatenate([self._unlabeled_pass(p) for p in range(first_pass, last_pass + 1)])
        offset = start - first_pass * n_pool
        unlabeled = chain[offset : offset + per_epoch]
        lb, ub = self.labeled_batch_size, self.unlabeled_batch_size
        return [
            labeled[i * lb : (i + 1) * lb].tolist() + unlabeled[i * ub : (i + 1) * ub].tolist()
            for i in range(n_batches)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        # computed eagerly so the epoch is fixed when the DataLoader asks for its iterator
        epoch_batches = self.batches(self.epoch)
        self.epoch += 1
        return iter(epoch_batches)


class DistributedTwoStreamBatchSampler(TwoStreamBatchSampler):
    """:class:`TwoStreamBatchSampler` for one rank of a distributed run.

    Each epoch the labeled indices are shuffled identically on every rank and cut into ``num_replicas`` disjoint,
    equally long parts (``len(labeled) // num_replicas`` each; the few left over sit out that epoch), so all
    ranks run the same number of iterations. The unlabeled indices are split once by stride
    (``unlabeled[rank::num_replicas]``); each rank cycles through its own part. ``batch_size`` and
    ``labeled_batch_size`` are per rank.

    Args:
        labeled_indices, unlabeled_indices, batch_size, labeled_batch_size, seed: as :class:`TwoStreamBatchSampler`.
        num_replicas: number of ranks; default the world size of the initialised process group, else 1.
        rank: this rank; default the rank in the process group, else 0.

    Raises:
        ValueError: as the base class, plus a rank outside ``[0, num_replicas)``, fewer unlabeled indices than
            ranks, or fewer labeled indices than ranks.
    """

    def __init__(
        self,
        labeled_indices: Sequence[int],
        unlabeled_indices: Sequence[int],
        batch_size: int,
        labeled_batch_size: int,
        *,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if initialised else 1
        if rank is None:
            rank = torch.distributed.get_rank() if initialised else 0
        if int(num_replicas) != num_replicas or num_replicas < 1:
            raise ValueError(f"num_replicas must be a positive integer, got {num_replicas!r}")
        if int(rank) != rank or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas - 1}], got {rank!r}")
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        n_unlabeled = len(list(unlabeled_indices))
        if 0 < n_unlabeled < self.num_replicas:
            raise ValueError(f"{n_unlabeled} unlabeled indices cannot give each of {self.num_replicas} ranks one")
        super().__init__(labeled_indices, unlabeled_indices, batch_size, labeled_batch_size, seed=seed)

    def _labeled_count(self) -> int:
        return len(self.labeled_indices) // self.num_replicas

    def _labeled_for_epoch(self, epoch: int) -> np.ndarray:
        shuffled = super()._labeled_for_epoch(epoch)  # same order on every rank: seeded by (seed, epoch) only
        per_rank = self._labeled_count()
        return shuffled[self.rank * per_rank : (self.rank + 1) * per_rank]

    def _unlabeled_pool(self) -> np.ndarray:
        return self.unlabeled_indices[self.rank :: self.num_replicas]


def _given(value: Any) -> bool:
    """A record field is given unless it is absent, ``None`` or an empty string / list (tensors count as given)."""
    if value is None:
        return False
    if isinstance(value, (str, list, tuple)):
        return len(value) > 0 and (not isinstance(value, str) or bool(value.strip()))
    return True


def two_stream_items(
    labeled_items: Sequence[Mapping[str, Any]],
    unlabeled_items: Sequence[Mapping[str, Any]],
    *,
    image_key: str = "image",
    label_key: str = "label",
    source: str | None = None,
) -> tuple[list[dict[str, Any]], list[int], list[int]]:
    """One dataset list from a datalist's labeled (``training``) and ``unlabeled`` items, with both index lists.

    Labeled items come first, so the same indices also address
    ``ConcatDataset([Dataset(labeled_items, labeled_transform), Dataset(unlabeled_items, unlabeled_transform)])``
    when the two streams need different transform chains (e.g. a label-guided crop for labeled cases only).
    A label given to an unlabeled item is dropped: an unlabeled case must not leak supervision.

    Args:
        labeled_items: datalist records with ``image_key`` and ``label_key``.
        unlabeled_items: datalist records with ``image_key``.
        image_key, label_key: record keys.
        source: the datalist file, named in error messages.

    Returns:
        ``(items, labeled_indices, unlabeled_indices)``.

    Raises:
        DataError: a stream is empty, a record is not a dict, lacks its image, or a labeled record lacks its label.
    """
    problems = []
    if not labeled_items:
        problems.append("no labeled items ('training' list is empty)")
    if not unlabeled_items:
        problems.append("no unlabeled items ('unlabeled' list is empty); semi-supervised training needs some")
    for stream, records, needs in (
        ("labeled", labeled_items, (image_key, label_key)),
        ("unlabeled", unlabeled_items, (image_key,)),
    ):
        for i, record in enumerate(records):
            if not isinstance(record, Mapping):
                problems.append(f"{stream} item {i} is a {type(record).__name__}, not a dict")
                continue
            missing = [k for k in needs if not _given(record.get(k))]
            if missing:
                problems.append(f"{stream} item {i} has no {missing} (keys: {sorted(record)})")
    if problems:
        raise DataError(
            source, "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        )
    items = [dict(r) for r in labeled_items] + [{k: v for k, v in r.items() if k != label_key} for r in unlabeled_items]
    n_lab = len(labeled_items)
    return items, list(range(n_lab)), list(range(n_lab, len(items)))


class TwoStreamCollate:
    """Collate function that gives records without a label a constant placeholder label, then collates as MONAI does.

    The placeholder has one channel, the image's spatial shape, the dtype of the batch's real labels (else the
    image's) and value :data:`PLACEHOLDER_LABEL`; when the image is a ``MetaTensor`` the placeholder carries a
    copy of the image's metadata, so geometry-aware code sees the same affine. Lists of records (from
    ``num_samples`` crops) are flattened as in ``monai.data.list_data_collate``.

    Args:
        image_key: key of the image, whose shape the placeholder copies.
        label_key: key of the label to fill in.
        fill_value: placeholder value; keep it outside the label range so it can never pass for a class.
    """

    def __init__(self, image_key: str = "image", label_key: str = "label", fill_value: float = PLACEHOLDER_LABEL):
        self.image_key, self.label_key, self.fill_value = image_key, label_key, fill_value

    def __call__(self, batch: Sequence[Any]) -> Any:
        from monai.data import MetaTensor, list_data_collate

        records = [r for item in batch for r in (item if isinstance(item, (list, tuple)) else [item])]
        dtype = next(
            (r[self.label_key].dtype for r in records if torch.is_tensor(r.get(self.label_key))),
            None,
        )
        filled = []
        for r in records:
            if self.label_key not in r:
                image = r.get(self.image_key)
                if not torch.is_tensor(image):
                    raise DataError(
                        None, f"cannot make a placeholder label: record has no tensor '{self.image_key}' ({sorted(r)})"
                    )
                label = torch.full((1, *image.shape[1:]), self.fill_value, dtype=dtype or image.dtype)
                if isinstance(image, MetaTensor):
                    label = MetaTensor(label, meta=dict(image.meta))
                r = {**r, self.label_key: label}
            filled.append(r)
        return list_data_collate(filled)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_key={self.image_key!r}, label_key={self.label_key!r}, fill_value={self.fill_value})"
