"""``medssl export``: TorchScript parity and metadata; the bare state dict that MONAI's loaders read; refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medssl.checkpoint import build_network, load_checkpoint, save_checkpoint
from medssl.errors import CheckpointError
from medssl.export import export_state_dict, export_torchscript, load_torchscript
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


def _outputs(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(x)


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_state_dict_export_loads_with_monai(tmp_path, kind):
    from ignite.engine import Engine
    from monai.bundle import load
    from monai.handlers import CheckpointLoader

    ckpt_path = _checkpoint(tmp_path, kind)
    ckpt = load_checkpoint(ckpt_path)
    out = export_state_dict(ckpt_path, tmp_path / "model_sd.pt")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temporary file
    state = torch.load(out, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # tensors only: no metadata keys
    expected_net = build_network(ckpt)
    assert list(state) == list(expected_net.state_dict())
    x = torch.randn(1, 1, 32, 32, 16)
    expected = _outputs(expected_net, x)

    def fresh() -> torch.nn.Module:
        torch.manual_seed(1)  # other weights than the checkpoint's, so a load that does nothing fails
        return build_network(ckpt, load_weights=False)

    assert not torch.allclose(_outputs(fresh(), x), expected)
    net = fresh()
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    torch.testing.assert_close(_outputs(net, x), expected, rtol=0, atol=0)

    net = fresh()
    CheckpointLoader(load_path=str(out), load_dict={"model": net}, map_location="cpu")(Engine(lambda e, b: None))
    torch.testing.assert_close(_outputs(net, x), expected, rtol=0, atol=0)

    net = load("medssl_model", model=fresh(), model_file=str(out.resolve()), bundle_dir=str(tmp_path), device="cpu")
    torch.testing.assert_close(_outputs(net, x), expected, rtol=0, atol=0)


def test_checkpoint_loader_cannot_read_a_medssl_checkpoint(tmp_path):
    # why the export exists: MONAI takes model.pt's top-level keys (format, network, ...) for parameter names
    from ignite.engine import Engine
    from monai.handlers import CheckpointLoader

    ckpt_path = _checkpoint(tmp_path, "vnet")
    net = build_network(load_checkpoint(ckpt_path), load_weights=False)
    with pytest.raises(RuntimeError, match="state_dict"):
        CheckpointLoader(load_path=str(ckpt_path), load_dict={"model": net})(Engine(lambda e, b: None))


def test_state_dict_export_refuses_to_overwrite_checkpoint_and_bad_weights(tmp_path):
    ckpt_path = _checkpoint(tmp_path, "vnet")
    before = ckpt_path.read_bytes()
    with pytest.raises(CheckpointError, match="overwrite"):
        export_state_dict(ckpt_path, ckpt_path)
    assert ckpt_path.read_bytes() == before
    ckpt = load_checkpoint(ckpt_path)
    state = dict(ckpt["state_dict"])
    state.pop(next(iter(state)))
    broken = tmp_path / "broken.pt"
    save_checkpoint(broken, network=ckpt["network"], state_dict=state, stage="finetune")
    with pytest.raises(CheckpointError, match="weights do not fit"):
        export_state_dict(broken, tmp_path / "sd.pt")
    assert not (tmp_path / "sd.pt").exists()


def _readme_snippet() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("### Use a medssl model with plain MONAI", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_plain_monai_snippet(tmp_path, capsys):
    # the README's code as written, on a checkpoint and its export in place of runs/btcv_unetr/
    ckpt_path = _checkpoint(tmp_path, "unetr")
    export_state_dict(ckpt_path, tmp_path / "model_sd.pt")
    ckpt_path.rename(tmp_path / "model.pt")
    code = _readme_snippet()
    assert "runs/btcv_unetr/model.pt" in code and "runs/btcv_unetr/model_sd.pt" in code
    scope: dict = {}
    exec(code.replace("runs/btcv_unetr/", f"{tmp_path}/"), scope)  # noqa: S102 - the README's own snippet
    ckpt = load_checkpoint(tmp_path / "model.pt")
    x = torch.randn(1, 1, 32, 32, 16)
    torch.testing.assert_close(_outputs(scope["net"], x), _outputs(build_network(ckpt), x), rtol=0, atol=0)
    assert str(ckpt["labels"]) in capsys.readouterr().out
