"""Strict, reported transfer of pretrained ViT weights into UNETR (and any network with a ViT encoder)."""

from __future__ import annotations

import argparse
import logging
import math

import pytest
import torch
from monai.networks.blocks import TransformerBlock
from monai.networks.nets import ViTAutoEnc

from medssl.checkpoint import save_checkpoint
from medssl.errors import CheckpointError, ConfigError
from medssl.networks.pretrained import (
    REASON_CROSS_ATTN,
    REASON_DECODER,
    load_into_bundle,
    load_pretrained_vit,
    resample_pos_embed,
    with_pretrained_vit,
)
from medssl.networks.unetr import UNETR

VIT = {"hidden_size": 96, "mlp_dim": 192, "num_layers": 3, "num_heads": 4}
AE_CONFIG = {
    "_target_": "monai.networks.nets.ViTAutoEnc",
    "in_channels": 1,
    "img_size": [32, 32, 32],
    "patch_size": 16,
    **VIT,
}


def make_autoenc(img_size=32, proj_type="conv", seed=0, **overrides) -> ViTAutoEnc:
    torch.manual_seed(seed)
    ae = ViTAutoEnc(in_channels=1, img_size=img_size, patch_size=16, proj_type=proj_type, **{**VIT, **overrides})
    with torch.no_grad():  # LayerNorms start at 1/0: randomize every tensor so that equality means "loaded"
        for p in ae.parameters():
            p.add_(torch.randn_like(p))
    return ae


def make_unetr(img_size=32, seed=1, **overrides) -> UNETR:
    torch.manual_seed(seed)
    return UNETR(1, 2, img_size=img_size, patch_size=16, feature_size=8, **{**VIT, **overrides})


def encoder_equals_source(net: UNETR, source: dict[str, torch.Tensor], skip=()) -> list[str]:
    """Names of encoder tensors that differ from the source (empty when everything arrived)."""
    target = net.vit.state_dict()
    return [k for k, v in source.items() if k in target and k not in skip and not torch.equal(target[k], v)]


@pytest.fixture(scope="module")
def autoenc() -> ViTAutoEnc:
    return make_autoenc()


def test_autoenc_state_dict_loads_completely(autoenc, caplog):
    net = make_unetr()
    decoder_before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("vit.")}
    source = autoenc.state_dict()
    with caplog.at_level(logging.INFO, logger="medssl.networks.pretrained"):
        report = load_pretrained_vit(net, source)
    assert report.total == len(net.vit.state_dict()) == 3 + 13 * 3 + 2
    assert sorted(report.loaded) == sorted(f"vit.{k}" for k in net.vit.state_dict())
    assert not report.missing and not report.resampled and not report.not_required
    assert sorted(k for k, _ in report.skipped) == sorted(k for k in source if k.startswith("conv3d_transpose"))
    assert {r for _, r in report.skipped} == {REASON_DECODER}
    assert encoder_equals_source(net, source) == []
    # the UNETR decoder is not touched
    assert all(torch.equal(net.state_dict()[k], v) for k, v in decoder_before.items())
    assert f"loaded {report.total}/{report.total} encoder tensors (0 resampled)" in report.summary()
    assert report.summary() in caplog.text
    assert report.format().count("\n") > report.total  # the full report lists every tensor


def test_missing_block_raises_and_leaves_model_unchanged(autoenc):
    net = make_unetr()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    source = {k: v for k, v in autoenc.state_dict().items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointError, match=r"11 of 44 encoder tensors have no source: vit\.blocks\.1\."):
        load_pretrained_vit(net, source)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())


