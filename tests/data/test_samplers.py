"""TwoStreamBatchSampler, its distributed variant, two_stream_items and TwoStreamCollate."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from medssl.data.samplers import (
    PLACEHOLDER_LABEL,
    DistributedTwoStreamBatchSampler,
    TwoStreamBatchSampler,
    TwoStreamCollate,
    two_stream_items,
)
from medssl.errors import DataError

LABELED = list(range(100, 108))  # 8 labeled, deliberately not 0..n so positions and indices differ
UNLABELED = list(range(200, 213))  # 13 unlabeled: not a multiple of anything used below


def _sampler(**kw):
    args = dict(labeled_indices=LABELED, unlabeled_indices=UNLABELED, batch_size=5, labeled_batch_size=2, seed=3)
    args.update(kw)
    return TwoStreamBatchSampler(**args)


def test_batch_composition_and_epoch_length():
    sampler = _sampler()
    batches = list(sampler)
    assert len(sampler) == len(batches) == 8 // 2
    for b in batches:
        assert len(b) == 5
        assert set(b[:2]) <= set(LABELED)
        assert set(b[2:]) <= set(UNLABELED)


@pytest.mark.parametrize("n_labeled, lbs", [(8, 2), (9, 2), (7, 3)])
def test_labeled_once_per_epoch(n_labeled, lbs):
    sampler = TwoStreamBatchSampler(list(range(n_labeled)), [50, 51], lbs + 2, lbs, seed=0)
    for epoch in range(4):
        counts = Counter(i for b in sampler.batches(epoch) for i in b[:lbs])
        assert max(counts.values()) == 1
        assert len(counts) == (n_labeled // lbs) * lbs  # the remainder sits out this epoch
    # the left-out remainder changes between epochs, so over several epochs every case is seen
    seen = {i for e in range(6) for b in sampler.batches(e) for i in b[:lbs]}
    assert seen == set(range(n_labeled))


def test_labeled_order_is_shuffled_and_reshuffled():
    sampler = _sampler()
    orders = [tuple(i for b in sampler.batches(e) for i in b[:2]) for e in range(4)]
    assert len(set(orders)) > 1
    assert all(sorted(o) == LABELED for o in orders)


def test_unlabeled_stream_cycles_across_epochs():
    sampler = _sampler()  # 4 batches x 3 unlabeled = 12 per epoch, 13 in a pass
    stream = [i for e in range(6) for b in sampler.batches(e) for i in b[2:]]
    assert len(stream) == 72
    passes = [stream[k : k + 13] for k in range(0, 65, 13)]
    # pass boundaries fall every 13 positions, not at epoch starts: the stream continues instead of restarting
    for p in passes:
        assert sorted(p) == UNLABELED
    assert len({tuple(p) for p in passes}) > 1  # reshuffled each pass


def test_deterministic_by_seed_and_epoch_and_resume():
    a, b = _sampler(), _sampler()
    assert list(a) == list(b)  # same seed, epoch 0
    assert list(a) == b.batches(1)  # iter() advanced a to epoch 1
    b.set_epoch(5)
    assert list(b) == _sampler().batches(5)  # a fresh sampler (resume) reproduces epoch 5 exactly
    assert _sampler(seed=4).batches(0) != _sampler(seed=3).batches(0)


def test_dataloader_batches():
    dataset = list(range(300))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=_sampler())
    batches = [x.tolist() for x in loader]
    assert batches == _sampler().batches(0)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(labeled_indices=[]), "labeled_indices is empty"),
        (dict(unlabeled_indices=[]), "unlabeled_indices is empty"),
        (dict(batch_size=1, labeled_batch_size=1), "batch_size must be an integer >= 2"),
        (dict(labeled_batch_size=5), r"labeled_batch_size must be .* got 5"),
        (dict(labeled_batch_size=0), "got 0"),
        (dict(labeled_indices=[100, 200]), r"\[200\] are both labeled and unlabeled"),
        (dict(labeled_indices=[1, 1, 2]), "repeated"),
        (dict(seed=-1), "seed must be"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        _sampler(**kw)


@pytest.mark.parametrize("replicas", [2, 4])
def test_distributed_partition(replicas):
    samplers = [
        DistributedTwoStreamBatchSampler(LABELED, UNLABELED, 3, 1, seed=1, num_replicas=replicas, rank=r)
        for r in range(replicas)
    ]
    assert len({len(s) for s in samplers}) == 1  # equal epoch length on every rank
    assert len(samplers[0]) == 8 // replicas
    for epoch in range(3):
        per_rank = [[i for b in s.batches(epoch) for i in b[:1]] for s in samplers]
        union = [i for part in per_rank for i in part]
        assert sorted(union) == LABELED  # disjoint and covering (8 divides evenly)
    unlabeled_pools = [set(i for e in range(4) for b in s.batches(e) for i in b[1:]) for s in samplers]
    assert sum(len(p) for p in unlabeled_pools) == len(UNLABELED)
    assert set().union(*unlabeled_pools) == set(UNLABELED)


def test_distributed_uneven_counts_and_errors():
    samplers = [
        DistributedTwoStreamBatchSampler(list(range(7)), [20, 21, 22], 2, 1, num_replicas=3, rank=r) for r in range(3)
    ]
    assert [len(s) for s in samplers] == [2, 2, 2]
    parts = [{i for b in s.batches(0) for i in b[:1]} for s in samplers]
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == 6
    with pytest.raises(ValueError, match=r"rank must be in \[0, 1\], got 2"):
        DistributedTwoStreamBatchSampler(LABELED, UNLABELED, 3, 1, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="2 unlabeled indices cannot give each of 3 ranks"):
        DistributedTwoStreamBatchSampler(LABELED, [1000, 1001], 3, 1, num_replicas=3, rank=0)
    single = DistributedTwoStreamBatchSampler(LABELED, UNLABELED, 5, 2, seed=3)  # no process group: one rank
    assert single.batches(2) == _sampler().batches(2)


def test_two_stream_items():
    labeled = [{"image": f"l{i}.nii.gz", "label": f"l{i}_seg.nii.gz"} for i in range(3)]
    unlabeled = [{"image": "u0.nii.gz", "label": "leak.nii.gz"}, {"image": "u1.nii.gz"}]
    items, lab, unlab = two_stream_items(labeled, unlabeled)
    assert [items[i]["image"] for i in lab] == ["l0.nii.gz", "l1.nii.gz", "l2.nii.gz"]
    assert [items[i]["image"] for i in unlab] == ["u0.nii.gz", "u1.nii.gz"]
    assert all("label" not in items[i] for i in unlab)  # a label on an unlabeled case is not used
    assert unlabeled[0]["label"] == "leak.nii.gz"  # inputs are not modified


def test_two_stream_items_errors():
    with pytest.raises(DataError, match=r"splits.json: .*no unlabeled items"):
        two_stream_items([{"image": "a", "label": "b"}], [], source="splits.json")
    with pytest.raises(DataError, match=r"labeled item 1 has no \['label'\]"):
        two_stream_items([{"image": "a", "label": "b"}, {"image": "c"}], [{"image": "u"}])


def test_collate_fills_placeholder_labels():
    from monai.data import MetaTensor

    affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0]))
    image = MetaTensor(torch.rand(1, 4, 5, 6), affine=affine)
    labeled = {"image": image, "label": MetaTensor(torch.ones(1, 4, 5, 6), affine=affine)}
    unlabeled = [{"image": MetaTensor(torch.rand(1, 4, 5, 6), affine=affine)} for _ in range(2)]
    batch = TwoStreamCollate()([labeled, unlabeled])  # a list stands for num_samples crops of one case
    assert batch["image"].shape == (3, 1, 4, 5, 6)
    assert batch["label"].shape == (3, 1, 4, 5, 6)
    assert torch.all(batch["label"][0] == 1)
    assert torch.all(batch["label"][1:] == PLACEHOLDER_LABEL)
    assert torch.allclose(batch["label"].affine[2], affine.double())
    with pytest.raises(DataError, match="no tensor 'image'"):
        TwoStreamCollate()([{"img": torch.zeros(1, 2, 2, 2)}])


def test_fewer_labeled_indices_than_a_batch_repeat_them_in_one_batch_per_epoch():
    # one labeled scan, 2 labeled slots per batch: every batch holds that scan twice, then unlabeled indices
    sampler = TwoStreamBatchSampler([7], [0, 1, 2, 3], batch_size=4, labeled_batch_size=2, seed=0)
    assert len(sampler) == 1
    for epoch in range(3):
        (batch,) = sampler.batches(epoch)
        assert batch[:2] == [7, 7]
        assert set(batch[2:]) <= {0, 1, 2, 3} and len(batch) == 4
    # two labeled scans, 3 slots: both appear, neither more than twice
    (batch,) = TwoStreamBatchSampler([5, 6], [0, 1], batch_size=4, labeled_batch_size=3, seed=1).batches(0)
    assert sorted(batch[:3]) in ([5, 5, 6], [5, 6, 6])
