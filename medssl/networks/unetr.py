"""UNETR with a configurable ViT encoder: any depth, any power-of-two patch size.

Hatamizadeh et al., "UNETR: Transformers for 3D Medical Image Segmentation", WACV 2022
(https://arxiv.org/abs/2103.10504).

MONAI's :class:`monai.networks.nets.UNETR` fixes 12 transformer layers and a 16-voxel patch. This version takes
both as arguments and derives the decoder from them:

* **Decoder depth.** A patch of ``P = 2**n`` voxels leaves a token grid of ``roi / P``; the decoder has ``n``
  up-sampling stages back to full resolution (``n = 4`` for ``P = 16``, as in the paper). Skip features exist at
  every intermediate resolution ``roi / 2**k`` (``k = 1 .. n-1``), each taken from one transformer block, plus
  a convolutional skip on the input image at full resolution.
* **Skip depths.** Skip ``k`` (``k = 1 .. n-1``, finest first) reads the hidden state after block
  ``d_k = min(L, floor(k * L / n) + 1)`` (1-based; ``L`` = ``num_layers``): MONAI's taps scaled to any depth, the
  final block feeding the bottleneck. For ``L = 12, n = 4`` that is blocks 4 / 7 / 10, exactly MONAI's
  ``hidden_states_out[3]``, ``[6]``, ``[9]``, so a MONAI UNETR state dict loaded into this network computes the same
  function; for ``L = 4``: 2 / 3 / 4; for ``L = 12, n = 3`` (patch 8): 5 / 9. Shallow encoders share blocks
  between skips (``L = 2``: 1 / 2 / 2). ``skip_layers`` overrides the rule (the paper's ``z3, z6, z9``, which MONAI
  does not use, is ``skip_layers=(3, 6, 9)``).
* **MONAI compatibility.** The encoder is :func:`medssl.networks.vit.vit_encoder`'s MONAI
  :class:`~monai.networks.nets.ViT` (the one S5CL's networks build too), stored as ``self.vit``, so
  ViTAutoEnc keys ``patch_embedding.* / blocks.N.* / norm.*`` map to ``vit.*`` by name (see
  :func:`medssl.networks.pretrained.load_pretrained_vit`). Decoder modules carry MONAI's names
  (``encoder1 .. encoder{n}``, ``decoder2 .. decoder{n+1}``, ``out``), so a MONAI UNETR state dict loads
  strictly when ``patch_size=16, num_layers=12``, and gives MONAI's outputs with the default skip depths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.utils import ensure_tuple_rep
from torch import nn

from medssl.networks.vit import vit_encoder, vit_token_grid

__all__ = ["UNETR", "skip_depths"]


def skip_depths(num_layers: int, num_stages: int) -> tuple[int, ...]:
    """1-based transformer blocks whose outputs feed the ``num_stages - 1`` skip connections (finest first).

    ``d_k = min(L, floor(k * L / num_stages) + 1)`` for ``k = 1 .. num_stages - 1`` and ``L = num_layers``:
    MONAI's UNETR taps (``hidden_states_out[3/6/9]`` of 12 blocks, i.e. blocks 4 / 7 / 10) scaled to any depth;
    distinct when ``L >= num_stages - 1``; shallower encoders (tiny test models) share blocks between the deepest
    skips, e.g. ``L = 2, num_stages = 4`` gives ``(1, 2, 2)``.

    Raises:
        ValueError: when ``num_layers < 1``.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return tuple(min(num_layers, (k * num_layers) // num_stages + 1) for k in range(1, num_stages))


class UNETR(nn.Module):
    """UNETR segmentation network with a MONAI ViT encoder of any depth and a power-of-two patch size.

    Input ``(B, in_channels, *img_size)``, output logits ``(B, out_channels, *img_size)``.

    Args:
        in_channels: image channels.
        out_channels: segmentation classes (including background).
        img_size: ROI size (int or one per spatial dim); each must be divisible by ``patch_size``.
        patch_size: isotropic patch size, a power of two >= 2 (int or one equal value per spatial dim).
        hidden_size: transformer width.
        mlp_dim: transformer MLP width.
        num_layers: transformer blocks.
        num_heads: attention heads (must divide ``hidden_size``).
        proj_type: ``"conv"`` or ``"perceptron"`` patch embedding (must match a pretrained checkpoint).
        feature_size: decoder width at full resolution; doubles per stage.
        norm_name: decoder normalization, as MONAI's ``get_norm_layer`` accepts.
        conv_block: use convolution blocks in the skip up-projections.
        res_block: use residual decoder blocks.
        dropout_rate: transformer dropout.
        spatial_dims: 2 or 3.
        qkv_bias: bias on the attention qkv projection.
        save_attn: keep attention maps in the self-attention blocks.
        skip_layers: override the 1-based blocks feeding the skips (``num_stages - 1`` non-decreasing values
            in ``1 .. num_layers``, finest skip first); ``None`` uses :func:`skip_depths`.

    Raises:
        ValueError: for a patch size that is not a power of two, an ROI not divisible by it, a non-isotropic
            patch, ``num_layers < 1``, or invalid ``skip_layers``.

    Example::

        net = UNETR(1, 14, img_size=96, patch_size=16, num_layers=12)   # the published BTCV model
        net = UNETR(1, 2, img_size=(64, 64, 32), patch_size=8, hidden_size=192, num_layers=6, num_heads=6)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: Sequence[int] | int,
        patch_size: Sequence[int] | int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        proj_type: str = "conv",
        feature_size: int = 16,
        norm_name: tuple | str = "instance",
        conv_block: bool = True,
        res_block: bool = True,
        dropout_rate: float = 0.0,
        spatial_dims: int = 3,
        qkv_bias: bool = False,
        save_attn: bool = False,
        skip_layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        patches = tuple(int(p) for p in ensure_tuple_rep(patch_size, spatial_dims))
        if len(set(patches)) != 1:
            raise ValueError(f"patch_size must be isotropic (the decoder upsamples by 2 per axis), got {patches}")
        patch = patches[0]
        if patch < 2 or patch & (patch - 1):
            raise ValueError(f"patch_size must be a power of two >= 2, got {patch}")
        img_size, patches, feat_size = vit_token_grid(img_size, patches, spatial_dims)

        num_stages = int(math.log2(patch))
        if skip_layers is None:
            skips = skip_depths(num_layers, num_stages)
        else:
            skips = tuple(int(d) for d in skip_layers)
            if (
                len(skips) != num_stages - 1
                or any(not 1 <= d <= num_layers for d in skips)
                or any(a > b for a, b in zip(skips, skips[1:]))
            ):
                raise ValueError(
                    f"skip_layers must be {num_stages - 1} non-decreasing block numbers in 1..{num_layers} "
                    f"for patch_size={patch}, got {list(skip_layers)}"
                )

        self.num_layers = num_layers
        self.num_stages = num_stages
        self.skip_layers = skips
        self.img_size = img_size
        self.patch_size = patches
        self.feat_size = feat_size
        self.hidden_size = hidden_size
        self.vit = vit_encoder(
            in_channels,
            img_size,
            patches,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            proj_type=proj_type,
            dropout_rate=dropout_rate,
            spatial_dims=spatial_dims,
            qkv_bias=qkv_bias,
            save_attn=save_attn,
        )
        common = {"spatial_dims": spatial_dims, "kernel_size": 3, "norm_name": norm_name, "res_block": res_block}
        self.encoder1 = UnetrBasicBlock(in_channels=in_channels, out_channels=feature_size, stride=1, **common)
        # skip k lives at resolution roi / 2**k: the token grid (roi / 2**n) is upsampled n - k times
        for k in range(1, num_stages):
            block = UnetrPrUpBlock(
                in_channels=hidden_size,
                out_channels=feature_size * 2**k,
                num_layer=num_stages - k - 1,
                stride=1,
                upsample_kernel_size=2,
                conv_block=conv_block,
                **common,
            )
            self.add_module(f"encoder{k + 1}", block)
        for j in range(num_stages, 0, -1):  # decoder{j+1}: roi / 2**j -> roi / 2**(j-1)
            block = UnetrUpBlock(
                in_channels=hidden_size if j == num_stages else feature_size * 2**j,
                out_channels=feature_size * 2 ** (j - 1),
                upsample_kernel_size=2,
                **common,
            )
            self.add_module(f"decoder{j + 1}", block)
        self.out = UnetOutBlock(spatial_dims=spatial_dims, in_channels=feature_size, out_channels=out_channels)

    def proj_feat(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N, hidden)`` -> feature map ``(B, hidden, *feat_size)``."""
        x = x.reshape(x.shape[0], *self.feat_size, self.hidden_size)
        return x.movedim(-1, 1).contiguous()

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, *img_size)`` -> logits ``(B, out_channels, *img_size)``."""
        x, hidden_states = self.vit(x_in)
        skips = [self.encoder1(x_in)]
        for k, depth in enumerate(self.skip_layers, start=1):
            skips.append(getattr(self, f"encoder{k + 1}")(self.proj_feat(hidden_states[depth - 1])))
        dec = self.proj_feat(x)
        for j in range(self.num_stages, 0, -1):
            dec = getattr(self, f"decoder{j + 1}")(dec, skips[j - 1])
        return self.out(dec)