def test_allow_partial_reports_instead_of_raising(autoenc, caplog):
    net = make_unetr()
    source = {k: v for k, v in autoenc.state_dict().items() if not k.startswith("blocks.1.")}
    with caplog.at_level(logging.WARNING, logger="medssl.networks.pretrained"):
        report = load_pretrained_vit(net, source, allow_partial=True)
    # the block's unused cross-attention norm counts as "not required", its 11 other tensors as missing
    assert len(report.missing) == 11 and all(k.startswith("vit.blocks.1.") for k in report.missing)
    assert report.not_required == ["vit.blocks.1.norm_cross_attn.weight", "vit.blocks.1.norm_cross_attn.bias"]
    assert len(report.loaded) == report.total - 13
    assert encoder_equals_source(net, source) == []
    assert "11 missing" in report.summary() and "11 missing" in caplog.text


def test_perceptron_checkpoint_into_conv_unetr_raises():
    source = make_autoenc(proj_type="perceptron").state_dict()
    with pytest.raises(CheckpointError, match=r"perceptron embedding.*conv one.*proj_type='perceptron'"):
        load_pretrained_vit(make_unetr(), source)


def test_hidden_size_mismatch_raises():
    source = make_autoenc(hidden_size=48, mlp_dim=96).state_dict()
    with pytest.raises(CheckpointError, match=r"hidden size mismatch.*hidden_size=48.*target 96"):
        load_pretrained_vit(make_unetr(), source, allow_partial=True)


def test_ddp_prefixed_keys_load(autoenc):
    source = {f"module.{k}": v for k, v in autoenc.state_dict().items()}
    net = make_unetr()
    report = load_pretrained_vit(net, {"state_dict": source})
    assert report.complete and len(report.loaded) == report.total
    assert encoder_equals_source(net, autoenc.state_dict()) == []


def test_monai_13_checkpoint_without_cross_attention_keys(autoenc):
    """MONAI <= 1.3 had no norm_cross_attn: those (unused) norms are 'not required' and keep their init."""
    source = {k: v for k, v in autoenc.state_dict().items() if "cross_attn" not in k}
    net = make_unetr()
    report = load_pretrained_vit(net, source)
    assert sorted(report.not_required) == sorted(
        f"vit.blocks.{i}.norm_cross_attn.{p}" for i in range(3) for p in ("weight", "bias")
    )
    assert not report.missing and len(report.loaded) == report.total - 6
    assert encoder_equals_source(net, source) == []
    assert torch.equal(net.vit.blocks[0].norm_cross_attn.weight, torch.ones(96))
    assert "6 not required" in report.summary()


def test_monai_14_stale_cross_attention_weights_are_skipped(autoenc):
    source = dict(autoenc.state_dict())
    cross = TransformerBlock(96, 192, 4, with_cross_attention=True).state_dict()
    for i in range(3):
        source.update({f"blocks.{i}.{k}": v for k, v in cross.items() if k.startswith("cross_attn.")})
    n_cross = 3 * sum(k.startswith("cross_attn.") for k in cross)
    assert n_cross > 0
    report = load_pretrained_vit(make_unetr(), source)
    assert sum(r == REASON_CROSS_ATTN for _, r in report.skipped) == n_cross
    assert report.complete


def test_cross_attention_target_requires_its_weights(autoenc):
    """With cross-attention on in the target, the norm and attention are required, so a 1.3 checkpoint fails."""
    net = make_unetr()
    blk = net.vit.blocks[0]
    blk.with_cross_attention = True
    blk.cross_attn = TransformerBlock(96, 192, 4, with_cross_attention=True).cross_attn
    source = {k: v for k, v in autoenc.state_dict().items() if "cross_attn" not in k}
    with pytest.raises(CheckpointError, match=r"vit\.blocks\.0\.(norm_)?cross_attn"):
        load_pretrained_vit(net, source)


def test_medssl_checkpoint_file_loads(autoenc, tmp_path):
    path = save_checkpoint(tmp_path / "model.pt", network=AE_CONFIG, state_dict=autoenc.state_dict(), stage="ssl")
    net = make_unetr()
    report = load_pretrained_vit(net, path)
    assert report.source == str(path) and report.complete
    assert encoder_equals_source(net, autoenc.state_dict()) == []


