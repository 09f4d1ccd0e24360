"""Building blocks of :class:`~occscene_pl.models.perceiver.OccupancyPerceiver` (MonoScene, ``docs/design.md`` §7.1).

2D: the UNet decoder of MonoScene's ``unet2d.py`` (bilinear upsampling to the skip, concatenation, two
conv3x3-BN-LeakyReLU), generalised to any timm ``features_only`` encoder. 3D: the DDR bottleneck, ``Process``,
``Downsample``, ``Upsample``, ASPP, segmentation head and 3D context-prior (CRP) block of ``modules.py``, ``DDR.py``
and ``CRP3D.py``. Departures from MonoScene are listed in the docstring of the class concerned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ASPP3D",
    "ContextPrior3D",
    "DDRBottleneck3D",
    "Downsample3D",
    "ImageDecoder",
    "Process3D",
    "SegmentationHead3D",
    "UpBlock2D",
    "Upsample3D",
]


# --------------------------------------------------------------------------------------------------------------------
# 2D decoder
# --------------------------------------------------------------------------------------------------------------------


class UpBlock2D(nn.Module):
    """Upsample to the skip's size, concatenate it, then two conv3x3-BN-LeakyReLU (MonoScene ``UpSampleBN``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
        )

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        """``x (N, c, h, w)``, ``skip (N, c_s, H_s, W_s)`` -> ``(N, out_channels, H_s, W_s)``."""
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.convs(torch.cat([x, skip], dim=1))


