"""S5CL's networks (:mod:`medssl.networks.s5cl`) and the ViT encoder they share with UNETR (:mod:`medssl.networks.vit`):
outputs of both modes, where the classifier sits, one ViT builder, and networks written before the move to
``medssl.networks`` (keys, shapes, order and outputs frozen from that code) loading strictly with the same outputs."""

from __future__ import annotations

import pytest
import torch

from medssl.checkpoint import save_checkpoint
from medssl.errors import ConfigError
from medssl.networks.s5cl import S5CLClassifier, S5CLTokenNet, s5cl_network
from medssl.networks.unetr import UNETR
from medssl.networks.vit import vit_encoder, vit_token_grid

# The state-dict layout (keys, shapes and order) the networks had before the S5CL networks moved to medssl.networks
# (commit 8707d7c, MONAI 1.6.1): checkpoints and last.pt optimizer states of that time must fit the networks built
# now (an optimizer state follows parameter order, hence the order). The shared ViT encoder first, then per network
# (prefix of the ViT tensors or "" for none, the tensors after it). "int": an integer buffer.
FROZEN_VIT = """
    patch_embedding.position_embeddings 1x8x8
    patch_embedding.patch_embeddings.weight 8x1x4x4x4
    patch_embedding.patch_embeddings.bias 8
    blocks.0.mlp.linear1.weight 16x8
    blocks.0.mlp.linear1.bias 16
    blocks.0.mlp.linear2.weight 8x16
    blocks.0.mlp.linear2.bias 8
    blocks.0.norm1.weight 8
    blocks.0.norm1.bias 8
    blocks.0.attn.out_proj.weight 8x8
    blocks.0.attn.out_proj.bias 8
    blocks.0.attn.qkv.weight 24x8
    blocks.0.norm2.weight 8
    blocks.0.norm2.bias 8
    blocks.0.norm_cross_attn.weight 8
    blocks.0.norm_cross_attn.bias 8
    norm.weight 8
    norm.bias 8
"""
FROZEN_LAYOUTS = {
    "unetr": (
        "vit.",
        """
        encoder1.layer.conv1.conv.weight 4x1x3x3x3
        encoder1.layer.conv2.conv.weight 4x4x3x3x3
        encoder1.layer.conv3.conv.weight 4x1x1x1x1
        encoder2.transp_conv_init.conv.weight 8x8x2x2x2
        decoder3.transp_conv.conv.weight 8x8x2x2x2
        decoder3.conv_block.conv1.conv.weight 8x16x3x3x3
        decoder3.conv_block.conv2.conv.weight 8x8x3x3x3
        decoder3.conv_block.conv3.conv.weight 8x16x1x1x1
        decoder2.transp_conv.conv.weight 8x4x2x2x2
        decoder2.conv_block.conv1.conv.weight 4x8x3x3x3
        decoder2.conv_block.conv2.conv.weight 4x4x3x3x3
        decoder2.conv_block.conv3.conv.weight 4x8x1x1x1
        out.conv.conv.weight 3x4x1x1x1
        out.conv.conv.bias 3
        """,
    ),
    "token_projection": (
        "vit.",
        """
        classifier.weight 3x4
        classifier.bias 3
        head.0.weight 8x8
        head.0.bias 8
        head.2.weight 4x8
        head.2.bias 4
        """,
    ),
    "token_encoder": (
        "vit.",
        """
        classifier.weight 3x8
        classifier.bias 3
        head.0.weight 8x8
        head.0.bias 8
        head.2.weight 4x8
        head.2.bias 4
        """,
    ),
    "classifier_vit": (
        "encoder.",
        """
        classifier.weight 3x4
        classifier.bias 3
        head.0.weight 8x8
        head.0.bias 8
        head.2.weight 4x8
        head.2.bias 4
        """,
    ),
    "classifier_resnet10": (
        "",
        """
        encoder.conv1.weight 4x1x3x3x3
        encoder.bn1.weight 4
        encoder.bn1.bias 4
        encoder.bn1.running_mean 4
        encoder.bn1.running_var 4
        encoder.bn1.num_batches_tracked scalar int
        encoder.layer1.0.conv1.weight 4x4x3x3x3
        encoder.layer1.0.bn1.weight 4
        encoder.layer1.0.bn1.bias 4
        encoder.layer1.0.bn1.running_mean 4
        encoder.layer1.0.bn1.running_var 4
        encoder.layer1.0.bn1.num_batches_tracked scalar int
        encoder.layer1.0.conv2.weight 4x4x3x3x3
        encoder.layer1.0.bn2.weight 4
        encoder.layer1.0.bn2.bias 4
        encoder.layer1.0.bn2.running_mean 4
        encoder.layer1.0.bn2.running_var 4
        encoder.layer1.0.bn2.num_batches_tracked scalar int
        encoder.layer2.0.conv1.weight 8x4x3x3x3
        encoder.layer2.0.bn1.weight 8
        encoder.layer2.0.bn1.bias 8
        encoder.layer2.0.bn1.running_mean 8
        encoder.layer2.0.bn1.running_var 8
        encoder.layer2.0.bn1.num_batches_tracked scalar int
        encoder.layer2.0.conv2.weight 8x8x3x3x3
        encoder.layer2.0.bn2.weight 8
        encoder.layer2.0.bn2.bias 8
        encoder.layer2.0.bn2.running_mean 8
        encoder.layer2.0.bn2.running_var 8
        encoder.layer2.0.bn2.num_batches_tracked scalar int
        encoder.layer2.0.downsample.0.weight 8x4x1x1x1
        encoder.layer2.0.downsample.0.bias 8
        encoder.layer2.0.downsample.1.weight 8
        encoder.layer2.0.downsample.1.bias 8
        encoder.layer2.0.downsample.1.running_mean 8
        encoder.layer2.0.downsample.1.running_var 8
        encoder.layer2.0.downsample.1.num_batches_tracked scalar int
        encoder.layer3.0.conv1.weight 16x8x3x3x3
        encoder.layer3.0.bn1.weight 16
        encoder.layer3.0.bn1.bias 16
        encoder.layer3.0.bn1.running_mean 16
        encoder.layer3.0.bn1.running_var 16
        encoder.layer3.0.bn1.num_batches_tracked scalar int
        encoder.layer3.0.conv2.weight 16x16x3x3x3
        encoder.layer3.0.bn2.weight 16
        encoder.layer3.0.bn2.bias 16
        encoder.layer3.0.bn2.running_mean 16
        encoder.layer3.0.bn2.running_var 16
        encoder.layer3.0.bn2.num_batches_tracked scalar int
        encoder.layer3.0.downsample.0.weight 16x8x1x1x1
        encoder.layer3.0.downsample.0.bias 16
        encoder.layer3.0.downsample.1.weight 16
        encoder.layer3.0.downsample.1.bias 16
        encoder.layer3.0.downsample.1.running_mean 16
        encoder.layer3.0.downsample.1.running_var 16
        encoder.layer3.0.downsample.1.num_batches_tracked scalar int
        encoder.layer4.0.conv1.weight 32x16x3x3x3
        encoder.layer4.0.bn1.weight 32
        encoder.layer4.0.bn1.bias 32
        encoder.layer4.0.bn1.running_mean 32
        encoder.layer4.0.bn1.running_var 32
        encoder.layer4.0.bn1.num_batches_tracked scalar int
        encoder.layer4.0.conv2.weight 32x32x3x3x3
        encoder.layer4.0.bn2.weight 32
        encoder.layer4.0.bn2.bias 32
        encoder.layer4.0.bn2.running_mean 32
        encoder.layer4.0.bn2.running_var 32
        encoder.layer4.0.bn2.num_batches_tracked scalar int
        encoder.layer4.0.downsample.0.weight 32x16x1x1x1
        encoder.layer4.0.downsample.0.bias 32
        encoder.layer4.0.downsample.1.weight 32
        encoder.layer4.0.downsample.1.bias 32
        encoder.layer4.0.downsample.1.running_mean 32
        encoder.layer4.0.downsample.1.running_var 32
        encoder.layer4.0.downsample.1.num_batches_tracked scalar int
        classifier.weight 3x32
        classifier.bias 3
        head.0.weight 32x32
        head.0.bias 32
        head.2.weight 4x32
        head.2.bias 4
        """,
    ),
}
# the outputs then (float64, eval) with the weights of _frozen_weights on _frozen_input
FROZEN_OUTPUTS = {
    "unetr": {
        "shape": (2, 3, 8, 8, 8),
        "sum": -102.43337705372517,
        "abs": 1558.9270288104744,
        "first": [0.3990425664967142, 0.459129982135085, 1.083380781288917, 0.6999048385992702],
    },
    "token_projection": {
        "shape": (2, 3, 8),
        "sum": -30.08662728866673,
        "abs": 30.08662728866673,
        "first": [-0.7240605537732113, -0.7184574898074197, -0.6798573946383539, -0.6707632995661574],
    },
    "token_encoder": {
        "shape": (2, 3, 8),
        "sum": 12.613725465606073,
        "abs": 12.613725465606073,
        "first": [0.1283977291863263, 0.15242530586431313, 0.20914141297449063, 0.12738451288953112],
    },
    "classifier_vit": {
        "shape": (2, 3),
        "sum": -3.7545784069584975,
        "abs": 3.7545784069584975,
        "first": [-0.6895093734117304, -0.26311313650236595, -0.911126047281307, -0.6982984578241577],
    },
    "classifier_resnet10": {
        "shape": (2, 3),
        "sum": -0.4011795684776084,
        "abs": 2.8164517561272073,
        "first": [0.6035381204782403, -0.5519105108038442, -0.2513047249094026, 0.6040979733465591],
    },
}

