"""The linear probe and the reconstruction check behind the evidence's SSL diagnosis (medssl.probe)."""

from __future__ import annotations

import itertools

import pytest
import torch

from medssl.probe import _dice, fit_linear_probe, patch_fractions, vit_tokens


def test_patch_fractions_match_a_per_patch_count():
    gen = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (4, 8, 6), generator=gen)
    label[:, :, 4:] = -1  # padding
    frac, voxels = patch_fractions(label, 2, 3)
    assert frac.shape == (2 * 4 * 3, 3)
    for t, (z, y, x) in enumerate(itertools.product(range(2), range(4), range(3))):
        block = label[2 * z : 2 * z + 2, 2 * y : 2 * y + 2, 2 * x : 2 * x + 2].reshape(-1)
        valid = block[block >= 0]
        assert voxels[t] == valid.numel()
        for c in range(3):
            expected = (valid == c).float().mean() if valid.numel() else torch.tensor(0.0)
            assert frac[t, c] == pytest.approx(float(expected))


def test_patch_fractions_refuse_an_indivisible_shape():
    with pytest.raises(ValueError, match="not divisible"):
        patch_fractions(torch.zeros(4, 4, 5, dtype=torch.long), 2, 2)


def test_dice_from_fractions_equals_voxel_dice():
    # two tokens of 8 voxels: token 0 is 6/8 class 1, token 1 is 2/8 class 1; predicting class 1 for token 0 only
    frac = torch.tensor([[0.25, 0.75], [0.75, 0.25]])
    voxels = torch.tensor([8.0, 8.0])
    dice = _dice(torch.tensor([1, 0]), frac, voxels)
    # voxel view: predicted class-1 voxels 8, true 8, overlap 6
    assert dice[1] == pytest.approx(2 * 6 / (8 + 8))
    assert dice[0] == pytest.approx(2 * 6 / (8 + 8))


def _tokens(n: int, informative: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = torch.randn(n, 8, generator=gen)
    if informative:
        x[:, :3] += 3.0 * torch.nn.functional.one_hot(y, 3).float()
    return x, torch.nn.functional.one_hot(y, 3).float(), torch.full((n,), 8.0)


@pytest.mark.parametrize("informative,low,high", [(True, 0.9, 1.0), (False, 0.0, 0.6)])
def test_probe_separates_informative_from_random_features(informative, low, high):
    xtr, ftr, ntr = _tokens(600, informative, 0)
    xte, fte, nte = _tokens(300, informative, 1)
    r = fit_linear_probe(xtr, ftr, ntr, xte, fte, nte, steps=200)
    assert low <= r["mean_dice"] <= high
    assert set(r["dice"]) == {0, 1, 2}


def test_vit_tokens_give_the_embedding_and_every_block():
    from monai.networks.nets import ViTAutoEnc

    net = ViTAutoEnc(1, img_size=16, patch_size=4, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    out = vit_tokens(net, x)
    assert [tuple(t.shape) for t in out] == [(2, 64, 32)] * 3
    with torch.no_grad():
        _, hidden = net(x)
    torch.testing.assert_close(out[1], hidden[0])
    torch.testing.assert_close(out[2], net.norm(hidden[1]))


def test_reconstruction_check_is_deterministic_and_counts_crops(ct_phantom, tmp_path):
    from monai.networks.nets import ViTAutoEnc

    from medssl.checkpoint import make_checkpoint, save_checkpoint
    from medssl.data.datalist import load_datalist
    from medssl.probe import reconstruction_check
    from medssl.transforms.presets import preprocessing_summary

    cfg = {"in_channels": 1, "img_size": [16, 16, 16], "patch_size": 4, "hidden_size": 32, "mlp_dim": 64,
           "num_layers": 1, "num_heads": 4}  # fmt: skip
    torch.manual_seed(0)
    net = ViTAutoEnc(**cfg)
    pre = preprocessing_summary(spacing=(3.0, 3.0, 4.0), a_min=-57.0, a_max=164.0, roi_size=(16, 16, 16))
    path = save_checkpoint(
        tmp_path / "ssl.pt",
        **make_checkpoint(
            network={"_target_": "monai.networks.nets.ViTAutoEnc", **cfg},
            state_dict=net.state_dict(),
            stage="ssl",
            preprocessing=pre,
        ),
    )
    records = load_datalist(ct_phantom, keys=["training"]).data["training"][:2]
    views = dict(in_min_size=2, in_max_size=6, out_min_size=4, out_max_size=10, shuffle_size=2)
    a = reconstruction_check(path, records, views, crops_per_volume=2, seed=3)
    b = reconstruction_check(path, records, views, crops_per_volume=2, seed=3)
    c = reconstruction_check(path, records, views, crops_per_volume=2, seed=4)
    assert a == b and a["crops"] == 4
    assert a["identity"] != c["identity"]  # other crops and views
    assert all(0.0 < a[k] < 1.0 for k in ("model", "identity", "mean"))


def test_encoder_names_stay_unique():
    from medssl.probe import encoder_names

    assert encoder_names(["a/x.pt", "b/x.pt", "c/y.pt"]) == ["a/x.pt", "b/x.pt", "y.pt"]


def test_patch_oracle_is_perfect_on_patch_aligned_labels_and_not_otherwise():
    from medssl.probe import patch_oracle

    label = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    label[0, :4, :4, :4] = 1  # one whole 4^3 patch
    image = torch.zeros(1, 8, 8, 8)
    aligned = patch_oracle([(image, label), (image, label)], 1, roi=[8, 8, 8], patch=4, num_classes=2)
    assert aligned["mean_dice"] == pytest.approx(1.0)
    shifted = torch.zeros_like(label)
    shifted[0, 1:5, 1:5, 1:5] = 1  # straddles 8 patches, none of them majority organ
    off = patch_oracle([(image, label), (image, shifted)], 1, roi=[8, 8, 8], patch=4, num_classes=2)
    assert off["mean_dice"] == pytest.approx(0.0)