class ImageDecoder(nn.Module):
    """MonoScene's 2D UNet decoder on top of a multi-scale encoder, returning maps at the requested scales.

    The coarsest encoder map goes through a 1x1 conv to ``decoder_dim`` channels, then one :class:`UpBlock2D` per finer
    encoder level (and a last one with the normalised image as skip when scale 1 is requested, as MonoScene's
    ``up1``). The width at scale ``s`` is ``decoder_dim * s / s_max`` (MonoScene: 2560 -> 1280, 640, 320, 160, 80).
    Each requested scale is projected to ``feature_dim`` by a 1x1 conv.

    Departure from MonoScene: its bottleneck 1x1 conv has ``padding=1``, which adds a one-pixel border to the 1:32
    map; it is dropped here (the map is resized to every skip anyway).

    Args:
        encoder_channels: channels of the encoder maps, finest first.
        encoder_reductions: their strides w.r.t. the image, strictly increasing.
        decoder_dim: width of the decoder at the coarsest scale.
        feature_dim: channels of every output map.
        scales: which scales to return; each is 1 or one of ``encoder_reductions``.
        image_channels: channels of the image used as the scale-1 skip.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        encoder_reductions: Sequence[int],
        decoder_dim: int,
        feature_dim: int,
        scales: Sequence[int],
        image_channels: int = 3,
    ) -> None:
        super().__init__()
        reductions = [int(r) for r in encoder_reductions]
        if any(b <= a for a, b in zip(reductions, reductions[1:], strict=False)):
            raise ValueError(f"encoder reductions must be strictly increasing, got {reductions}")
        available = sorted(set(reductions) | {1})
        unknown = sorted(set(scales) - set(available))
        if unknown:
            raise ValueError(f"lift_scales {sorted(scales)} include {unknown}; this backbone offers scales {available}")
        coarsest = reductions[-1]
        self.scales = tuple(sorted(set(int(s) for s in scales)))
        self.reductions = reductions
        self.with_image_skip = 1 in self.scales and 1 not in reductions
        # Scale 1 needs every encoder level (its skip is the image); otherwise stop at the finest requested one.
        finest_needed = reductions[0] if 1 in self.scales else min(self.scales)

        def width(scale: int) -> int:
            return max(1, decoder_dim * scale // coarsest)

        self.bottleneck = nn.Conv2d(encoder_channels[-1], decoder_dim, kernel_size=1)
        # Encoder levels (finest first) that an up block merges, coarse to fine.
        self.skip_levels = [k for k in range(len(reductions) - 2, -1, -1) if reductions[k] >= finest_needed]
        self.up_blocks = nn.ModuleList()
        channels = decoder_dim
        for level in self.skip_levels:
            self.up_blocks.append(UpBlock2D(channels + encoder_channels[level], width(reductions[level])))
            channels = width(reductions[level])
        self.image_block = UpBlock2D(channels + image_channels, width(1)) if self.with_image_skip else None
        self.heads = nn.ModuleDict({str(s): nn.Conv2d(width(s), feature_dim, kernel_size=1) for s in self.scales})

    def forward(self, features: Sequence[Tensor], image: Tensor) -> dict[int, Tensor]:
        """Decode encoder maps into per-scale feature maps.

        Args:
            features: encoder maps, finest first, ``(N, c_k, H / r_k, W / r_k)``.
            image: the normalised input ``(N, 3, H, W)`` (scale-1 skip).

        Returns:
            ``{scale: (N, feature_dim, h_s, w_s)}`` for every requested scale.
        """
        x = self.bottleneck(features[-1])
        maps = {self.reductions[-1]: x}
        for level, block in zip(self.skip_levels, self.up_blocks, strict=True):
            x = block(x, features[level])
            maps[self.reductions[level]] = x
        if self.image_block is not None:
            maps[1] = self.image_block(x, image)
        return {s: self.heads[str(s)](maps[s]) for s in self.scales}


# --------------------------------------------------------------------------------------------------------------------
# 3D blocks
# --------------------------------------------------------------------------------------------------------------------


def _conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: tuple[int, int, int],
    stride: tuple[int, int, int],
    dilation: tuple[int, int, int],
    bn_momentum: float,
) -> nn.Sequential:
    padding = (
        dilation[0] * (kernel_size[0] // 2),
        dilation[1] * (kernel_size[1] // 2),
        dilation[2] * (kernel_size[2] // 2),
    )
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=False),
        nn.BatchNorm3d(out_channels, momentum=bn_momentum),
    )


def _pool_conv_bn(channels: int, pool: tuple[int, int, int], bn_momentum: float) -> nn.Sequential:
    return nn.Sequential(
        nn.AvgPool3d(kernel_size=pool, stride=pool),
        nn.Conv3d(channels, channels, kernel_size=1, bias=False),
        nn.BatchNorm3d(channels, momentum=bn_momentum),
    )


class DDRBottleneck3D(nn.Module):
    """DDR residual bottleneck (MonoScene ``DDR.Bottleneck3D``).

    1x1 reduce, factorised dilated 1x1x3 / 1x3x1 / 3x1x1 convs with dense residuals between them, 1x1 expand,
    identity (or ``shortcut``) residual.

    With ``stride > 1`` the three factorised convs stride along z, y, x in turn and the dense residuals are pooled to
    match. Departure from MonoScene: its pooled-residual branches are created even for ``stride == 1``, where they are
    never used (parameters without gradient); they exist here only when ``stride > 1``.

    Args:
        in_channels: input channels.
        planes: inner width.
        expansion: output channels are ``planes * expansion``.
        stride: spatial stride of the block.
        dilation: dilation of the three factorised convs.
        shortcut: module applied to the input for the residual when shapes differ.
        bn_momentum: BatchNorm momentum.
    """

    def __init__(
        self,
        in_channels: int,
        planes: int,
        expansion: int = 4,
        stride: int = 1,
        dilation: int = 1,
        shortcut: nn.Module | None = None,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.reduce = _conv_bn(in_channels, planes, (1, 1, 1), (1, 1, 1), (1, 1, 1), bn_momentum)
        self.conv_z = _conv_bn(planes, planes, (1, 1, 3), (1, 1, stride), (1, 1, dilation), bn_momentum)
        self.conv_y = _conv_bn(planes, planes, (1, 3, 1), (1, stride, 1), (1, dilation, 1), bn_momentum)
        self.conv_x = _conv_bn(planes, planes, (3, 1, 1), (stride, 1, 1), (dilation, 1, 1), bn_momentum)
        self.expand = _conv_bn(planes, planes * expansion, (1, 1, 1), (1, 1, 1), (1, 1, 1), bn_momentum)
        self.shortcut = shortcut
        self.stride = stride
        if stride > 1:
            self.pool_z_to_y = _pool_conv_bn(planes, (1, stride, 1), bn_momentum)
            self.pool_zy_to_x = _pool_conv_bn(planes, (stride, 1, 1), bn_momentum)
            self.pool_y_to_x = _pool_conv_bn(planes, (stride, 1, 1), bn_momentum)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, X, Y, Z)`` -> ``(B, planes * expansion, X / s, Y / s, Z / s)``."""
        out_z = self.conv_z(F.relu(self.reduce(x)))
        out_y = self.conv_y(F.relu(out_z))
        if self.stride > 1:
            out_z = self.pool_z_to_y(out_z)
        out_y = out_y + out_z
        out_x = self.conv_x(F.relu(out_y))
        if self.stride > 1:
            out_z = self.pool_zy_to_x(out_z)
            out_y = self.pool_y_to_x(out_y)
        out = self.expand(F.relu(out_x + out_z + out_y))
        residual = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + residual)


