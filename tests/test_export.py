"""TorchScript export: parity with the checkpoint's network, metadata, refusals."""

from __future__ import annotations

import pytest
import torch

from medssl.checkpoint import build_network, load_checkpoint, save_checkpoint
from medssl.errors import CheckpointError
from medssl.export import export_torchscript, load_torchscript
from medssl.transforms.presets import preprocessing_summary

NETWORKS = {
    "unetr": {"_target_": "medssl.networks.unetr.UNETR", "in_channels": 1, "out_channels": 3, "img_size": [32, 32, 16],
              "patch_size": 8, "hidden_size": 32, "mlp_dim": 64, "num_layers": 2, "num_heads": 2, "feature_size": 4},
    "vnet": {"_target_": "medssl.networks.vnet.VNet", "in_channels": 1, "out_channels": 2, "base_filters": 4,
             "normalization": "batchnorm"},
}  # fmt: skip


def _checkpoint(tmp_path, kind):
    torch.manual_seed(0)
    config = NETWORKS[kind]
    net = build_network({"network": config}, load_weights=False)
    if kind == "vnet":  # non-trivial running statistics, so eval-mode batch norm is exercised
        with torch.no_grad():
            net.train()(torch.randn(2, 1, 32, 32, 16))
    roi = config.get("img_size", [32, 32, 16])
    pre = preprocessing_summary(spacing=(1.5, 1.5, 2.0), a_min=-175, a_max=250, roi_size=roi)
    labels = {str(i): f"c{i}" for i in range(config["out_channels"])}
    path = tmp_path / f"{kind}.pt"
    save_checkpoint(
        path, network=config, state_dict=net.state_dict(), stage="finetune", preprocessing=pre, labels=labels
    )
    return path


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_export_parity_and_metadata(tmp_path, kind):
    ckpt_path = _checkpoint(tmp_path, kind)
    out = export_torchscript(ckpt_path, tmp_path / "model.ts")
    module, meta = load_torchscript(out)
    ckpt = load_checkpoint(ckpt_path)
    net = build_network(ckpt).eval()
    x = torch.randn(2, 1, *meta["roi_size"])
    with torch.no_grad():
        expected, got = net(x), module(x)
    assert got.shape == expected.shape == (2, ckpt["network"]["out_channels"], *meta["roi_size"])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert meta["labels"] == ckpt["labels"]
    assert meta["preprocessing"] == ckpt["preprocessing"]
    assert meta["network"] == ckpt["network"]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temporary file


def test_export_refuses_to_overwrite_checkpoint(tmp_path):
    ckpt_path = _checkpoint(tmp_path, "unetr")
    before = ckpt_path.read_bytes()
    with pytest.raises(CheckpointError, match="overwrite"):
        export_torchscript(ckpt_path, ckpt_path)
    assert ckpt_path.read_bytes() == before


def test_export_missing_roi_and_bad_files(tmp_path):
    config = dict(NETWORKS["vnet"])
    net = build_network({"network": config}, load_weights=False)
    path = tmp_path / "noroi.pt"
    save_checkpoint(path, network=config, state_dict=net.state_dict(), stage="finetune")
    with pytest.raises(CheckpointError, match="roi_size"):
        export_torchscript(path, tmp_path / "x.ts")
    assert not (tmp_path / "x.ts").exists()
    junk = tmp_path / "junk.ts"
    junk.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="TorchScript"):
        load_torchscript(junk)
    plain = tmp_path / "plain.ts"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(plain))
    with pytest.raises(CheckpointError, match="metadata"):
        load_torchscript(plain)
