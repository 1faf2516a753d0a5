"""use_fused_attention: same outputs and gradients as MONAI's explicit attention; blocks it must not switch."""

from __future__ import annotations

import copy

import torch
from monai.networks.blocks.selfattention import SABlock
from monai.networks.nets import ViTAutoEnc

from medssl.networks.attention import use_fused_attention
from medssl.networks.unetr import UNETR


def _flags(net):
    return [m.use_flash_attention for m in net.modules() if isinstance(m, SABlock)]


def test_fused_attention_matches_explicit_vitautoenc():
    torch.manual_seed(0)
    ref = ViTAutoEnc(1, img_size=32, patch_size=16, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4)
    fused = use_fused_attention(copy.deepcopy(ref))
    assert _flags(ref) == [False, False] and _flags(fused) == [True, True]
    x = torch.rand(2, 1, 32, 32, 32)
    out_ref, out_fused = ref(x)[0], fused(x)[0]
    torch.testing.assert_close(out_fused, out_ref, rtol=1e-4, atol=1e-5)
    out_ref.square().mean().backward()
    out_fused.square().mean().backward()
    for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
        # the two kernels sum in different orders (and per CPU kind): near-zero entries carry the rounding of the
        # tensor's largest terms, about 1e3 float32 eps of its scale, not a fixed 1e-6
        scale = 0.0 if a.grad is None else a.grad.abs().max().item()
        atol = 1e3 * torch.finfo(torch.float32).eps * scale
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=atol, msg=name)


def test_fused_attention_unetr_and_switch_back():
    torch.manual_seed(0)
    net = UNETR(1, 3, img_size=32, patch_size=16, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4, feature_size=8)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        ref = net.eval()(x)
        fused = use_fused_attention(net)(x)
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-5)
    assert all(_flags(net))
    assert not any(_flags(use_fused_attention(net, enabled=False)))


def test_fused_attention_leaves_blocks_it_cannot_reproduce():
    net = torch.nn.ModuleList([SABlock(32, 4, save_attn=True), SABlock(32, 4, dropout_rate=0.1), SABlock(32, 4)])
    use_fused_attention(net)
    assert _flags(net) == [False, False, True]
