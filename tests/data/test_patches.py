"""Organ-patch classification task and ViT token majority labels."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from medssl.data.patches import (
    crop_patch,
    extract_organ_patches,
    organ_patch_task,
    split_patch_task,
    token_majority_labels,
)
from medssl.errors import DataError


def naive_majority(label: np.ndarray, p: int, num_classes: int) -> list[int]:
    """Row-major (x, y, z) token order; ties to the smallest label."""
    h, w, d = label.shape
    out = []
    for i, j, k in itertools.product(range(h // p), range(w // p), range(d // p)):
        block = label[i * p : (i + 1) * p, j * p : (j + 1) * p, k * p : (k + 1) * p]
        counts = np.bincount(block.ravel(), minlength=num_classes)
        out.append(int(np.flatnonzero(counts == counts.max())[0]))
    return out


def test_token_majority_labels_on_a_constructed_volume():
    p = 4
    label = np.zeros((8, 12, 4), dtype=np.int64)
    label[0:4, 0:4, :] = 2  # token (0, 0, 0): all 2
    label[4:8, 4:8, 0:3] = 1  # token (1, 1, 0): 48 of 64 voxels are 1
    label[0:4, 8:12, 0:2] = 3  # token (0, 2, 0): a 32 / 32 tie of 0 and 3 -> 0
    label[4:8, 8:12, 0:3] = 3  # token (1, 2, 0): 3 wins
    got = token_majority_labels(torch.from_numpy(label)[None, None], p, 4)
    assert got.shape == (1, 6)
    assert got[0].tolist() == naive_majority(label, p, 4) == [2, 0, 0, 0, 1, 3]


def test_token_majority_labels_random_batch_matches_naive():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, size=(3, 8, 8, 12))
    got = token_majority_labels(torch.from_numpy(label), (4, 4, 4), 5)
    for b in range(3):
        assert got[b].tolist() == naive_majority(label[b], 4, 5)


def test_token_order_matches_monai_vit_patch_embedding():
    """A conv patch embedding that averages each patch returns the patch id in the same token order."""
    from monai.networks.blocks import PatchEmbeddingBlock

    p, shape = 4, (8, 12, 8)
    ids = torch.arange(np.prod([s // p for s in shape])).reshape([s // p for s in shape])
    label = ids.repeat_interleave(p, 0).repeat_interleave(p, 1).repeat_interleave(p, 2)
    embed = PatchEmbeddingBlock(1, shape, p, hidden_size=4, num_heads=1, proj_type="conv", dropout_rate=0.0)
    with torch.no_grad():
        embed.patch_embeddings.weight.fill_(1.0 / p**3)
        embed.patch_embeddings.bias.zero_()
        embed.position_embeddings.zero_()
        tokens = embed(label[None, None].float())
    want = token_majority_labels(label[None, None], p, int(ids.max()) + 1)
    assert torch.equal(tokens[0, :, 0].round().long(), want[0])


def test_token_majority_labels_bad_inputs():
    with pytest.raises(ValueError, match="not divisible"):
        token_majority_labels(torch.zeros(1, 1, 8, 8, 6, dtype=torch.long), 4, 2)
    with pytest.raises(ValueError, match="labels must be in"):
        token_majority_labels(torch.full((1, 4, 4, 4), 3), 4, 2)


def test_crop_patch_pads_outside_the_volume():
    img = np.arange(6 * 6 * 6, dtype=np.float32).reshape(6, 6, 6)
    inside = crop_patch(img, (3, 3, 3), 4)
    assert np.array_equal(inside, img[1:5, 1:5, 1:5])
    corner = crop_patch(img, (0, 0, 0), 4, fill=-1.0)
    assert np.array_equal(corner[2:, 2:, 2:], img[:2, :2, :2])
    assert (corner[:2] == -1).all() and (corner[:, :2] == -1).all()


def test_extract_organ_patches_centres_each_organ():
    img = np.zeros((32, 32, 16), dtype=np.float32)
    lab = np.zeros((32, 32, 16), dtype=np.int64)
    lab[4:10, 4:10, 4:10], img[4:10, 4:10, 4:10] = 5, 1.0
    lab[20:28, 18:26, 6:12], img[20:28, 18:26, 6:12] = 7, 2.0
    items = extract_organ_patches(img, lab, organs=(7, 5, 9), patch_size=8, samples_per_organ=3, jitter=2)
    assert [it["label"] for it in items] == [0, 0, 0, 1, 1, 1]  # organ 9 is absent
    assert [it["organ"] for it in items] == [7, 7, 7, 5, 5, 5]
    for it in items:
        assert it["image"].shape == (1, 8, 8, 8) and it["image"].dtype == np.float32
        assert it["image"][0, 4, 4, 4] == (2.0 if it["organ"] == 7 else 1.0)  # jitter 2 < half the organ
    first = items[0]["image"][0]
    assert np.array_equal(first, img[20:28, 18:26, 5:13])  # no jitter on the first sample: centroid (24, 22, 9)


def test_split_keeps_k_labeled_per_class_and_hides_the_rest():
    train = [{"image": np.zeros((1, 2, 2, 2)), "label": c} for c in (0, 1) for _ in range(5)]
    task = split_patch_task(train, train[:2], (3, 4), labeled_per_class=2, seed=1, class_names={3: "a", 4: "b"})
    assert sorted(it["label"] for it in task.labeled) == [0, 0, 1, 1]
    assert len(task.unlabeled) == 6 and all("label" not in it and "true_label" in it for it in task.unlabeled)
    assert task.class_names == {0: "a", 1: "b"} and task.num_classes == 2
    with pytest.raises(DataError, match="fewer than 6 labeled"):
        split_patch_task(train, train, (3, 4), labeled_per_class=6)


def test_organ_patch_task_on_the_phantom(ct_phantom):
    task = organ_patch_task(ct_phantom, patch_size=16, labeled_per_class=1, samples_per_organ=2, jitter=2, seed=0)
    k = task.num_classes
    assert k == 6 and task.class_names[0] == "spleen"
    assert sorted(it["label"] for it in task.labeled) == list(range(k))
    assert len(task.unlabeled) == 3 * k * 2 - k  # 3 training cases
    assert len(task.test) == 1 * k * 2  # 1 validation case
    for it in task.labeled + task.test:
        assert it["image"].shape == (1, 16, 16, 16)
        assert 0.0 <= it["image"].min() and it["image"].max() <= 1.0
    # different organs give different patches: the task is not degenerate
    means = [float(it["image"].mean()) for it in task.labeled]
    assert len({round(m, 4) for m in means}) == k


def test_phantom_patch_task_is_seeded_and_balanced():
    from medssl.data.patches import phantom_patch_task

    kw = {"shape": (64, 64, 32), "patch_size": 16, "samples_per_organ": 2, "labeled_per_class": 2}
    a, b = phantom_patch_task(2, 1, seed=4, **kw), phantom_patch_task(2, 1, seed=4, **kw)
    assert [int(x["label"]) for x in a.labeled] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert len(a.unlabeled) == 2 * 6 * 2 - 12 and len(a.test) == 6 * 2
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a.unlabeled, b.unlabeled))
    c = phantom_patch_task(2, 1, seed=5, **kw)
    assert not np.array_equal(a.test[0]["image"], c.test[0]["image"])  # another phantom seed, other cases
