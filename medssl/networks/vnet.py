"""The lightweight V-Net of the left-atrium semi-supervised literature.

Milletari et al., "V-Net: Fully Convolutional Neural Networks for Volumetric Medical Image Segmentation", 3DV
2016 (https://arxiv.org/abs/1606.04797), in the reduced form used by Yu et al., "Uncertainty-aware
Self-ensembling Model for Semi-supervised 3D Left Atrium Segmentation" (UA-MT), MICCAI 2019, and the Mean
Teacher / SASSNet / DTC line of work on the LA 2018 challenge data:

* encoder stages of 1, 2, 3, 3, 3 ``3x3x3`` convolutions with ``F, 2F, 4F, 8F, 16F`` filters (``F = 16``),
  each conv followed by the normalization and ReLU; 2x down-sampling by a ``2x2x2`` stride-2 convolution;
* decoder stages of 3, 3, 2, 1 convolutions after ``2x2x2`` stride-2 transposed convolutions; skips are
  **added** (not concatenated); a ``1x1x1`` output convolution;
* ``Dropout3d`` on the bottleneck and on the last decoder features when ``has_dropout``.

With ``F = 16`` and batch norm it has 9,448,866 parameters (9,443,266 in convolutions; see the tests, which
recount them from this layer list). Module names follow the published implementation (``block_one`` ..
``block_nine``, ``block_*_dw`` / ``block_*_up``, ``out_conv``, each block's layers in a ``conv`` Sequential),
so its checkpoints load by name.

MONAI's original-paper V-Net (5x5x5 convolutions, ELU, residual stages; 45.6 M parameters) is selected in a
bundle by naming it instead::

    network_def:
      _target_: monai.networks.nets.VNet
      spatial_dims: 3
      in_channels: 1
      out_channels: 2
      dropout_prob_down: 0.5
      dropout_prob_up: [0.5, 0.5]
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VNet", "NORMALIZATIONS", "STAGES"]

NORMALIZATIONS = ("batchnorm", "groupnorm", "instancenorm", "none")
# (module name, 3x3x3 convolutions, filters / base_filters): four encoder stages, the bottleneck, four decoder stages
STAGES = (
    ("one", 1, 1),
    ("two", 2, 2),
    ("three", 3, 4),
    ("four", 3, 8),
    ("five", 3, 16),
    ("six", 3, 8),
    ("seven", 3, 4),
    ("eight", 2, 2),
    ("nine", 1, 1),
)


def _norm(normalization: str, channels: int) -> list[nn.Module]:
    if normalization == "batchnorm":
        return [nn.BatchNorm3d(channels)]
    if normalization == "groupnorm":
        return [nn.GroupNorm(num_groups=16, num_channels=channels)]
    if normalization == "instancenorm":
        return [nn.InstanceNorm3d(channels)]
    return []


class _ConvStage(nn.Module):
    """``n_convs`` x (3x3x3 conv -> norm -> ReLU); the layers sit under ``.conv`` as in the published code."""

    def __init__(self, n_convs: int, in_channels: int, out_channels: int, normalization: str):
        super().__init__()
        ops: list[nn.Module] = []
        for i in range(n_convs):
            ops.append(nn.Conv3d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1))
            ops += _norm(normalization, out_channels)
            ops.append(nn.ReLU(inplace=True))
        self.conv = nn.Sequential(*ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Resample(nn.Module):
    """2x2x2 stride-2 (transposed) convolution -> norm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, normalization: str, up: bool):
        super().__init__()
        conv = nn.ConvTranspose3d if up else nn.Conv3d
        self.conv = nn.Sequential(
            conv(in_channels, out_channels, 2, stride=2, padding=0),
            *_norm(normalization, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class VNet(nn.Module):
    """Lightweight V-Net (UA-MT / Mean Teacher LA variant).

    Input ``(B, in_channels, X, Y, Z)`` with every spatial size divisible by 16; output logits
    ``(B, out_channels, X, Y, Z)``.

    Args:
        in_channels: image channels.
        out_channels: segmentation classes (including background).
        base_filters: filters of the first stage (doubling per stage).
        normalization: ``"batchnorm"``, ``"groupnorm"`` (16 groups; ``base_filters`` must be a multiple of 16),
            ``"instancenorm"`` (not affine) or ``"none"``.
        has_dropout: apply ``Dropout3d(dropout_rate)`` to the bottleneck and the last decoder features.
        dropout_rate: the dropout probability.

    Raises:
        ValueError: for an unknown ``normalization``, a bad ``dropout_rate`` or group norm with
            ``base_filters`` not divisible by 16.

    Example::

        net = VNet(in_channels=1, out_channels=2, normalization="batchnorm", has_dropout=True)
        logits = net(torch.zeros(2, 1, 112, 112, 80))  # (2, 2, 112, 112, 80)
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        base_filters: int = 16,
        normalization: str = "batchnorm",
        has_dropout: bool = False,
        dropout_rate: float = 0.5,
    ) -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if not 0.0 <= dropout_rate <= 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1], got {dropout_rate}")
        if normalization == "groupnorm" and base_filters % 16:
            raise ValueError(f"groupnorm uses 16 groups: base_filters must be a multiple of 16, got {base_filters}")
        f, n = base_filters, normalization
        self.has_dropout = has_dropout
        for i, (name, convs, mult) in enumerate(STAGES):
            c = f * mult
            self.add_module(f"block_{name}", _ConvStage(convs, in_channels if i == 0 else c, c, n))
            if i < 4:  # encoder stages end in a 2x down-sampling, the bottleneck and decoder stages in a 2x up
                self.add_module(f"block_{name}_dw", _Resample(c, 2 * c, n, up=False))
            elif i < len(STAGES) - 1:
                self.add_module(f"block_{name}_up", _Resample(c, c // 2, n, up=True))
        self.out_conv = nn.Conv3d(f, out_channels, 1, padding=0)
        self.dropout = nn.Dropout3d(p=dropout_rate)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features at full, 1/2, 1/4, 1/8 and 1/16 resolution (bottleneck last, after dropout)."""
        x1 = self.block_one(x)
        x2 = self.block_two(self.block_one_dw(x1))
        x3 = self.block_three(self.block_two_dw(x2))
        x4 = self.block_four(self.block_three_dw(x3))
        x5 = self.block_five(self.block_four_dw(x4))
        if self.has_dropout:
            x5 = self.dropout(x5)
        return [x1, x2, x3, x4, x5]

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Logits from the five :meth:`encode` features."""
        x1, x2, x3, x4, x5 = features
        x = self.block_six(self.block_five_up(x5) + x4)
        x = self.block_seven(self.block_six_up(x) + x3)
        x = self.block_eight(self.block_seven_up(x) + x2)
        x = self.block_nine(self.block_eight_up(x) + x1)
        if self.has_dropout:
            x = self.dropout(x)
        return self.out_conv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, X, Y, Z)`` -> logits ``(B, out_channels, X, Y, Z)``; sizes divisible by 16."""
        bad = [s for s in x.shape[2:] if s % 16]
        if x.ndim != 5 or bad:
            raise ValueError(f"VNet needs a (B, C, X, Y, Z) input with sizes divisible by 16, got {tuple(x.shape)}")
        return self.decode(self.encode(x))
