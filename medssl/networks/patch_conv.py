"""Patch-wise convolutions (kernel = stride) computed as one matrix product.

A convolution whose stride equals its kernel and which has no padding, dilation or groups cuts the input into
non-overlapping patches and applies one linear map per patch: the ViT patch embedding (``Conv3d(1, 768, 16,
stride 16)``) and the up-sampling ``ConvTranspose3d(kernel 2 or 4, stride = kernel)`` of ViTAutoEnc and UNETR.
oneDNN's bf16 kernels for these shapes are slow on CPU (one input channel and a 16³ kernel; the backward pass
of the ViT-B patch embedding at 96³ takes seconds in bf16, ~20× its fp32 time), while the same arithmetic as a
reshape and a matmul runs on the AMX / tensor-core GEMM path.

:class:`PatchConv` / :class:`PatchConvTranspose` are ``nn.ConvNd`` / ``nn.ConvTransposeNd`` subclasses with the
same parameters and state-dict keys; only ``forward`` differs. :func:`use_patch_matmul` swaps them into a built
network in place (parameters are shared, not copied, so an optimizer created before still holds them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PatchConv", "PatchConvTranspose", "PatchConv3d", "PatchConvTranspose3d", "is_patchwise", "use_patch_matmul"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def is_patchwise(conv: nn.Module) -> bool:
    """Whether ``conv`` is a convolution (or transposed one) over non-overlapping patches: kernel = stride, no
    padding, dilation 1, one group, zero padding mode, and no output padding."""
    if not isinstance(conv, _CONV + _CONV_T):
        return False
    pad = conv.padding
    return (
        tuple(conv.kernel_size) == tuple(conv.stride)
        and (pad == "valid" or (isinstance(pad, tuple) and all(p == 0 for p in pad)))
        and all(d == 1 for d in conv.dilation)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and all(p == 0 for p in getattr(conv, "output_padding", (0,)))
    )


def _patch_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv(x, weight, stride=kernel)`` for x (B, C_in, *S) and weight (C_out, C_in, *k) -> (B, C_out, *S // k)."""
    k = weight.shape[2:]
    n = len(k)
    b, c = x.shape[:2]
    out = [s // ks for s, ks in zip(x.shape[2:], k)]
    x = x[(slice(None), slice(None), *(slice(0, o * ks) for o, ks in zip(out, k)))]  # conv drops the remainder
    split = [d for o, ks in zip(out, k) for d in (o, ks)]
    x = x.reshape(b, c, *split)
    # (B, C, o1, k1, o2, k2, ...) -> (B, o1, o2, ..., C, k1, k2, ...)
    perm = [0, *(2 + 2 * i for i in range(n)), 1, *(3 + 2 * i for i in range(n))]
    patches = x.permute(perm).reshape(b * math.prod(out), c * math.prod(k))
    y = F.linear(patches, weight.reshape(weight.shape[0], -1), bias)
    return y.reshape(b, *out, weight.shape[0]).movedim(-1, 1).contiguous()


def _patch_conv_transpose(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv_transpose(x, weight, stride=kernel)`` for x (B, C_in, *S), weight (C_in, C_out, *k) -> (B, C_out, *S·k)."""
    c_in, c_out, *k = weight.shape
    n = len(k)
    b, _, *size = x.shape
    tokens = x.movedim(1, -1).reshape(-1, c_in)
    y = tokens @ weight.reshape(c_in, -1).to(tokens.dtype)
    y = y.reshape(b, *size, c_out, *k)
    # (B, s1, s2, ..., C_out, k1, k2, ...) -> (B, C_out, s1, k1, s2, k2, ...)
    perm = [0, n + 1, *(d for i in range(n) for d in (1 + i, n + 2 + i))]
    y = y.permute(perm).reshape(b, c_out, *(s * ks for s, ks in zip(size, k)))
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(1, c_out, *([1] * n))
    return y


class PatchConv:
    """Mixin turning a patch-wise ``nn.ConvNd`` into reshape + ``F.linear`` (see the module docstring)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Conv's argument name
        return _patch_conv(input, self.weight, self.bias)


class PatchConvTranspose:
    """Mixin turning a patch-wise ``nn.ConvTransposeNd`` into a matmul + reshape (see the module docstring)."""

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:  # noqa: A002
        if output_size is not None:
            return super().forward(input, output_size)
        return _patch_conv_transpose(input, self.weight, self.bias)


class PatchConv1d(PatchConv, nn.Conv1d):
    pass


class PatchConv2d(PatchConv, nn.Conv2d):
    pass


class PatchConv3d(PatchConv, nn.Conv3d):
    pass


class PatchConvTranspose1d(PatchConvTranspose, nn.ConvTranspose1d):
    pass


class PatchConvTranspose2d(PatchConvTranspose, nn.ConvTranspose2d):
    pass


class PatchConvTranspose3d(PatchConvTranspose, nn.ConvTranspose3d):
    pass


# module-level classes (not made on the fly) so that a whole pickled network still loads
_FAST = {nn.Conv1d: PatchConv1d, nn.Conv2d: PatchConv2d, nn.Conv3d: PatchConv3d,
         nn.ConvTranspose1d: PatchConvTranspose1d, nn.ConvTranspose2d: PatchConvTranspose2d,
         nn.ConvTranspose3d: PatchConvTranspose3d}  # fmt: skip


def use_patch_matmul(network: nn.Module, transposed: bool = True) -> nn.Module:
    """Compute every patch-wise convolution of ``network`` as a matmul (in place; parameters unchanged).

    Args:
        network: any module, e.g. ``ViTAutoEnc`` or :class:`medssl.networks.unetr.UNETR`.
        transposed: also the transposed (up-sampling) convolutions.

    Returns:
        ``network``, so it chains in bundle expressions::

            network: "$medssl.networks.patch_conv.use_patch_matmul(@network_def().to(@device_obj))"
    """
    for module in network.modules():
        if type(module) in _CONV or (transposed and type(module) in _CONV_T):
            if is_patchwise(module):
                # same object, same parameters and hooks: only the forward changes
                module.__class__ = _FAST[type(module)]
    return network
