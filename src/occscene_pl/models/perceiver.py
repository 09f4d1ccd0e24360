"""MonoScene-style semantic scene completion network: image(s) + camera -> 3D semantic logits.

Architecture (``docs/design.md`` §7.1): a timm 2D encoder with MonoScene's 2D UNet decoder gives feature maps at
1:1, 1:2, 1:4 and 1:8; FLoSP lifts them onto the voxel grid through the voxel -> pixel projection; a 3D UNet (DDR
bottlenecks, two downsamplings, 3D context-relation prior at the bottleneck, transposed-conv upsampling with additive
skips) and an ASPP segmentation head give per-voxel class logits.

Departures from MonoScene, all deliberate:

* The encoder is any timm ``features_only`` CNN built with ``pretrained=False`` (weights only from a local file), not
  ``torch.hub.load("rwightman/gen-efficientnet-pytorch", "tf_efficientnet_b7_ns")``. For EfficientNet-B7 timm's
  1:32 feature is the last block (640 channels), whereas MonoScene taps the 2560-channel ``conv_head`` after it; set
  ``decoder_dim=2560`` to get MonoScene's decoder widths (1280, 640, 320, 160, 80).
* FLoSP samples each scale's map bilinearly (``grid_sample``) at the continuous projected position of the voxel
  centre; MonoScene gathers the integer pixel ``(v // s) * w_s + u // s`` of the rounded projection. Bilinear
  sampling is differentiable w.r.t. the position and avoids the aliasing of ``// s``. The FOV test is MonoScene's
  (rounded pixel inside the image, positive depth).
* Several views are supported: a voxel's lifted feature is the mean over the views that see it (MonoScene: one view).
* Image normalisation happens inside the model, with the backbone's mean/std (ImageNet for all MonoScene backbones).
* The head upsamples ``log2(project_scale)`` times (halving the width each time), so any power-of-two
  ``project_scale`` works; MonoScene hard-codes one upsampling for KITTI (project_scale 2) and none for NYU.
* Unused parameters of MonoScene's DDR blocks are not created (see :class:`DDRBottleneck3D`), the context prior's
  per-relation 1x1 convs are one conv and its relation logits are returned as ``(B, R, N, N_super)`` (see
  :class:`ContextPrior3D`). Module names differ from MonoScene's, so its released checkpoint does not load as is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models import FeatureDictNet
from torch import Tensor, nn

from occscene_pl.camera import Camera
from occscene_pl.geometry import VoxelProjection, pixels_to_grid, project_voxels
from occscene_pl.models.perceiver_blocks import (
    ContextPrior3D,
    Downsample3D,
    ImageDecoder,
    Process3D,
    SegmentationHead3D,
    Upsample3D,
)

__all__ = ["OccupancyPerceiver", "build_backbone", "lift_features"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_backbone(name: str, pretrained: str | Path | None = None) -> nn.Module:
    """Create a timm ``features_only`` encoder, never downloading anything.

    Args:
        name: timm model name (e.g. ``"tf_efficientnet_b7.ns_jft_in1k"``, ``"resnet10t"``).
        pretrained: local checkpoint of the *classification* model ``name`` (``.pth``/``.safetensors``, plain or
            nested state dict, as timm's ``load_state_dict`` accepts); ``None`` = random init.

    Returns:
        The encoder; ``encoder(x)`` returns a list of maps, finest first, described by ``encoder.feature_info``.

    Raises:
        FileNotFoundError: ``pretrained`` does not exist.
        ValueError: ``name`` would be fetched from the Hugging Face Hub, or the file does not hold ``name``'s weights.
    """
    if name.startswith(("hf-hub:", "hf_hub:")):
        raise ValueError(
            f"backbone {name!r} would be downloaded from the Hugging Face Hub; give a timm model name "
            "and a local weights file as `pretrained`"
        )
    if pretrained is None:
        return timm.create_model(name, features_only=True, pretrained=False)
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {str(path)!r} (pretrained=) does not exist")
    try:
        # A `file` source makes timm read that file and nothing else (it outranks hub and URL sources).
        encoder = timm.create_model(
            name, features_only=True, pretrained=True, pretrained_cfg_overlay={"file": str(path)}
        )
    except (RuntimeError, KeyError) as error:
        raise ValueError(f"{str(path)!r} does not hold weights of timm model {name!r}: {error}") from error
    if not isinstance(encoder, FeatureDictNet):
        # timm loads its dedicated feature classes (EfficientNetFeatures, ...) non-strictly: check coverage here.
        missing = sorted(set(encoder.state_dict()) - set(timm.models.load_state_dict(str(path))))
        if missing:
            raise ValueError(
                f"{str(path)!r} does not hold weights of timm model {name!r}: "
                f"{len(missing)} encoder tensors missing, e.g. {missing[:3]}"
            )
    return encoder


def lift_features(
    feature_maps: Mapping[int, Tensor],
    projection: VoxelProjection,
    grid_size: Sequence[int],
) -> Tensor:
    """FLoSP: lift multi-scale 2D feature maps onto a voxel grid through the voxel -> pixel projection.

    Each voxel samples every scale's map bilinearly at its projected centre (a scale-``s`` map of size ``(h, w)``
    covers ``s * h`` x ``s * w`` image pixels, MonoScene's ``// s`` convention); voxels a view does not see
    (``projection.fov_mask``) get nothing from it; the per-view features are averaged over the views that see the
    voxel (0 when none does) and summed over scales.

    Args:
        feature_maps: ``{scale: (B * V, C, h_s, w_s)}``, views flattened view-major (``b * V + v``).
        projection: :func:`~occscene_pl.geometry.project_voxels` of the grid, ``pixels (B, V, N, 2)`` at the image
            resolution, ``fov_mask (B, V, N)``.
        grid_size: ``(X, Y, Z)`` with ``X * Y * Z == N``.

    Returns:
        ``(B, C, X, Y, Z)``.
    """
    fov = projection.fov_mask
    batch, views, n_voxels = fov.shape
    # Out-of-FOV positions may be huge (points behind the camera); park them at 0 so nothing non-finite is sampled.
    pixels = torch.where(fov[..., None], projection.pixels, torch.zeros_like(projection.pixels))
    volume: Tensor | None = None
    for scale, feature_map in feature_maps.items():
        height, width = feature_map.shape[-2:]
        # Sample in the projection's precision: bf16 sampling positions would be off by pixels on wide images.
        grid = pixels_to_grid(pixels, (height * scale, width * scale))
        sampled = F.grid_sample(
            feature_map.to(grid.dtype),
            grid.reshape(batch * views, n_voxels, 1, 2),
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        )  # (B * V, C, N, 1)
        sampled = sampled.reshape(batch, views, -1, n_voxels) * fov[:, :, None].to(sampled.dtype)
        volume = sampled.sum(dim=1) if volume is None else volume + sampled.sum(dim=1)
    if volume is None:
        raise ValueError("lift_features needs at least one feature map")
    count = fov.sum(dim=1).clamp(min=1).to(volume.dtype)  # (B, N)
    dtype = next(iter(feature_maps.values())).dtype
    return (volume / count[:, None]).reshape(batch, -1, *grid_size).to(dtype)


def _check_geometry(
    grid_size: Sequence[int], project_scale: int, feature_dim: int, context_prior: bool
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    grid = tuple(int(n) for n in grid_size)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid_size must be three positive ints (X, Y, Z), got {tuple(grid_size)}")
    if project_scale < 1 or project_scale & (project_scale - 1):
        raise ValueError(f"project_scale must be a power of two (1, 2, 4, ...), got {project_scale}")
    divisor = 4 * project_scale
    if context_prior and any(n % divisor for n in grid):
        raise ValueError(
            f"grid_size {grid} must be divisible by 4 * project_scale = {divisor} in every axis with the context "
            "prior (its relation targets live on grid_size // divisor); change project_scale or set context_prior=False"
        )
    if feature_dim < 4 or feature_dim % 4:
        raise ValueError(f"feature_dim must be a positive multiple of 4 (DDR bottleneck width), got {feature_dim}")
    # The 3D UNet halves the lifted grid twice: other grids are padded at the far end and the logits cropped back.
    grid = tuple(-(-n // divisor) * divisor for n in grid)
    bottleneck = tuple(n // divisor for n in grid)
    if context_prior and min(bottleneck) < 2:
        raise ValueError(
            f"context_prior needs at least 2 bottleneck voxels per axis, but grid_size {grid} // (4 * project_scale "
            f"= {divisor}) = {bottleneck}; use a smaller project_scale, a larger grid or context_prior=False"
        )
    return grid, bottleneck


class OccupancyPerceiver(nn.Module):
    """MonoScene-style perceiver: images ``(B, V, 3, H, W)`` + cameras -> SSC logits ``(B, C, X, Y, Z)``.

    Args:
        num_classes: number of SSC classes (0 = empty).
        grid_size: output grid ``(X, Y, Z)``. The network runs on the grid padded (at the far end) to a multiple of
            ``4 * project_scale`` and crops its logits back; with the context prior no padding is allowed.
        backbone: timm model name of the 2D encoder (CNN with NCHW feature maps).
        pretrained: local weights file of ``backbone`` (see :func:`build_backbone`); ``None`` = random init.
        feature_dim: channels of the lifted 3D features (MonoScene: 64 KITTI, 200 NYU); a multiple of 4.
        decoder_dim: 2D decoder width at the coarsest scale; ``None`` = the encoder's coarsest channel count.
        lift_scales: 2D scales lifted by FLoSP; each 1 or an encoder stride.
        project_scale: FLoSP lifts onto ``grid_size // project_scale`` (MonoScene: 2 KITTI, 1 NYU); the head
            upsamples back.
        context_prior: add the 3D context-relation prior at the bottleneck and return ``relation_logits``.
        n_relations: relation maps of the context prior (MonoScene: 4; 2 for the binary variant).

    Attributes:
        padded_size: ``grid_size`` rounded up to a multiple of ``4 * project_scale``.
        lifted_size: ``padded_size // project_scale``.
        bottleneck_size: ``padded_size // (4 * project_scale)``, the grid of the relation logits' voxel axis.
        relation_downsample: ``4 * project_scale``, the label downsampling that gives the relation targets' grid.
    """

    pixel_mean: Tensor
    pixel_std: Tensor

    def __init__(
        self,
        num_classes: int,
        grid_size: Sequence[int],
        backbone: str = "tf_efficientnet_b7.ns_jft_in1k",
        pretrained: str | None = None,
        feature_dim: int = 64,
        decoder_dim: int | None = None,
        lift_scales: Sequence[int] = (1, 2, 4, 8),
        project_scale: int = 2,
        context_prior: bool = True,
        n_relations: int = 4,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if not lift_scales:
            raise ValueError("lift_scales must name at least one 2D scale")
        self.padded_size, self.bottleneck_size = _check_geometry(grid_size, project_scale, feature_dim, context_prior)
        self.grid_size = tuple(int(n) for n in grid_size)
        self.num_classes = num_classes
        self.project_scale = project_scale
        self.lifted_size = tuple(n // project_scale for n in self.padded_size)
        self.relation_downsample = 4 * project_scale

        self.encoder = build_backbone(backbone, pretrained)
        feature_info: Any = self.encoder.feature_info
        channels = list(feature_info.channels())
        cfg = getattr(self.encoder, "pretrained_cfg", None) or {}
        self.register_buffer("pixel_mean", torch.tensor(cfg.get("mean", IMAGENET_MEAN)).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.get("std", IMAGENET_STD)).view(1, 3, 1, 1), False)
        self.decoder = ImageDecoder(
            channels,
            feature_info.reduction(),
            decoder_dim if decoder_dim is not None else channels[-1],
            feature_dim,
            lift_scales,
        )

        f = feature_dim
        self.encode_1 = nn.Sequential(Process3D(f), Downsample3D(f))  # lifted -> 1/2
        self.encode_2 = nn.Sequential(Process3D(2 * f), Downsample3D(2 * f))  # 1/2 -> 1/4 (bottleneck)
        self.context_prior = ContextPrior3D(4 * f, self.bottleneck_size, n_relations) if context_prior else None
        self.decode_2 = Upsample3D(4 * f, 2 * f)
        self.decode_1 = Upsample3D(2 * f, f)
        head_channels = [max(1, f // 2**i) for i in range(int(math.log2(project_scale)) + 1)]
        self.head_upsample = nn.Sequential(
            *[Upsample3D(c_in, c_out) for c_in, c_out in zip(head_channels, head_channels[1:], strict=False)]
        )
        self.head = SegmentationHead3D(head_channels[-1], head_channels[-1], num_classes)

    def forward(self, images: Tensor, camera: Camera) -> dict[str, Tensor]:
        """Predict semantic occupancy logits.

        Args:
            images: ``(B, V, 3, H, W)`` in ``[0, 1]``.
            camera: The rig of the ``B`` scenes: ``(B, V)`` intrinsics at ``image_size == (H, W)`` and
                voxel-to-camera transforms, and the output grid's ``voxel_origin`` and ``voxel_size`` (metres).

        Returns:
            ``logits`` ``(B, num_classes, X, Y, Z)``; with the context prior also ``relation_logits``
            ``(B, n_relations, N_bottleneck, N_super)`` (voxels and supervoxels flattened in C order).

        Raises:
            ValueError: ``images`` is not ``(B, V, 3, H, W)`` or does not match ``camera`` (batch, views, size).
        """
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be (B, V, 3, H, W), got {tuple(images.shape)}")
        batch, views, _, height, width = images.shape
        if (batch, views, height, width) != (camera.batch_size, camera.views, *camera.image_size):
            raise ValueError(
                f"images {tuple(images.shape)} do not match the camera: {camera.batch_size} scene(s) of "
                f"{camera.views} view(s) at image_size {camera.image_size}"
            )
        intrinsics = camera.intrinsics
        x = (images.reshape(batch * views, 3, height, width) - self.pixel_mean) / self.pixel_std
        feature_maps = self.decoder(self.encoder(x), x)

        size = torch.as_tensor(camera.voxel_size, dtype=intrinsics.dtype, device=intrinsics.device)
        projection = project_voxels(
            self.lifted_size,
            camera.voxel_origin,
            size * self.project_scale,
            intrinsics,
            camera.voxel_to_camera,
            (height, width),
        )
        lifted = lift_features(feature_maps, projection, self.lifted_size)  # (B, F, X', Y', Z')

        half = self.encode_1(lifted)
        bottleneck = self.encode_2(half)
        output: dict[str, Tensor] = {}
        if self.context_prior is not None:
            bottleneck, relation_logits = self.context_prior(bottleneck)
        up = self.decode_2(bottleneck) + half
        up = self.decode_1(up) + lifted
        gx, gy, gz = self.grid_size
        output["logits"] = self.head(self.head_upsample(up))[..., :gx, :gy, :gz]
        if self.context_prior is not None:
            output["relation_logits"] = relation_logits
        return output
