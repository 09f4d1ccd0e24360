"""Mamba-based Dual Alignment (MDA): a semantic occupancy volume -> ControlNet-style residuals for the UNet.

Our reconstruction of OccScene's MDA module (``docs/design.md`` §6, with its departures from the paper). For every
camera view of a sample:

1. **Occupancy embedding**: a 1x1x1 ``Conv3d`` maps the ``C`` class probabilities of each voxel to ``embed_dim``.
2. **Frustum resampling** ("interpolation") into a pixel-aligned frustum volume ``(embed_dim, D, h, w)`` whose
   depth axis is the figure's "Depth Axis": cell ``(d, i, j)`` is latent pixel ``(i, j)`` (image pixels
   ``[j W / w, (j + 1) W / w)`` through the latent scale, likewise rows) times depth bin ``d``
   (:func:`depth_bin_edges`). Two ways to fill it (``frustum_sampling``):

   - ``"splat"`` (default, :func:`splat_frustum`): every voxel centre is projected with the view's intrinsics and
     ``voxel_to_camera`` and averaged into the cell it falls into (scatter-add of class probabilities and counts,
     linear in the voxels; the cell of a voxel depends only on the cameras and the grid). Every in-view voxel
     (centre inside the image, depth inside ``depth_range``) therefore reaches the residuals. Cells that no voxel
     centre falls into (near the camera one voxel spans several latent pixels; outside the grid) are
     point-sampled as below, so the volume is complete both near and far. The embedding is linear, so the ``C``
     class means are embedded per cell instead of embedding the whole grid first (the bias is scaled by the
     cell's weight: 1 for a mean, the in-grid trilinear weight for a point sample, 0 outside): identical to
     averaging the embedded voxels, cheaper whenever the frustum is smaller than the grid, and it never
     materialises the ``(B, embed_dim, X, Y, Z)`` volume. The scatter runs in float32 whatever the input dtype;
     its memory is ``O(X Y Z)`` scalars per view, projected in chunks, plus one ``(C, in-view voxels)`` gather per
     sample.
   - ``"point"``: every latent pixel centre is back-projected at the ``D`` bin-centre depths
     (:func:`frustum_points`) and the embedded volume is sampled there trilinearly (:func:`sample_frustum`). With
     bins metres apart against decimetre voxels most voxels are never read (measured: 19 % of the in-view voxels
     influence the residuals at ``configs/kitti.yaml``, 73 % at NYUv2, 9 % at nuScenes-Occupancy), which the
     deformable convolution cannot recover.

3. **3D deformable convolution** (pure PyTorch, :class:`DeformConv3d`) over that frustum volume.
4. **Camera encoding** (dual alignment, part 1): Fourier features of the normalised intrinsics and of the
   extrinsics -> MLP -> a per-view channel modulation ``P_hat`` multiplied in (paper: ``DConv3D(...) * P_hat``).
5. **3D patch embedding** into tokens; the noisy latent's own patch embedding is added to every depth token of its
   latent patch (the paper's ``L_agg = PE3D(L) + X_mam``, moved to the input of the Mamba so the control branch sees
   the latent it steers, as ControlNet does).
6. **Sequence**: the tokens of all views (and all frames) of a sample form ONE sequence (frame-major, then view,
   then latent row, column, depth) scanned by ``num_layers`` :class:`BiMambaBlock` layers (dual alignment, part 2).
7. **Residuals**: tokens are folded back, the depth axis is collapsed (learned depth attention or mean), and for
   every tensor the UNet accepts as an additional residual the features are resized to its resolution and mapped
   by a zero-initialised 1x1 ``Conv2d`` to its channels. Untrained, every residual is exactly zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from occscene_pl.camera import Camera
from occscene_pl.models.deform_conv import DeformConv3d
from occscene_pl.models.frustum import (
    DepthSpacing,
    FrustumSampling,
    depth_bin_centers,
    depth_bin_edges,
    frustum_grid,
    frustum_points,
    labels_to_probabilities,
    sample_frustum,
    splat_frustum,
)
from occscene_pl.models.generator import ResidualSpec
from occscene_pl.models.mamba import BiMambaBlock

# The frustum geometry (models/frustum.py) and DeformConv3d (models/deform_conv.py) are re-exported under their old
# import path.
__all__ = [
    "CameraEncoder",
    "DeformConv3d",
    "DepthSpacing",
    "FrustumSampling",
    "MambaDualAlignment",
    "depth_bin_centers",
    "depth_bin_edges",
    "frustum_grid",
    "frustum_points",
    "sample_frustum",
    "splat_frustum",
]


class CameraEncoder(nn.Module):
    """Camera parameters -> per-view channel modulation ``P_hat = 1 + MLP(Fourier(P))``.

    ``P`` has 16 entries: ``fx / W, fy / H, cx / W, cy / H`` (size-independent intrinsics), the 9 rotation entries and
    the 3 translation entries (metres) of ``voxel_to_camera``. Fourier features are ``[p, sin(2^k pi p),
    cos(2^k pi p)]`` for ``k < num_frequencies``. The ``1 +`` keeps the modulation centred on identity so a
    freshly initialised camera code does not scramble the occupancy features.

    Args:
        embed_dim: Output channels.
        num_frequencies: Fourier octaves.
        hidden_dim: MLP width (default ``4 * embed_dim``).
    """

    num_parameters = 16
    frequencies: Tensor

    def __init__(self, embed_dim: int, num_frequencies: int = 4, hidden_dim: int | None = None) -> None:
        super().__init__()
        self.num_frequencies = num_frequencies
        hidden = hidden_dim or 4 * embed_dim
        self.register_buffer(
            "frequencies", math.pi * 2.0 ** torch.arange(num_frequencies, dtype=torch.float32), persistent=False
        )
        in_dim = self.num_parameters * (1 + 2 * num_frequencies)
        self.hidden = nn.Linear(in_dim, hidden)
        self.out = nn.Linear(hidden, embed_dim)

    @staticmethod
    def camera_parameters(intrinsics: Tensor, voxel_to_camera: Tensor, image_size: Sequence[int]) -> Tensor:
        """Stack the 16 raw camera parameters.

        Args:
            intrinsics: ``(..., 3, 3)`` at ``image_size``.
            voxel_to_camera: ``(..., 4, 4)``.
            image_size: ``(H, W)``.

        Returns:
            ``(..., 16)``.
        """
        height, width = (float(s) for s in image_size)
        k = intrinsics
        normalised = torch.stack(
            (k[..., 0, 0] / width, k[..., 1, 1] / height, k[..., 0, 2] / width, k[..., 1, 2] / height), dim=-1
        )
        rotation = voxel_to_camera[..., :3, :3].flatten(-2)
        translation = voxel_to_camera[..., :3, 3]
        return torch.cat((normalised, rotation.to(normalised.dtype), translation.to(normalised.dtype)), dim=-1)

    def forward(self, intrinsics: Tensor, voxel_to_camera: Tensor, image_size: Sequence[int]) -> Tensor:
        """Encode cameras.

        Args:
            intrinsics: ``(N, 3, 3)``.
            voxel_to_camera: ``(N, 4, 4)``.
            image_size: ``(H, W)``.

        Returns:
            ``(N, embed_dim)`` multiplicative modulation.
        """
        p = self.camera_parameters(intrinsics, voxel_to_camera, image_size).to(self.frequencies.dtype)
        angles = p[..., None] * self.frequencies  # (N, 16, F)
        features = torch.cat((p, angles.sin().flatten(-2), angles.cos().flatten(-2)), dim=-1)
        return 1.0 + self.out(F.silu(self.hidden(features.to(self.hidden.weight.dtype))))


def _zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)  # type: ignore[arg-type]
    return conv


class MambaDualAlignment(nn.Module):
    """Occupancy + cameras + noisy latents -> one residual per UNet down-block tensor and one for the mid block.

    See the module docstring for the pipeline.

    Args:
        num_classes: Occupancy classes ``C``.
        residual_spec: The UNet's :class:`~occscene_pl.models.generator.ResidualSpec` (or a mapping of its fields).
        latent_channels: Channels ``c`` of the diffusion latents.
        embed_dim: Channels of the occupancy embedding / frustum volume.
        depth_bins: Depth samples ``D`` per latent pixel; divisible by ``patch_size[0]``.
        depth_range: ``(near, far)`` camera-frame depths (metres) covered by the bins.
        patch_size: ``(pd, ph, pw)`` 3D patch of the tokeniser (depth, latent rows, latent columns).
        num_layers: Number of :class:`BiMambaBlock`.
        d_state: SSM state size.
        d_model: Token width (default: the UNet's first block width, ``residual_spec.channels[0]``).
        d_conv: Mamba causal conv width.
        expand: Mamba inner expansion.
        norm: ``"layer"`` or ``"rms"`` in the Mamba blocks.
        depth_spacing: ``"linear"`` or ``"linear_increasing"`` (see :func:`depth_bin_centers`).
        deform_kernel_size: Kernel of the deformable conv (odd).
        deformable: False replaces the deformable conv by a plain ``Conv3d`` of the same kernel (the fallback of
            ``docs/design.md`` §6, step 3): ``K^3`` trilinear gathers per voxel dominate the CPU cost at latent
            resolution.
        camera_frequencies: Fourier octaves of the camera encoding.
        latent_fusion: Add the patch-embedded noisy latent to the occupancy tokens.
        depth_reduction: ``"attention"`` (softmax over depth tokens of a learned score) or ``"mean"``.
        gradient_checkpointing: Recompute the deformable-conv taps and each Mamba block in backward (memory).
        frustum_sampling: How the frustum volume reads the occupancy (module docstring, step 2): ``"splat"``
            (default) averages every voxel centre into the cell it projects into and point-samples only the cells
            no centre falls into; ``"point"`` is plain trilinear point sampling at the cell centres, which skips
            most voxels far from the camera.
    """

    depths: Tensor
    depth_edges: Tensor

    def __init__(
        self,
        num_classes: int,
        residual_spec: ResidualSpec | Mapping[str, Any],
        latent_channels: int,
        embed_dim: int = 32,
        depth_bins: int = 16,
        depth_range: tuple[float, float] = (1.0, 60.0),
        patch_size: tuple[int, int, int] = (4, 2, 2),
        num_layers: int = 2,
        d_state: int = 16,
        d_model: int | None = None,
        d_conv: int = 4,
        expand: float = 2,
        norm: Literal["layer", "rms"] = "layer",
        depth_spacing: DepthSpacing = "linear",
        deform_kernel_size: int = 3,
        deformable: bool = True,
        camera_frequencies: int = 4,
        latent_fusion: bool = True,
        depth_reduction: Literal["attention", "mean"] = "attention",
        gradient_checkpointing: bool = False,
        frustum_sampling: FrustumSampling = "splat",
    ) -> None:
        super().__init__()
        if isinstance(residual_spec, Mapping):
            residual_spec = ResidualSpec(**residual_spec)
        if not residual_spec.channels:
            raise ValueError(f"residual_spec needs at least one down residual, got {residual_spec}")
        patch = tuple(int(p) for p in patch_size)
        if len(patch) != 3 or min(patch) < 1:
            raise ValueError(f"patch_size must be three positive ints (pd, ph, pw), got {patch_size}")
        if depth_bins % patch[0]:
            raise ValueError(f"depth_bins ({depth_bins}) must be divisible by patch_size[0] ({patch[0]})")
        if deform_kernel_size < 1 or deform_kernel_size % 2 == 0:
            raise ValueError(f"deform_kernel_size must be odd and positive, got {deform_kernel_size}")
        if depth_reduction not in ("attention", "mean"):
            raise ValueError(f"depth_reduction must be 'attention' or 'mean', got {depth_reduction!r}")
        if frustum_sampling not in ("splat", "point"):
            raise ValueError(f"frustum_sampling must be 'splat' or 'point', got {frustum_sampling!r}")
        self.num_classes = num_classes
        self.residual_spec = residual_spec
        self.latent_channels = latent_channels
        self.embed_dim = embed_dim
        self.depth_bins = depth_bins
        self.depth_range = (float(depth_range[0]), float(depth_range[1]))
        self.patch_size = patch
        self.depth_reduction = depth_reduction
        self.frustum_sampling = frustum_sampling
        self.d_model = int(d_model or residual_spec.channels[0])
        self.register_buffer("depths", depth_bin_centers(depth_bins, self.depth_range, depth_spacing), persistent=False)
        self.register_buffer(
            "depth_edges",
            depth_bin_edges(depth_bins, self.depth_range, depth_spacing, dtype=torch.float64),
            persistent=False,
        )

        self.occupancy_embed = nn.Conv3d(num_classes, embed_dim, 1)
        self.deform_conv: nn.Module = (
            DeformConv3d(embed_dim, embed_dim, deform_kernel_size)
            if deformable
            else nn.Conv3d(embed_dim, embed_dim, deform_kernel_size, padding=deform_kernel_size // 2)
        )
        self.camera_encoder = CameraEncoder(embed_dim, camera_frequencies)
        self.patch_embed = nn.Conv3d(embed_dim, self.d_model, kernel_size=patch, stride=patch)
        self.latent_embed = (
            nn.Conv2d(latent_channels, self.d_model, kernel_size=patch[1:], stride=patch[1:]) if latent_fusion else None
        )
        self.blocks = nn.ModuleList(
            BiMambaBlock(self.d_model, d_state=d_state, d_conv=d_conv, expand=expand, norm=norm)
            for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(self.d_model)
        self.depth_score = nn.Linear(self.d_model, 1) if depth_reduction == "attention" else None
        self.down_convs = nn.ModuleList(_zero_conv(self.d_model, ch) for ch in residual_spec.channels)
        self.mid_conv = _zero_conv(self.d_model, residual_spec.mid_channels)
        self.gradient_checkpointing = gradient_checkpointing

    @property
    def gradient_checkpointing(self) -> bool:
        """Recompute the deformable conv taps and each Mamba block in backward instead of storing activations."""
        return self._gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self._gradient_checkpointing = bool(enabled)
        if isinstance(self.deform_conv, DeformConv3d):
            self.deform_conv.checkpoint_taps = bool(enabled)

    def _validate(
        self,
        occupancy: Tensor,
        intrinsics: Tensor,
        voxel_to_camera: Tensor,
        voxel_origin: Tensor,
        voxel_size: Tensor,
        image_size: Sequence[int],
        latents: Tensor,
        frames: int,
    ) -> None:
        """Raise a one-line ``ValueError`` naming the first input of :meth:`forward` with a wrong shape."""
        b = occupancy.shape[0]
        if voxel_origin.shape not in ((3,), (b, 3)):
            raise ValueError(
                f"MambaDualAlignment: voxel_origin must be ({b}, 3) or (3,), got {tuple(voxel_origin.shape)}"
            )
        if voxel_size.numel() not in (1, b):
            raise ValueError(
                f"MambaDualAlignment: voxel_size must be a scalar or ({b},), got {tuple(voxel_size.shape)}"
            )
        if occupancy.is_floating_point():
            if occupancy.dim() != 5 or occupancy.shape[1] != self.num_classes:
                raise ValueError(
                    f"MambaDualAlignment: occupancy must be (B, {self.num_classes}, X, Y, Z) class probabilities or "
                    f"(B, X, Y, Z) integer labels, got {tuple(occupancy.shape)} ({occupancy.dtype})"
                )
        elif occupancy.dim() != 4:
            raise ValueError(
                f"MambaDualAlignment: integer occupancy must be (B, X, Y, Z) labels, got {tuple(occupancy.shape)}"
            )
        if intrinsics.dim() != 4 or intrinsics.shape[0] != b or intrinsics.shape[2:] != (3, 3):
            raise ValueError(f"MambaDualAlignment: intrinsics must be ({b}, V, 3, 3), got {tuple(intrinsics.shape)}")
        v = intrinsics.shape[1]
        if voxel_to_camera.shape != (b, v, 4, 4):
            raise ValueError(
                f"MambaDualAlignment: voxel_to_camera must be ({b}, {v}, 4, 4) like intrinsics, "
                f"got {tuple(voxel_to_camera.shape)}"
            )
        if len(image_size) != 2 or min(int(s) for s in image_size) < 1:
            raise ValueError(f"MambaDualAlignment: image_size must be (H, W), got {tuple(image_size)}")
        if latents.dim() != 4 or latents.shape[0] != b * v or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"MambaDualAlignment: latents must be (B*V={b * v}, {self.latent_channels}, h, w), "
                f"got {tuple(latents.shape)}"
            )
        h, w = latents.shape[-2:]
        _, ph, pw = self.patch_size
        if h % ph or w % pw:
            raise ValueError(f"MambaDualAlignment: latent size {(h, w)} must be divisible by the patch size {(ph, pw)}")
        if frames < 1 or b % frames:
            raise ValueError(f"MambaDualAlignment: batch {b} must be a multiple of frames={frames}")

    def _occupancy_probabilities(self, occupancy: Tensor, dtype: torch.dtype) -> Tensor:
        """``(B, C, X, Y, Z)`` probabilities in ``dtype``; labels 255 and unknown ones embed as "nothing"."""
        if occupancy.is_floating_point():
            return occupancy.to(dtype)
        return labels_to_probabilities(occupancy, self.num_classes, dtype)

    def frustum_volume(
        self,
        occupancy: Tensor,
        intrinsics: Tensor,
        voxel_to_camera: Tensor,
        voxel_origin: Tensor | float,
        voxel_size: Tensor | float,
        image_size: Sequence[int],
        latent_size: Sequence[int],
    ) -> Tensor:
        """Steps 1-2 of the module docstring: the embedded occupancy resampled into every view's frustum.

        Args:
            occupancy: ``(B, C, X, Y, Z)`` class probabilities or ``(B, X, Y, Z)`` integer labels.
            intrinsics: ``(B, V, 3, 3)`` at ``image_size``.
            voxel_to_camera: ``(B, V, 4, 4)``.
            voxel_origin: ``(B, 3)`` or ``(3,)``.
            voxel_size: ``(B,)`` or a scalar.
            image_size: ``(H, W)`` of the images the intrinsics refer to.
            latent_size: ``(h, w)``.

        Returns:
            ``(B * V, embed_dim, D, h, w)``, index ``b * V + v``.
        """
        dtype = self.occupancy_embed.weight.dtype
        voxel_origin = torch.as_tensor(voxel_origin, device=intrinsics.device)
        voxel_size = torch.as_tensor(voxel_size, device=intrinsics.device)
        if self.frustum_sampling == "point":
            volume = self.occupancy_embed(self._occupancy_probabilities(occupancy, dtype))  # (B, E, X, Y, Z)
            points = frustum_points(intrinsics.float(), voxel_to_camera.float(), image_size, latent_size, self.depths)
            grid = frustum_grid(points, voxel_origin, voxel_size, volume.shape[-3:])
            return sample_frustum(volume, grid)
        # The 1x1x1 embedding is linear: embed the (C-channel) cell means instead of the (E-channel) grid; the bias
        # scales with the weight a field of ones gets, so this equals averaging the embedded voxels.
        values, weight, _ = splat_frustum(
            occupancy,
            intrinsics,
            voxel_to_camera,
            voxel_origin,
            voxel_size,
            image_size,
            latent_size,
            self.depth_edges,
            self.num_classes,
        )
        embed = self.occupancy_embed
        sampled = F.conv3d(values.to(dtype), embed.weight)
        if embed.bias is not None:
            sampled = sampled + embed.bias.reshape(1, -1, 1, 1, 1) * weight.to(sampled.dtype)
        return sampled

    def _frustum_features(
        self,
        occupancy: Tensor,
        intrinsics: Tensor,
        voxel_to_camera: Tensor,
        voxel_origin: Tensor,
        voxel_size: Tensor,
        image_size: Sequence[int],
        latent_size: Sequence[int],
    ) -> Tensor:
        """Steps 1-4 of the module docstring: ``(B * V, embed_dim, D, h, w)`` camera-modulated frustum features."""
        sampled = self.frustum_volume(
            occupancy, intrinsics, voxel_to_camera, voxel_origin, voxel_size, image_size, latent_size
        )
        frustum = self.deform_conv(sampled)  # (B*V, E, D, h, w)
        camera = self.camera_encoder(intrinsics.flatten(0, 1), voxel_to_camera.flatten(0, 1), image_size)
        return frustum * camera[:, :, None, None, None].to(frustum.dtype)

    def forward(
        self,
        occupancy: Tensor | None,
        camera: Camera,
        latents: Tensor,
        frames: int = 1,
    ) -> tuple[list[Tensor] | None, Tensor | None]:
        """Compute the UNet residuals.

        Args:
            occupancy: ``(B, C, X, Y, Z)`` class probabilities / one-hot, ``(B, X, Y, Z)`` integer labels (255 and
                other out-of-range labels embed as empty space), or ``None`` (no condition).
            camera: The rig of the ``B`` scenes: ``intrinsics`` ``(B, V, 3, 3)`` at ``image_size`` ``(H, W)``,
                ``voxel_to_camera`` ``(B, V, 4, 4)``, ``voxel_origin`` ``(B, 3)`` (or ``(3,)``) and ``voxel_size``
                ``(B,)`` (or a scalar).
            latents: ``(B*V, c, h, w)`` noisy latents, index ``b * V + v``.
            frames: Consecutive frames per clip along ``B`` (``B = clips * frames``, frame-major); the tokens of all
                frames and views of a clip form one sequence.

        Returns:
            ``(down_residuals, mid_residual)``: ``down_residuals[i]`` is ``(B*V, channels[i], ceil(h / ds_i),
            ceil(w / ds_i))`` and ``mid_residual`` ``(B*V, mid_channels, ceil(h / mid_ds), ceil(w / mid_ds))``;
            ``(None, None)`` when ``occupancy`` is ``None``.
        """
        if occupancy is None:
            return None, None
        intrinsics, voxel_to_camera, image_size = camera.intrinsics, camera.voxel_to_camera, camera.image_size
        voxel_origin = torch.as_tensor(camera.voxel_origin, device=intrinsics.device)
        voxel_size = torch.as_tensor(camera.voxel_size, device=intrinsics.device)
        self._validate(occupancy, intrinsics, voxel_to_camera, voxel_origin, voxel_size, image_size, latents, frames)
        h, w = latents.shape[-2:]
        features = self._frustum_features(
            occupancy, intrinsics, voxel_to_camera, voxel_origin, voxel_size, image_size, (h, w)
        )

        tokens = self.patch_embed(features)  # (N, d, D', h', w')
        if self.latent_embed is not None:
            tokens = tokens + self.latent_embed(latents.to(tokens.dtype))[:, :, None]
        n, d, depth, hp, wp = tokens.shape
        # Depth innermost: consecutive tokens walk along one camera ray, then across the latent patch grid.
        clips = occupancy.shape[0] // frames
        sequence = tokens.permute(0, 3, 4, 2, 1).reshape(clips, -1, d)  # (clips, frames * V * h' * w' * D', d)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                sequence = checkpoint(block, sequence, use_reentrant=False)
            else:
                sequence = block(sequence)
        tokens = self.norm_out(sequence).reshape(n, hp, wp, depth, d)
        if self.depth_score is not None:
            weights = torch.softmax(self.depth_score(tokens), dim=3)  # (N, h', w', D', 1)
            feature = (weights * tokens).sum(dim=3)
        else:
            feature = tokens.mean(dim=3)
        feature = feature.permute(0, 3, 1, 2)  # (N, d, h', w')

        resized: dict[tuple[int, int], Tensor] = {}

        def at_scale(downsample: int) -> Tensor:
            size = (-(-h // downsample), -(-w // downsample))  # ceil, like the UNet's stride-2 convs
            if size not in resized:
                if size == (hp, wp):
                    resized[size] = feature
                elif size[0] <= hp and size[1] <= wp:
                    resized[size] = F.adaptive_avg_pool2d(feature, size)
                else:
                    resized[size] = F.interpolate(feature, size=size, mode="bilinear", align_corners=False)
            return resized[size]

        spec = self.residual_spec
        down = [conv(at_scale(ds)) for conv, ds in zip(self.down_convs, spec.downsample, strict=True)]
        mid = self.mid_conv(at_scale(spec.mid_downsample))
        return down, mid