class Process3D(nn.Sequential):
    """A chain of width-preserving DDR bottlenecks with the given dilations (MonoScene ``Process``)."""

    def __init__(self, channels: int, dilations: Sequence[int] = (1, 2, 3), bn_momentum: float = 0.1) -> None:
        super().__init__(
            *[DDRBottleneck3D(channels, channels // 4, dilation=d, bn_momentum=bn_momentum) for d in dilations]
        )


class Downsample3D(DDRBottleneck3D):
    """Stride-2 DDR bottleneck doubling the width; the residual is average-pooled and 1x1-projected (MonoScene)."""

    def __init__(self, channels: int, bn_momentum: float = 0.1) -> None:
        shortcut = nn.Sequential(
            nn.AvgPool3d(kernel_size=2, stride=2),
            nn.Conv3d(channels, channels * 2, kernel_size=1, bias=False),
            nn.BatchNorm3d(channels * 2, momentum=bn_momentum),
        )
        super().__init__(channels, channels // 4, expansion=8, stride=2, shortcut=shortcut, bn_momentum=bn_momentum)


class Upsample3D(nn.Sequential):
    """Transposed conv (k3, s2, p1, output_padding 1: exactly x2) + BN + ReLU (MonoScene ``Upsample``)."""

    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float = 0.1) -> None:
        super().__init__(
            nn.ConvTranspose3d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, output_padding=1),
            nn.BatchNorm3d(out_channels, momentum=bn_momentum),
            nn.ReLU(),
        )


class ASPP3D(nn.Module):
    """Residual sum of dilated (conv-BN-ReLU-conv-BN) branches: ``relu(x + sum_d branch_d(x))`` (MonoScene ``ASPP``)."""

    def __init__(self, channels: int, dilations: Sequence[int] = (1, 2, 3)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(channels, channels, kernel_size=3, padding=d, dilation=d, bias=False),
                nn.BatchNorm3d(channels),
                nn.ReLU(),
                nn.Conv3d(channels, channels, kernel_size=3, padding=d, dilation=d, bias=False),
                nn.BatchNorm3d(channels),
            )
            for d in dilations
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, X, Y, Z)`` -> same shape."""
        return F.relu(x + sum(branch(x) for branch in self.branches))


class SegmentationHead3D(nn.Sequential):
    """conv3x3 + ReLU, :class:`ASPP3D`, conv3x3 to class logits (MonoScene/LMSCNet ``SegmentationHead``)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dilations: Sequence[int] = (1, 2, 3)) -> None:
        super().__init__(
            nn.Conv3d(in_channels, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            ASPP3D(channels, dilations),
            nn.Conv3d(channels, num_classes, kernel_size=3, padding=1),
        )


class ContextPrior3D(nn.Module):
    """MonoScene's 3D context relation prior (``CRP3D.CPMegaVoxels``) at the UNet bottleneck.

    Supervoxel ("mega context") features come from a stride-2 conv of the ASPP-aggregated input
    (``size // 2`` supervoxels per axis, ordered C-order like the relation targets). For each of ``n_relations``
    relations a 1x1 conv predicts, for every voxel, one logit per supervoxel; ``sigmoid(logits) @ supervoxel_features``
    gathers context, which is concatenated with the input and fused by a 1x1 conv and a DDR bottleneck.

    The per-relation 1x1 convs of MonoScene are one conv with ``n_relations * n_super`` outputs here (the same
    function). The returned logits are ``(B, n_relations, N, n_super)`` (MonoScene returns the transpose
    ``(B, n_relations, n_super, N)`` and transposes it back in its loss).

    Args:
        channels: input/output channels.
        size: spatial size ``(X, Y, Z)`` of the input; every axis must be at least 2.
        n_relations: number of relation maps (MonoScene: 4).
        bn_momentum: BatchNorm momentum.
    """

    def __init__(self, channels: int, size: Sequence[int], n_relations: int = 4, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.size = tuple(int(n) for n in size)
        if len(self.size) != 3 or min(self.size) < 2:
            raise ValueError(f"ContextPrior3D needs a 3D input of at least 2 voxels per axis, got size {self.size}")
        self.n_relations = n_relations
        self.super_size = tuple(n // 2 for n in self.size)
        self.n_super = self.super_size[0] * self.super_size[1] * self.super_size[2]
        self.context_channels = 2 * channels
        # Padding 1 on even axes and 0 on odd ones gives exactly size // 2 outputs (as MonoScene).
        padding = ((self.size[0] + 1) % 2, (self.size[1] + 1) % 2, (self.size[2] + 1) % 2)
        self.aspp = ASPP3D(channels, (1, 2, 3))
        self.mega_context = nn.Conv3d(channels, self.context_channels, kernel_size=3, stride=2, padding=padding)
        self.relation_logits = nn.Conv3d(channels, n_relations * self.n_super, kernel_size=1)
        self.fuse = nn.Sequential(
            nn.Conv3d(self.context_channels * n_relations + channels, channels, kernel_size=1, bias=False),
            Process3D(channels, dilations=(1,), bn_momentum=bn_momentum),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the context prior.

        Args:
            x: ``(B, C, X, Y, Z)`` with ``(X, Y, Z) == size``.

        Returns:
            ``(B, C, X, Y, Z)`` features and relation logits ``(B, n_relations, N, n_super)``, ``N = X * Y * Z``.
        """
        batch = x.shape[0]
        n_voxels = x.shape[2] * x.shape[3] * x.shape[4]
        aggregated = self.aspp(x)
        mega = self.mega_context(aggregated).flatten(2).transpose(1, 2)  # (B, n_super, 2C)
        logits = self.relation_logits(aggregated).reshape(batch, self.n_relations, self.n_super, n_voxels)
        logits = logits.transpose(2, 3)  # (B, R, N, n_super)
        context = torch.sigmoid(logits) @ mega[:, None]  # (B, R, N, 2C)
        context = context.permute(0, 1, 3, 2).reshape(batch, -1, *x.shape[2:])  # relation-major channels, as MonoScene
        return self.fuse(torch.cat([x, context], dim=1)), logits
