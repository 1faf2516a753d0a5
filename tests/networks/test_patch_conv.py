"""use_patch_matmul: patch-wise convolutions as matmuls equal the convolutions (values, gradients, state dict)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from monai.networks.nets import ViTAutoEnc
from torch import nn

from medssl.networks.patch_conv import PatchConv3d, PatchConvTranspose3d, is_patchwise, use_patch_matmul
from medssl.networks.unetr import UNETR


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _check_same(ref: nn.Module, x: torch.Tensor) -> nn.Module:
    # float64: tiny UNETRs instance-normalise 2x2x2 maps, which amplifies fp32 rounding of a reordered sum
    ref, x = ref.double(), x.double()
    fast = use_patch_matmul(copy.deepcopy(ref))
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_fast = ref(xr), fast(xf)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-9, atol=1e-10)
    weight = torch.randn_like(out_ref)
    (out_ref * weight).sum().backward()
    (out_fast * weight).sum().backward()
    assert _rel(xf.grad, xr.grad) < 1e-9
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        if a.grad is None:  # a parameter the forward does not use
            assert b.grad is None, name
            continue
        assert _rel(b.grad, a.grad) < 1e-9, name
    return fast


@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv3d(2, 5, kernel_size=4, stride=4), (2, 2, 8, 12, 16)),
        (nn.Conv3d(1, 6, kernel_size=(4, 2, 2), stride=(4, 2, 2), bias=False), (1, 1, 9, 7, 6)),  # remainders
        (nn.Conv2d(3, 4, kernel_size=2, stride=2), (2, 3, 6, 10)),
        (nn.ConvTranspose3d(6, 3, kernel_size=2, stride=2), (2, 6, 3, 4, 5)),
        (nn.ConvTranspose3d(4, 2, kernel_size=(4, 2, 1), stride=(4, 2, 1), bias=False), (1, 4, 2, 3, 4)),
        (nn.ConvTranspose2d(3, 5, kernel_size=3, stride=3), (2, 3, 4, 2)),
    ],
)
def test_patch_matmul_equals_convolution(conv, shape):
    torch.manual_seed(0)
    fast = _check_same(conv, torch.randn(*shape))
    assert type(fast).__name__.startswith("Patch")
    assert fast.state_dict().keys() == conv.state_dict().keys()


def test_non_patchwise_convolutions_are_left_alone():
    net = nn.Sequential(nn.Conv3d(1, 2, 3, stride=1, padding=1), nn.Conv3d(2, 2, 2, stride=2, padding=1),
                        nn.ConvTranspose3d(2, 2, 2, stride=2, output_padding=1), nn.Conv3d(2, 2, 2, stride=2))  # fmt: skip
    assert [is_patchwise(m) for m in net] == [False, False, False, True]
    use_patch_matmul(net)
    assert [type(m) for m in net] == [nn.Conv3d, nn.Conv3d, nn.ConvTranspose3d, PatchConv3d]


def test_patch_matmul_vitautoenc_and_unetr():
    torch.manual_seed(0)
    vit = ViTAutoEnc(1, img_size=32, patch_size=16, hidden_size=48, mlp_dim=96, num_layers=1, num_heads=4)
    fast = use_patch_matmul(copy.deepcopy(vit))
    assert isinstance(fast.patch_embedding.patch_embeddings, PatchConv3d)
    assert isinstance(fast.conv3d_transpose, PatchConvTranspose3d)
    x = torch.rand(2, 1, 32, 32, 32)
    torch.testing.assert_close(fast(x)[0], vit(x)[0], rtol=1e-4, atol=1e-5)
    net = UNETR(1, 3, img_size=32, patch_size=16, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4, feature_size=8)
    _check_same(net.eval(), torch.rand(1, 1, 32, 32, 32))
    assert pickle.loads(pickle.dumps(fast)).conv3d_transpose.__class__ is PatchConvTranspose3d


def test_patch_matmul_bf16_autocast_close_to_conv():
    torch.manual_seed(0)
    conv = nn.Conv3d(1, 32, kernel_size=8, stride=8)
    fast = use_patch_matmul(copy.deepcopy(conv))
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = conv(x), fast(x)
    assert b.dtype == a.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)


def test_patch_matmul_bf16_transposed_input_gradient():
    # oneDNN's bf16 ConvTranspose3d(kernel 4, stride 4) backward returns a wrong input gradient on AMX CPUs (torch
    # 2.13: relative error ~1.2), which corrupts ViTAutoEnc's encoder gradients; the matmul form must not
    torch.manual_seed(0)
    conv = nn.ConvTranspose3d(64, 16, kernel_size=4, stride=4)
    fast = use_patch_matmul(copy.deepcopy(conv))
    h, g = torch.randn(1, 64, 4, 4, 4), torch.randn(1, 16, 16, 16, 16)
    grads = []
    for module, bf16 in ((conv, False), (fast, True)):
        hi = h.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = module(hi)
        (out.float() * g).sum().backward()
        grads.append(hi.grad)
    assert _rel(grads[1], grads[0]) < 2e-2
