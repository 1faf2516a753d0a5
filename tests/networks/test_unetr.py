"""UNETR with configurable depth and patch size: shapes, skip depths, MONAI equivalence, wiring, bad arguments."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import UNETR as MonaiUNETR

from medssl.networks.unetr import UNETR, skip_depths

TINY = {"hidden_size": 48, "mlp_dim": 96, "num_heads": 4, "feature_size": 8}


@pytest.mark.parametrize(
    "roi, patch, layers, hidden, skips",
    [
        ((32, 32, 32), 16, 4, 96, (2, 3, 4)),
        ((32, 32, 32), 8, 3, 48, (2, 3)),
        ((64, 64, 32), 16, 12, 48, (4, 7, 10)),
        ((32, 32, 16), 4, 2, 48, (2,)),
        ((32, 32, 32), 16, 2, 48, (1, 2, 2)),
    ],
)
def test_unetr_output_shape(roi, patch, layers, hidden, skips):
    net = UNETR(
        1, 3, img_size=roi, patch_size=patch, hidden_size=hidden, mlp_dim=2 * hidden, num_layers=layers, num_heads=4
    )
    assert net.skip_layers == skips
    assert net.num_stages == {4: 2, 8: 3, 16: 4}[patch]
    with torch.no_grad():
        out = net.eval()(torch.randn(2, 1, *roi))
    assert out.shape == (2, 3, *roi)
    assert torch.isfinite(out).all()


def test_skip_depths_rule():
    assert skip_depths(12, 4) == (4, 7, 10)  # MONAI's hidden_states_out[3], [6], [9]
    assert skip_depths(12, 3) == (5, 9)
    assert skip_depths(4, 4) == (2, 3, 4)
    assert skip_depths(3, 4) == (1, 2, 3)
    assert skip_depths(6, 4) == (2, 4, 5)  # floor(k*6/4) + 1: 2, 4, 5
    assert skip_depths(2, 4) == (1, 2, 2)  # too shallow for distinct skips: the deepest share the last block
    assert skip_depths(1, 4) == (1, 1, 1)
    for stages in range(1, 6):
        for layers in range(1, 25):
            d = skip_depths(layers, stages)
            assert len(d) == stages - 1
            assert all(1 <= x <= layers for x in d)
            assert all(a < b if layers >= stages - 1 else a <= b for a, b in zip(d, d[1:]))


def test_default_is_monai_unetr_weight_for_weight():
    """12 layers, patch 16, default taps: a MONAI UNETR state dict loads strictly and gives MONAI's outputs."""
    torch.manual_seed(0)
    ref = MonaiUNETR(1, 3, img_size=32, **TINY).eval()
    ours = UNETR(1, 3, img_size=32, patch_size=16, num_layers=12, **TINY).eval()
    assert ours.skip_layers == (4, 7, 10)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
        # the paper's z3/z6/z9 (an option) read other blocks, so the output must differ: the taps matter
        paper = UNETR(1, 3, img_size=32, patch_size=16, num_layers=12, skip_layers=(3, 6, 9), **TINY).eval()
        paper.load_state_dict(ref.state_dict(), strict=True)
        assert not torch.allclose(paper(x), ref(x))


def test_every_parameter_receives_gradient():
    """All decoder stages and skips are wired into the output (only the unused cross-attention norms are idle)."""
    torch.manual_seed(0)
    net = UNETR(1, 2, img_size=32, patch_size=8, num_layers=3, **TINY)
    net(torch.randn(1, 1, 32, 32, 32)).square().mean().backward()
    idle = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert idle and all("norm_cross_attn" in n for n in idle)
    assert any(n.startswith("encoder3.") for n, _ in net.named_parameters())
    assert not any(n.startswith("encoder4.") for n, _ in net.named_parameters())


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    net = UNETR(1, 2, img_size=16, patch_size=4, num_layers=2, **TINY)
    x = torch.randn(2, 1, 16, 16, 16)
    y = (x[:, 0] > 0).long()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_buildable_from_target_config():
    config = {"net": {"_target_": "medssl.networks.unetr.UNETR", "in_channels": 1, "out_channels": 2,
                      "img_size": [32, 32, 32], "patch_size": 16, "num_layers": 3, **TINY}}  # fmt: skip
    net = ConfigParser(config).get_parsed_content("net")
    assert isinstance(net, UNETR) and net.feat_size == (2, 2, 2)
    assert set(net.vit.state_dict()) >= {
        "patch_embedding.position_embeddings",
        "blocks.2.attn.qkv.weight",
        "norm.weight",
    }


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"patch_size": 12}, "power of two.*12"),
        ({"patch_size": 1}, "power of two.*1"),
        ({"patch_size": (16, 16, 8)}, "isotropic.*8"),
        ({"img_size": (32, 32, 24)}, "divisible.*24"),
        ({"num_layers": 0}, "num_layers must be >= 1, got 0"),
        ({"skip_layers": (3, 2, 1)}, r"skip_layers.*\[3, 2, 1\]"),
        ({"skip_layers": (1, 2, 5)}, r"skip_layers.*\[1, 2, 5\]"),
        ({"skip_layers": (1, 2)}, r"skip_layers.*\[1, 2\]"),
        ({"hidden_size": 50}, "hidden_size=50"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = {"img_size": 32, "patch_size": 16, "num_layers": 4, **TINY, **kwargs}
    with pytest.raises(ValueError, match=match):
        UNETR(1, 2, **args)


def test_unetr_2d():
    net = UNETR(3, 4, img_size=(64, 32), patch_size=8, num_layers=3, spatial_dims=2, **TINY).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 64, 32)).shape == (2, 4, 64, 32)
