"""Voxel <-> camera geometry shared by the datasets, the perceiver and the aligner.

Conventions (``docs/design.md`` §5): a voxel grid of shape ``(X, Y, Z)`` is placed in a metric "voxel frame" by its
``voxel_origin`` (the corner of voxel ``[0, 0, 0]``) and an isotropic ``voxel_size``; ``voxel_to_camera`` maps
voxel-frame points into a pinhole camera (x right, y down, z forward) whose ``intrinsics`` are expressed in pixel
indices (pixel centres at integer coordinates). Projections reproduce MonoScene's ``vox2pix``
(``docs/design.md`` §5.2): voxel centres, half-to-even rounding, strict ``0 <= u < W``, ``0 <= v < H``,
``z > 0``; exactly, up to float32 ties at half pixels (a few voxels in a million may round the other way).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "VoxelProjection",
    "grid_sample_dtype",
    "pixels_to_grid",
    "project_points",
    "project_voxels",
    "voxel_centers",
    "vox2pix",
]


def voxel_centers(
    grid_size: Sequence[int],
    voxel_origin: Tensor,
    voxel_size: Tensor | float,
) -> Tensor:
    """Metric centres of every voxel, flattened in C order over ``(X, Y, Z)``.

    Args:
        grid_size: ``(X, Y, Z)``.
        voxel_origin: ``(3,)`` or ``(B, 3)`` corner of voxel ``[0, 0, 0]`` in metres.
        voxel_size: scalar, ``()`` or ``(B,)`` edge length in metres.

    Returns:
        ``(N, 3)`` or ``(B, N, 3)`` with ``N = X * Y * Z``, in ``voxel_origin``'s dtype (float32 if integer).
    """
    origin = torch.as_tensor(voxel_origin)
    dtype = origin.dtype if origin.is_floating_point() else torch.float32
    origin = origin.to(dtype)
    size = torch.as_tensor(voxel_size, dtype=dtype, device=origin.device)
    axes = [torch.arange(n, dtype=dtype, device=origin.device) for n in grid_size]
    index = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (N, 3)
    if origin.dim() == 1:
        return origin + size * (index + 0.5)
    return origin[:, None, :] + size.reshape(-1, 1, 1) * (index + 0.5)  # (B, N, 3)


def project_points(points: Tensor, intrinsics: Tensor, voxel_to_camera: Tensor) -> tuple[Tensor, Tensor]:
    """Project voxel-frame points into each camera view.

    Args:
        points: ``(B, N, 3)`` metric points in the voxel frame.
        intrinsics: ``(B, V, 3, 3)`` pinhole matrices in pixel units.
        voxel_to_camera: ``(B, V, 4, 4)`` rigid transforms voxel frame -> camera.

    Returns:
        ``pixels`` ``(B, V, N, 2)`` continuous ``(u, v)`` pixel coordinates (undefined where ``depth <= 0``) and
        ``depth`` ``(B, V, N)``, the camera-frame z.
    """
    rotation = voxel_to_camera[..., :3, :3]  # (B, V, 3, 3)
    translation = voxel_to_camera[..., :3, 3]  # (B, V, 3)
    cam = torch.einsum("bvij,bnj->bvni", rotation, points) + translation[:, :, None, :]  # (B, V, N, 3)
    depth = cam[..., 2]
    # Guard the division only; points behind the camera are masked by the caller through `depth`.
    safe_depth = torch.where(depth.abs() < 1e-8, torch.full_like(depth, 1e-8), depth)
    fx, fy = intrinsics[..., 0, 0, None], intrinsics[..., 1, 1, None]  # (B, V, 1)
    cx, cy = intrinsics[..., 0, 2, None], intrinsics[..., 1, 2, None]
    u = fx * cam[..., 0] / safe_depth + cx
    v = fy * cam[..., 1] / safe_depth + cy
    return torch.stack((u, v), dim=-1), depth


class VoxelProjection:
    """Result of :func:`project_voxels`; a plain container so it can cross process boundaries."""

    __slots__ = ("depth", "fov_mask", "pixels")

    def __init__(self, pixels: Tensor, depth: Tensor, fov_mask: Tensor) -> None:
        self.pixels = pixels
        self.depth = depth
        self.fov_mask = fov_mask

    @property
    def rounded_pixels(self) -> Tensor:
        """``(B, V, N, 2)`` int64 pixel indices, rounded half-to-even as MonoScene does."""
        return torch.round(self.pixels).long()


def project_voxels(
    grid_size: Sequence[int],
    voxel_origin: Tensor,
    voxel_size: Tensor | float,
    intrinsics: Tensor,
    voxel_to_camera: Tensor,
    image_size: Sequence[int],
) -> VoxelProjection:
    """Project the centre of every voxel of a batch of grids into every view (MonoScene ``vox2pix``, batched).

    Args:
        grid_size: ``(X, Y, Z)``.
        voxel_origin: ``(B, 3)``.
        voxel_size: scalar or ``(B,)``.
        intrinsics: ``(B, V, 3, 3)`` at ``image_size``.
        voxel_to_camera: ``(B, V, 4, 4)``.
        image_size: ``(H, W)`` of the images the intrinsics refer to.

    Returns:
        A :class:`VoxelProjection` with ``pixels`` ``(B, V, N, 2)``, ``depth`` ``(B, V, N)`` and ``fov_mask``
        ``(B, V, N)`` (True where the rounded pixel lies inside the image and the depth is positive).
    """
    height, width = image_size
    dtype = intrinsics.dtype if intrinsics.is_floating_point() else torch.float32
    origin = torch.as_tensor(voxel_origin, device=intrinsics.device, dtype=dtype)
    if origin.dim() == 1:
        origin = origin.expand(intrinsics.shape[0], 3)
    points = voxel_centers(grid_size, origin, torch.as_tensor(voxel_size, device=intrinsics.device, dtype=dtype))
    pixels, depth = project_points(points, intrinsics.to(dtype), voxel_to_camera.to(dtype))
    rounded = torch.round(pixels)
    fov_mask = (
        (rounded[..., 0] >= 0) & (rounded[..., 0] < width) & (rounded[..., 1] >= 0) & (rounded[..., 1] < height)
    ) & (depth > 0)
    return VoxelProjection(pixels, depth, fov_mask)


def pixels_to_grid(pixels: Tensor, image_size: Sequence[int]) -> Tensor:
    """Convert pixel-index coordinates to ``grid_sample``'s ``[-1, 1]`` range (``align_corners=False``).

    Args:
        pixels: ``(..., 2)`` ``(u, v)`` with pixel centres at integers.
        image_size: ``(H, W)``.

    Returns:
        ``(..., 2)`` normalised ``(x, y)``.
    """
    height, width = image_size
    scale = pixels.new_tensor([2.0 / width, 2.0 / height])
    return (pixels + 0.5) * scale - 1.0


def grid_sample_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype to run ``grid_sample`` in for ``tensor``: float32 for half precision, else its own dtype.

    Half-precision grid coordinates are off by a fraction of a voxel at the grid sizes of the datasets.

    Args:
        tensor: The sampled volume (or any tensor of the computation).

    Returns:
        ``torch.float32`` for float16 / bfloat16, ``tensor.dtype`` otherwise.
    """
    return torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.dtype


