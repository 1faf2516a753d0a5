"""Lightweight V-Net: shapes, parameter count from the published layer list, names, dropout, MONAI alternative."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from monai.bundle import ConfigParser

import medssl.networks.vnet as vnet_module
from medssl.networks.vnet import VNet

# (convolutions, channel multiplier) of each stage as described for UA-MT's V-Net
ENCODER = [(1, 1), (2, 2), (3, 4), (3, 8), (3, 16)]
DECODER = [(3, 8), (3, 4), (2, 2), (1, 1)]


def expected_parameter_count(f: int, in_ch: int, out_ch: int, norm_params_per_channel: int) -> int:
    """Count from the layer list: 3x3x3 stage convs, 2x2x2 stride-2 (transposed) convs, a 1x1x1 head; all biased."""

    def conv(c_in: int, c_out: int, k: int) -> int:
        return k**3 * c_in * c_out + c_out

    total, norm_channels = 0, 0
    for stage, (convs, mult) in enumerate(ENCODER + DECODER):
        c = f * mult
        for i in range(convs):
            total += conv(in_ch if stage == 0 and i == 0 else c, c, 3)
            norm_channels += c
    for mult in (1, 2, 4, 8):
        total += conv(f * mult, 2 * f * mult, 2) + conv(2 * f * mult, f * mult, 2)
        norm_channels += 2 * f * mult + f * mult
    total += conv(f, out_ch, 1)
    return total + norm_params_per_channel * norm_channels


@pytest.mark.parametrize(
    "normalization, per_channel", [("batchnorm", 2), ("groupnorm", 2), ("instancenorm", 0), ("none", 0)]
)
def test_vnet_parameter_count(normalization, per_channel):
    net = VNet(1, 2, 16, normalization=normalization)
    n = sum(p.numel() for p in net.parameters())
    assert n == expected_parameter_count(16, 1, 2, per_channel)
    if normalization == "batchnorm":
        assert n == 9_448_866  # "about 9.4 M", as the docstring states


@pytest.mark.parametrize("normalization", ["batchnorm", "groupnorm", "instancenorm", "none"])
@pytest.mark.parametrize("shape, out_ch", [((32, 32, 16), 2), ((16, 32, 48), 3)])
def test_vnet_output_shape(normalization, shape, out_ch):
    net = VNet(in_channels=1, out_channels=out_ch, base_filters=16, normalization=normalization).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, *shape))
    assert out.shape == (2, out_ch, *shape)
    assert torch.isfinite(out).all()


def test_vnet_published_module_names():
    sd = VNet(1, 2, normalization="batchnorm").state_dict()
    assert sd["block_one.conv.0.weight"].shape == (16, 1, 3, 3, 3)
    assert sd["block_one.conv.1.weight"].shape == (16,)  # batch norm right after the conv
    assert sd["block_five.conv.6.weight"].shape == (256, 256, 3, 3, 3)  # third conv of stage five
    assert sd["block_four_dw.conv.0.weight"].shape == (256, 128, 2, 2, 2)
    assert sd["block_five_up.conv.0.weight"].shape == (256, 128, 2, 2, 2)  # ConvTranspose3d: (in, out, k)
    assert sd["out_conv.weight"].shape == (2, 16, 1, 1, 1)
    assert "block_two.conv.2.weight" in VNet(1, 2, normalization="none").state_dict()  # conv, relu, conv


def test_vnet_dropout_only_when_enabled():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 16, 16, 16)
    net = VNet(1, 2, 16, normalization="none", has_dropout=True).train()
    assert not torch.equal(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))
    plain = VNet(1, 2, 16, normalization="none", has_dropout=False).train()
    assert torch.equal(plain(x), plain(x))


def test_vnet_skips_are_additive():
    """Zeroing the decoder's up-sampling path leaves the full-resolution skip (x1) feeding block_nine."""
    torch.manual_seed(0)
    net = VNet(1, 2, 16, normalization="none").eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        for p in net.block_eight_up.parameters():
            p.zero_()
        expected = net.out_conv(net.block_nine(net.block_one(x)))
        torch.testing.assert_close(net(x), expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"normalization": "layernorm"}, "layernorm"),
        ({"dropout_rate": 1.5}, "1.5"),
        ({"normalization": "groupnorm", "base_filters": 8}, "base_filters.*8"),
    ],
)
def test_vnet_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VNet(**kwargs)


def test_vnet_rejects_indivisible_input():
    with pytest.raises(ValueError, match=r"divisible by 16.*\(1, 1, 16, 16, 20\)"):
        VNet(normalization="none")(torch.zeros(1, 1, 16, 16, 20))


def test_documented_monai_vnet_config_builds():
    """The YAML in the module docstring selects MONAI's VNet and runs."""
    snippet = re.search(r"::\n\n(\s+network_def:.*)", vnet_module.__doc__, re.S).group(1)
    config = yaml.safe_load(snippet)
    net = ConfigParser(config).get_parsed_content("network_def")
    from monai.networks.nets import VNet as MonaiVNet

    assert isinstance(net, MonaiVNet)
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)