def test_plain_state_dict_file_and_unetr_checkpoint_load(autoenc, tmp_path):
    torch.save({"epoch": 3, "state_dict": autoenc.state_dict()}, tmp_path / "sd.pt")
    first = make_unetr()
    assert load_pretrained_vit(first, tmp_path / "sd.pt").complete
    # a fine-tuned UNETR's full state dict: the encoder arrives, its decoder is skipped
    second = make_unetr(seed=5)
    report = load_pretrained_vit(second, first.state_dict())
    assert report.complete
    assert encoder_equals_source(second, autoenc.state_dict()) == []
    assert {r for _, r in report.skipped} == {"outside the encoder: not under 'vit.'"}


def test_deeper_source_raises_unless_partial():
    source = make_autoenc(num_layers=4).state_dict()
    with pytest.raises(CheckpointError, match=r"13 source encoder tensors have no place.*blocks\.3\."):
        load_pretrained_vit(make_unetr(), source)
    report = load_pretrained_vit(make_unetr(), source, allow_partial=True)
    assert len(report.unexpected) == 13 and not report.missing


def test_unsafe_pickle_is_refused(tmp_path):
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": argparse.Namespace(a=1)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_pretrained_vit(make_unetr(), tmp_path / "evil.pt")


def test_position_embeddings_resampled_to_new_grid(autoenc):
    """32^3 pretraining roi (2x2x2 tokens) -> 64^3 fine-tuning roi (4x4x4 tokens)."""
    source = dict(autoenc.state_dict())
    constant = torch.linspace(-1, 1, 96).expand(1, 8, 96).clone()  # the same vector at every token
    source["patch_embedding.position_embeddings"] = constant
    net = make_unetr(img_size=64)
    report = load_pretrained_vit(net, source)
    assert report.resampled == [("vit.patch_embedding.position_embeddings", (1, 8, 96), (1, 64, 96))]
    assert "1 resampled" in report.summary()
    pos = net.vit.patch_embedding.position_embeddings
    assert pos.shape == (1, 64, 96)
    torch.testing.assert_close(pos, constant[:, :1].expand(1, 64, 96))
    skip = {"patch_embedding.position_embeddings"}
    assert encoder_equals_source(net, source, skip=skip) == []


def test_resample_follows_token_order():
    """A field varying along the first grid axis only keeps that structure (tokens are row-major h, w, d)."""
    grid = (4, 2, 2)
    i = torch.arange(4.0).view(4, 1, 1).expand(grid)
    pos = torch.stack([i, -i], dim=-1).reshape(1, 16, 2)
    out = resample_pos_embed(pos, grid, (2, 2, 2)).reshape(2, 2, 2, 2)
    assert torch.allclose(out[0], out[0, :1, :1].expand(2, 2, 2))  # constant within the first plane
    assert (out[1, ..., 0] > out[0, ..., 0]).all()  # increasing along axis 0
    torch.testing.assert_close(resample_pos_embed(pos, grid, grid), pos)  # same grid: identity
    torch.testing.assert_close(out[..., 0].mean(), i.mean())


def test_non_cubic_source_grid_from_medssl_network_config(tmp_path):
    ae = make_autoenc(img_size=(64, 32, 32))
    config = {**AE_CONFIG, "img_size": [64, 32, 32]}
    path = save_checkpoint(tmp_path / "m.pt", network=config, state_dict=ae.state_dict(), stage="ssl")
    report = load_pretrained_vit(make_unetr(img_size=32), path)
    assert report.resampled == [("vit.patch_embedding.position_embeddings", (1, 16, 96), (1, 8, 96))]
    with pytest.raises(CheckpointError, match=r"cannot infer the token grid of 16 position embeddings"):
        load_pretrained_vit(make_unetr(img_size=32), ae.state_dict())  # no config: 16 tokens is not a cube


