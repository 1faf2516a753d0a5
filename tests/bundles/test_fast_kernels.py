"""Every ViT bundle builds its network with the patch-matmul convolutions and fused attention.

Beyond speed, this guards a correctness fix: on CPU, oneDNN's bf16 backward of ``ConvTranspose3d(kernel 4,
stride 4)`` (ViTAutoEnc's decoder) returns a wrong input gradient (BENCHMARKS.md); the bundles must never train
that kernel in bf16, so no patch-wise convolution may be left as a plain ``nn.Conv*`` module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from medssl.networks.patch_conv import PatchConv, PatchConvTranspose, is_patchwise

BUNDLES = {
    "ssl_pretrain": ["bundles/ssl_pretrain.yaml"],
    "btcv_unetr": ["bundles/supervised.yaml", "bundles/btcv_unetr.yaml"],
    "mean_teacher_btcv": ["bundles/mean_teacher.yaml", "bundles/mean_teacher_btcv.yaml"],
    "s5cl_segmentation": ["bundles/s5cl.yaml"],
}


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_bundle_network_uses_patch_matmul_and_fused_attention(name, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    parser = ConfigParser()
    parser.read_config([*BUNDLES[name], "bundles/tiny.yaml"])
    parser["device"] = "cpu"
    if name.startswith("s5cl"):
        parser["mode"] = "segmentation"
    network = parser.get_parsed_content("network")

    patchwise = [m for m in network.modules() if is_patchwise(m)]
    assert patchwise, "a ViT network has at least its patch embedding"
    plain = [type(m).__name__ for m in patchwise if not isinstance(m, (PatchConv, PatchConvTranspose))]
    assert not plain, f"{name}: patch-wise convolutions left to oneDNN: {plain}"
    if name == "ssl_pretrain":
        assert any(isinstance(m, PatchConvTranspose) and m.kernel_size == (4, 4, 4) for m in patchwise)

    attention = [m for m in network.modules() if hasattr(m, "use_flash_attention")]
    assert attention and all(m.use_flash_attention for m in attention)
    # the wrappers change forwards only: the state dict is the plain network's
    assert set(network.state_dict()) == set(parser.get_parsed_content("network_def")().state_dict())
    with torch.no_grad():
        out = network(torch.zeros(1, 1, *parser["roi_size"]))
    tensors = [out] if torch.is_tensor(out) else [t for t in out if torch.is_tensor(t)]
    assert tensors and all(t.shape[0] == 1 and torch.isfinite(t).all() for t in tensors), type(out)