VIT = {"hidden_size": 8, "mlp_dim": 16, "num_layers": 1, "num_heads": 2}
BUILD = {
    "unetr": lambda: UNETR(1, 3, img_size=8, patch_size=4, feature_size=4, **VIT),
    "token_projection": lambda: S5CLTokenNet(
        1, 3, img_size=8, patch_size=4, proj_dim=4, classifier_on="projection", **VIT
    ),
    "token_encoder": lambda: S5CLTokenNet(1, 3, img_size=8, patch_size=4, proj_dim=4, **VIT),
    "classifier_vit": lambda: S5CLClassifier(
        3, img_size=8, encoder="vit", patch_size=4, proj_dim=4, classifier_on="projection", **VIT
    ),
    "classifier_resnet10": lambda: S5CLClassifier(
        3, img_size=8, widen_factor=0.0625, conv1_size=3, conv1_stride=2, proj_dim=4
    ),
}  # fmt: skip


def _parse(text: str, prefix: str = "") -> list[tuple[str, tuple[int, ...], str]]:
    rows = []
    for line in text.strip().splitlines():
        key, shape, *kind = line.split()
        dims = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
        rows.append((prefix + key, dims, kind[0] if kind else "float"))
    return rows


def _frozen_layout(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    prefix, after = FROZEN_LAYOUTS[name]
    return (_parse(FROZEN_VIT, prefix) if prefix else []) + _parse(after)


def _frozen_weights(layout) -> dict[str, torch.Tensor]:
    """Weights drawn from the frozen layout alone (not from the network), as the code before the move drew them."""
    g = torch.Generator().manual_seed(0)
    weights = {}
    for key, shape, kind in layout:
        if kind == "int":
            weights[key] = torch.zeros(shape, dtype=torch.long)
        else:
            w = torch.rand(shape, generator=g, dtype=torch.float64) - 0.5
            weights[key] = w + 1.0 if key.endswith("running_var") else w  # a variance is positive
    return weights


def _frozen_input() -> torch.Tensor:
    return torch.rand((2, 1, 8, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(BUILD))
def test_state_dict_layout_is_the_one_written_before_the_move(name):
    net = BUILD[name]()
    layout = [(k, tuple(v.shape), "float" if v.is_floating_point() else "int") for k, v in net.state_dict().items()]
    assert layout == _frozen_layout(name)


@pytest.mark.parametrize("name", sorted(BUILD))
def test_weights_written_before_the_move_load_strictly_with_the_same_outputs(name):
    net = BUILD[name]().double().eval()
    net.load_state_dict(_frozen_weights(_frozen_layout(name)), strict=True)
    with torch.no_grad():
        out = net(_frozen_input())
    expected = FROZEN_OUTPUTS[name]
    assert tuple(out.shape) == expected["shape"]
    assert float(out.sum()) == pytest.approx(expected["sum"], rel=1e-9, abs=1e-9)
    assert float(out.abs().sum()) == pytest.approx(expected["abs"], rel=1e-9)
    assert out.flatten()[:4].tolist() == pytest.approx(expected["first"], rel=1e-9)


def test_unetr_and_both_s5cl_networks_build_one_vit():
    """Given the same weights, UNETR's encoder, the token network's and the ViT classifier's compute bit-identical
    tokens and hidden states: one builder, one module."""
    torch.manual_seed(0)
    unetr = BUILD["unetr"]().eval()
    token, classifier = BUILD["token_projection"]().eval(), BUILD["classifier_vit"]().eval()
    token.vit.load_state_dict(unetr.vit.state_dict(), strict=True)
    classifier.encoder.load_state_dict(unetr.vit.state_dict(), strict=True)
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        tokens, hidden = unetr.vit(x)
        for vit in (token.vit, classifier.encoder):
            assert type(vit) is type(unetr.vit) and str(vit) == str(unetr.vit)
            other_tokens, other_hidden = vit(x)
            assert torch.equal(other_tokens, tokens)
            assert all(torch.equal(a, b) for a, b in zip(other_hidden, hidden, strict=True))
        # and the token network's heads read exactly those tokens
        assert torch.equal(token(x), token.classifier(token.head(tokens)).transpose(1, 2))


def test_vit_token_grid():
    assert vit_token_grid(96, 16) == ((96, 96, 96), (16, 16, 16), (6, 6, 6))
    assert vit_token_grid((64, 64, 32), 8) == ((64, 64, 32), (8, 8, 8), (8, 8, 4))
    assert vit_token_grid((64, 32), (16, 8), spatial_dims=2) == ((64, 32), (16, 8), (4, 4))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: vit_encoder(1, 16, 8, dropout_rate=1.5, **VIT), r"dropout_rate must be in \[0, 1\], got 1.5"),
        (lambda: vit_encoder(1, 16, 8, hidden_size=10, num_heads=4), "hidden_size=10 must be divisible by num_heads=4"),
        (lambda: vit_encoder(1, (16, 16, 12), 8, **VIT), r"img_size \(16, 16, 12\).*patch_size \(8, 8, 8\).*\[12\]"),
        (lambda: S5CLTokenNet(1, 3, img_size=12, patch_size=8, **VIT), r"divisible.*\[12, 12, 12\]"),
        # a patch grid that does not tile the crop: MONAI's convolution would drop the remainder without a word
        (lambda: S5CLClassifier(3, img_size=12, encoder="vit", patch_size=8, **VIT), r"divisible.*\[12, 12, 12\]"),
    ],
)  # fmt: skip
def test_vit_encoder_rejects_bad_sizes(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown mode 'detection'"):
        s5cl_network("detection", num_classes=2)


def _token_net(seed: int = 0) -> S5CLTokenNet:
    torch.manual_seed(seed)
    return S5CLTokenNet(1, 3, img_size=(8, 8, 8), patch_size=4, hidden_size=16, mlp_dim=32, num_layers=2, num_heads=2)


def test_token_net_checkpoint_loads_fully_into_unetr(tmp_path):
    from medssl.networks.pretrained import load_pretrained_vit

    net = _token_net(seed=3)
    config = {
        "_target_": "medssl.networks.s5cl.s5cl_network",
        "mode": "segmentation",
        "in_channels": 1,
        "num_classes": 3,
        "img_size": [8, 8, 8],
        "patch_size": 4,
        "hidden_size": 16,
        "mlp_dim": 32,
        "num_layers": 2,
        "num_heads": 2,
    }
    path = save_checkpoint(tmp_path / "model.pt", network=config, state_dict=net.state_dict(), stage="s5cl")
    unetr = UNETR(1, 14, img_size=8, patch_size=4, hidden_size=16, mlp_dim=32, num_layers=2, num_heads=2)
    report = load_pretrained_vit(unetr, path)
    assert report.complete and not report.missing and len(report.loaded) == report.total
    assert report.total == len(net.vit.state_dict())
    for k, v in net.vit.state_dict().items():
        assert torch.equal(unetr.vit.state_dict()[k], v), k


@pytest.mark.parametrize("encoder", ["resnet10", "vit"])
def test_classifier_outputs_for_both_encoders(encoder):
    net = s5cl_network(
        "classification",
        num_classes=4,
        img_size=8,
        encoder=encoder,
        widen_factor=0.125,
        patch_size=4,
        hidden_size=16,
        mlp_dim=32,
        num_layers=1,
        num_heads=2,
        proj_dim=8,
        tokens_per_volume=5,  # not a network argument: dropped
    )
    assert isinstance(net, S5CLClassifier) and net.num_features == (64 if encoder == "resnet10" else 16)
    x = torch.randn(3, 1, 8, 8, 8)
    out = net(x, return_embedding=True)
    assert net(x).shape == out["logits"].shape == (3, 4) and out["projection"].shape == (3, 8)
    with pytest.raises(ValueError, match="encoder must be"):
        S5CLClassifier(num_classes=4, encoder="densenet")


def _tiny(mode: str, **kw):
    """A tiny S5CL network of either mode: 64 ResNet / 16 ViT features, 8-d projections, 3 classes."""
    torch.manual_seed(0)
    sizes = {"img_size": 8, "patch_size": 4, "hidden_size": 16, "mlp_dim": 32, "num_layers": 1, "num_heads": 2}
    return s5cl_network(mode, num_classes=3, in_channels=1, widen_factor=0.125, proj_dim=8, **sizes, **kw)


@pytest.mark.parametrize("mode", ["classification", "segmentation"])
def test_reference_layout_classifier_reads_the_projection(mode):
    net = _tiny(mode, classifier_on="projection")
    assert net.classifier_on == "projection" and net.classifier.in_features == 8
    x = torch.randn(2, 1, 8, 8, 8)
    out = net(x, return_embedding=True)
    logits = net.classifier(out["projection"])
    assert torch.allclose(out["logits"], logits if mode == "classification" else logits.transpose(1, 2))


@pytest.mark.parametrize("mode, features", [("classification", 64), ("segmentation", 16)])
def test_encoder_option_restores_the_earlier_layout(mode, features):
    net = _tiny(mode, classifier_on="encoder").eval()
    assert net.classifier.in_features == features and net.head[0].in_features == features
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        encoded = net.features(x) if mode == "classification" else net.vit(x)[0]
        logits = net.classifier(encoded)
        assert torch.allclose(net(x), logits if mode == "classification" else logits.transpose(1, 2))
    # the earlier layout's tensors: a checkpoint written before the option loads strictly
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.startswith(net.encoder_attribute)}
    assert shapes == {
        "classifier.weight": (3, features),
        "classifier.bias": (3,),
        "head.0.weight": (features, features),
        "head.0.bias": (features,),
        "head.2.weight": (8, features),
        "head.2.bias": (8,),
    }
    with pytest.raises(ConfigError, match="classifier_on.*'features'"):
        _tiny(mode, classifier_on="features")
    # a network config without the option (every checkpoint written before it) rebuilds this layout
    assert _tiny(mode).classifier_on == "encoder"