def test_other_sources_raise_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained_vit(make_unetr(), tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match=r"non-tensor entries: \[.epoch., .model.\]"):
        load_pretrained_vit(make_unetr(), {"epoch": 3, "model": {}})


BUNDLE = """
roi: 32
network_def:
  _target_: medssl.networks.unetr.UNETR
  in_channels: 1
  out_channels: 2
  img_size: "@roi"
  patch_size: 16
  feature_size: 8
  hidden_size: 96
  mlp_dim: 192
  num_layers: 3
  num_heads: 4
"""


def test_load_into_bundle_and_inspect_cli(autoenc, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "model.pt", network=AE_CONFIG, state_dict=autoenc.state_dict(), stage="ssl")
    bundle = tmp_path / "bundle.yaml"
    bundle.write_text(BUNDLE)
    report = load_into_bundle(ckpt, bundle)
    assert report.complete and report.total == 44
    callable_bundle = tmp_path / "callable.yaml"  # the `_mode_: callable` style of the training bundles
    callable_bundle.write_text(
        BUNDLE.replace(
            "  _target_: medssl.networks.unetr.UNETR\n", "  _target_: medssl.networks.unetr.UNETR\n  _mode_: callable\n"
        )
    )
    assert "_mode_: callable" in callable_bundle.read_text()
    assert load_into_bundle(ckpt, callable_bundle).complete
    overlay = tmp_path / "big.yaml"
    overlay.write_text("roi: 64\n")
    assert len(load_into_bundle(ckpt, [bundle, overlay]).resampled) == 1

    from medssl.cli import main

    assert main(["inspect", str(ckpt), "--into", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "stage:" in out and "loaded 44/44 encoder tensors" in out and "vit.blocks.2.norm2.bias" in out


def test_load_into_bundle_errors(autoenc, tmp_path):
    ckpt = save_checkpoint(tmp_path / "model.pt", network=AE_CONFIG, state_dict=autoenc.state_dict(), stage="ssl")
    with pytest.raises(ConfigError, match="does not exist"):
        load_into_bundle(ckpt, tmp_path / "missing.yaml")
    (tmp_path / "none.yaml").write_text("roi: 32\n")
    with pytest.raises(ConfigError, match="no 'network_def'"):
        load_into_bundle(ckpt, tmp_path / "none.yaml")
    (tmp_path / "vnet.yaml").write_text("network_def:\n  _target_: medssl.networks.vnet.VNet\n  normalization: none\n")
    with pytest.raises(ConfigError, match="VNet has no ViT encoder"):
        load_into_bundle(ckpt, tmp_path / "vnet.yaml")
    (tmp_path / "bad.yaml").write_text(BUNDLE.replace("patch_size: 16", "patch_size: 12"))
    with pytest.raises(ConfigError, match=r"bad\.yaml#network_def: cannot build"):
        load_into_bundle(ckpt, tmp_path / "bad.yaml")


def test_report_counts_match_vit_b():
    """The ViT-B/16 encoder of the published BTCV UNETR has 161 tensors (the count quoted in the issue)."""
    with torch.device("meta"):  # shapes only: no memory, no init cost
        net = UNETR(1, 14, img_size=96, patch_size=16, num_layers=12, hidden_size=768, mlp_dim=3072, num_heads=12)
    assert len(net.vit.state_dict()) == 161
    assert math.prod(net.feat_size) == 216


def test_with_pretrained_vit_returns_the_network(autoenc, tmp_path):
    net = make_unetr()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert with_pretrained_vit(net, None) is net and with_pretrained_vit(net, "") is net
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    path = save_checkpoint(tmp_path / "model.pt", network=AE_CONFIG, state_dict=autoenc.state_dict(), stage="ssl")
    assert with_pretrained_vit(net, str(path)) is net
    assert encoder_equals_source(net, autoenc.state_dict()) == []
