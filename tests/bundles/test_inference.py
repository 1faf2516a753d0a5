"""bundles/inference.yaml: `run` segments like the Python API; `export` and MONAI's ckpt_export give TorchScript."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.checkpoint import build_network, load_checkpoint, save_checkpoint
from medssl.inference import Predictor
from medssl.transforms.presets import preprocessing_summary

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "bundles" / "inference.yaml")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = {"_target_": "medssl.networks.unetr.UNETR", "in_channels": 1, "out_channels": 14, "img_size": [32] * 3,
              "patch_size": 16, "hidden_size": 32, "mlp_dim": 64, "num_layers": 2, "num_heads": 2, "feature_size": 4}  # fmt: skip
    net = build_network({"network": config}, load_weights=False)
    pre = preprocessing_summary(spacing=(1.5, 1.5, 2.0), a_min=-175, a_max=250, roi_size=[32] * 3)
    path = tmp_path_factory.mktemp("bundle_model") / "model.pt"
    labels = {str(i): f"c{i}" for i in range(14)}
    save_checkpoint(
        path, network=config, state_dict=net.state_dict(), stage="finetune", preprocessing=pre, labels=labels
    )
    return path


def test_bundle_run_matches_the_python_api(tmp_path, model, ct_phantom):
    from monai.bundle import run

    images = ct_phantom.parent / "imagesTr"
    out = tmp_path / "out"
    run(config_file=CONFIG, model_path=str(model), input=[str(images)], output_dir=str(out), progress=False)
    inputs = sorted(images.glob("*.nii.gz"))
    written = sorted(out.glob("*_seg.nii.gz"))
    assert [p.name.replace("_seg", "") for p in written] == [p.name for p in inputs]
    predictor = Predictor(model, progress=False)
    direct = predictor.predict_paths([inputs[0]], tmp_path / "direct")
    a = np.asanyarray(nib.load(written[0]).dataobj)
    b = np.asanyarray(nib.load(direct.written[str(inputs[0])][0]).dataobj)
    assert np.array_equal(a, b)


def test_bundle_export_and_ckpt_export(tmp_path, model):
    from monai.bundle import ckpt_export, run

    from medssl.export import load_torchscript

    ts = tmp_path / "medssl.ts"
    run("export", config_file=CONFIG, model_path=str(model), export_path=str(ts))
    module, meta = load_torchscript(ts)
    net = build_network(load_checkpoint(model)).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(module(x), net(x), rtol=1e-4, atol=1e-5)
    assert meta["roi_size"] == [32, 32, 32]

    monai_ts = tmp_path / "monai.ts"
    ckpt_export(
        "network_def",
        filepath=str(monai_ts),
        ckpt_file=str(model),
        meta_file=str(REPO / "bundles" / "metadata" / "inference.json"),
        config_file=CONFIG,
        key_in_ckpt="state_dict",
        use_trace=True,
        input_shape=[1, 1, 32, 32, 32],
        model_path=str(model),
    )
    exported = torch.jit.load(str(monai_ts))
    with torch.no_grad():
        torch.testing.assert_close(exported(x), net(x), rtol=1e-4, atol=1e-5)