def vox2pix(
    voxel_to_camera: np.ndarray,
    intrinsics: np.ndarray,
    voxel_origin: np.ndarray,
    voxel_size: float,
    image_width: int,
    image_height: int,
    grid_size: Sequence[int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy port of MonoScene's ``vox2pix`` for one camera (float32 arithmetic, as the original).

    Args:
        voxel_to_camera: ``(4, 4)``.
        intrinsics: ``(3, 3)``.
        voxel_origin: ``(3,)``.
        voxel_size: metres.
        image_width: ``W``.
        image_height: ``H``.
        grid_size: ``(X, Y, Z)``; MonoScene derives it from ``ceil(scene_size / voxel_size)``, we take it explicitly.

    Returns:
        ``projected_pix`` ``(N, 2)`` int64 ``(u, v)``, ``fov_mask`` ``(N,)`` bool and ``pix_z`` ``(N,)`` float32.
    """
    xs, ys, zs = np.meshgrid(*(np.arange(n) for n in grid_size), indexing="ij")
    index = np.stack([xs.reshape(-1), ys.reshape(-1), zs.reshape(-1)], axis=1).astype(np.float32)
    points = np.asarray(voxel_origin, dtype=np.float32) + np.float32(voxel_size) * (index + np.float32(0.5))
    homogeneous = np.concatenate([points, np.ones((len(points), 1), np.float32)], axis=1)
    cam = (np.asarray(voxel_to_camera, np.float32) @ homogeneous.T).T[:, :3]
    k = np.asarray(intrinsics, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.round(k[0, 0] * cam[:, 0] / cam[:, 2] + k[0, 2])
        v = np.round(k[1, 1] * cam[:, 1] / cam[:, 2] + k[1, 2])
    fov = (u >= 0) & (u < image_width) & (v >= 0) & (v < image_height) & (cam[:, 2] > 0)
    pix = np.stack([np.nan_to_num(u), np.nan_to_num(v)], axis=1).astype(np.int64)
    return pix, fov, cam[:, 2]
