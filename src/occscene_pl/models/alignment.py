"""Mamba-based Dual Alignment (MDA): a semantic occupancy volume -> ControlNet-style residuals for the UNet.

Our reconstruction of OccScene's MDA module (``reference/paper.md`` §3, §10.4-10.5; DESIGN §4). For every camera
view of a sample:

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

from occscene_pl.models.generator import ResidualSpec
from occscene_pl.models.mamba import BiMambaBlock

__all__ = [
    "CameraEncoder",
    "DeformConv3d",
    "MambaDualAlignment",
    "depth_bin_centers",
    "depth_bin_edges",
    "frustum_grid",
    "frustum_points",
    "sample_frustum",
    "splat_frustum",
]

DepthSpacing = Literal["linear", "linear_increasing"]
FrustumSampling = Literal["splat", "point"]


def depth_bin_edges(
    depth_bins: int,
    depth_range: Sequence[float],
    spacing: DepthSpacing = "linear",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Camera-frame depths (z, metres) bounding the depth bins: bin ``k`` is ``[edges[k], edges[k + 1])``.

    ``"linear"``: ``depth_bins`` equal bins over ``[near, far]``. ``"linear_increasing"`` (LID, as in CaDDN /
    BEVDepth): bin ``k`` is ``k + 1`` times as wide as the first, with edges
    ``near + (far - near) * k (k + 1) / (D (D + 1))``, so near depths, where a voxel covers many pixels, get finer
    bins.

    Args:
        depth_bins: Number of bins ``D``.
        depth_range: ``(near, far)`` with ``0 < near < far``.
        spacing: ``"linear"`` or ``"linear_increasing"``.
        device: Output device.
        dtype: Output dtype.

    Returns:
        ``(D + 1,)`` increasing depths from ``near`` to ``far``.
    """
    near, far = float(depth_range[0]), float(depth_range[1])
    if depth_bins < 1:
        raise ValueError(f"depth_bins must be >= 1, got {depth_bins}")
    if not 0 < near < far:
        raise ValueError(f"depth_range must be (near, far) with 0 < near < far, got {tuple(depth_range)}")
    k = torch.arange(depth_bins + 1, dtype=torch.float64)
    if spacing == "linear":
        edges = near + (far - near) * k / depth_bins
    elif spacing == "linear_increasing":
        edges = near + (far - near) * k * (k + 1) / (depth_bins * (depth_bins + 1))
    else:
        raise ValueError(f"depth spacing must be 'linear' or 'linear_increasing', got {spacing!r}")
    return edges.to(device=device, dtype=dtype)


def depth_bin_centers(
    depth_bins: int,
    depth_range: Sequence[float],
    spacing: DepthSpacing = "linear",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Camera-frame depths (z, metres) at which each latent pixel's ray is sampled: the centres of the depth bins.

    The bins are those of :func:`depth_bin_edges` (same arguments).

    Args:
        depth_bins: Number of bins ``D``.
        depth_range: ``(near, far)`` with ``0 < near < far``.
        spacing: ``"linear"`` or ``"linear_increasing"``.
        device: Output device.
        dtype: Output dtype.

    Returns:
        ``(D,)`` increasing depths.
    """
    edges = depth_bin_edges(depth_bins, depth_range, spacing, dtype=torch.float64)
    return (0.5 * (edges[:-1] + edges[1:])).to(device=device, dtype=dtype)


def frustum_points(
    intrinsics: Tensor,
    voxel_to_camera: Tensor,
    image_size: Sequence[int],
    latent_size: Sequence[int],
    depths: Tensor,
) -> Tensor:
    """Back-project every latent pixel centre at every depth into the voxel frame (inverse of ``project_points``).

    Latent pixel ``(i, j)`` covers image pixels ``[j * W / w, (j + 1) * W / w)``; with pixel centres at integer
    coordinates (``occscene_pl.geometry``) its centre is ``u = (j + 0.5) * W / w - 0.5`` (likewise ``v``). The
    camera point at depth ``d`` is ``(d (u - cx) / fx, d (v - cy) / fy, d)``, mapped to the voxel frame by
    ``voxel_to_camera^-1``.

    Args:
        intrinsics: ``(B, V, 3, 3)`` at ``image_size``.
        voxel_to_camera: ``(B, V, 4, 4)``.
        image_size: ``(H, W)`` the intrinsics refer to.
        latent_size: ``(h, w)``.
        depths: ``(D,)`` camera-frame z values.

    Returns:
        ``(B, V, D, h, w, 3)`` metric points in the voxel frame, in ``intrinsics``' floating dtype.
    """
    height, width = (int(s) for s in image_size)
    h, w = (int(s) for s in latent_size)
    dtype = intrinsics.dtype if intrinsics.is_floating_point() else torch.float32
    device = intrinsics.device
    k = intrinsics.to(torch.float64)
    u = (torch.arange(w, device=device, dtype=torch.float64) + 0.5) * (width / w) - 0.5
    v = (torch.arange(h, device=device, dtype=torch.float64) + 0.5) * (height / h) - 0.5
    fx, fy = k[..., 0, 0, None, None], k[..., 1, 1, None, None]  # (B, V, 1, 1)
    cx, cy = k[..., 0, 2, None, None], k[..., 1, 2, None, None]
    x_over_z = ((u[None, :] - cx) / fx).expand(*k.shape[:2], h, w)  # (B, V, h, w)
    y_over_z = ((v[:, None] - cy) / fy).expand(*k.shape[:2], h, w)
    rays = torch.stack((x_over_z, y_over_z, torch.ones_like(x_over_z)), dim=-1)  # (B, V, h, w, 3)
    cam = depths.to(device=device, dtype=torch.float64)[:, None, None, None] * rays[:, :, None]  # (B, V, D, h, w, 3)
    # float64 inverse: the transforms carry metre-scale translations and the test compares at voxel centres.
    cam_to_voxel = torch.linalg.inv(voxel_to_camera.to(torch.float64))
    rotation, translation = cam_to_voxel[..., :3, :3], cam_to_voxel[..., :3, 3]
    points = torch.einsum("bvij,bvdhwj->bvdhwi", rotation, cam) + translation[:, :, None, None, None, :]
    return points.to(dtype)


def frustum_grid(points: Tensor, voxel_origin: Tensor, voxel_size: Tensor | float, grid_size: Sequence[int]) -> Tensor:
    """Convert voxel-frame points to ``grid_sample`` coordinates of a ``(B, C, X, Y, Z)`` volume.

    ``grid_sample`` (``align_corners=False``) reads its last grid axis as the volume's last dimension, so the
    normalised coordinates are returned in ``(Z, Y, X)`` order; voxel centres land on the sampling lattice.

    Args:
        points: ``(B, ..., 3)`` metric points.
        voxel_origin: ``(B, 3)`` or ``(3,)`` corner of voxel ``[0, 0, 0]``.
        voxel_size: scalar, ``()`` or ``(B,)``.
        grid_size: ``(X, Y, Z)``.

    Returns:
        ``(B, ..., 3)`` in ``[-1, 1]`` inside the grid.
    """
    batch = points.shape[0]
    extra = points.dim() - 2
    origin = torch.as_tensor(voxel_origin, device=points.device, dtype=points.dtype).expand(batch, 3)
    size = torch.as_tensor(voxel_size, device=points.device, dtype=points.dtype).reshape(-1).expand(batch)
    dims = points.new_tensor([float(n) for n in grid_size])
    shape = (batch,) + (1,) * extra
    normalised = 2.0 * (points - origin.reshape(*shape, 3)) / (size.reshape(*shape, 1) * dims) - 1.0
    return normalised.flip(-1)


def _sampling_dtype(tensor: Tensor) -> torch.dtype:
    # Half-precision grid coordinates are off by a fraction of a voxel at these sizes: sample in float32.
    return torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.dtype


def sample_frustum(volume: Tensor, grid: Tensor) -> Tensor:
    """Trilinearly sample a volume in every view's frustum (zeros outside the grid).

    Args:
        volume: ``(B, C, X, Y, Z)``.
        grid: ``(B, V, D, h, w, 3)`` from :func:`frustum_grid`.

    Returns:
        ``(B * V, C, D, h, w)``, view-major inside a sample (index ``b * V + v``).
    """
    b, v, d, h, w, _ = grid.shape
    dtype = _sampling_dtype(volume)
    # The views share the volume: stack them along the sampled depth axis instead of copying the volume V times.
    out = F.grid_sample(
        volume.to(dtype),
        grid.reshape(b, v * d, h, w, 3).to(dtype),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # (B, C, V * D, h, w)
    c = volume.shape[1]
    return out.reshape(b, c, v, d, h, w).transpose(1, 2).reshape(b * v, c, d, h, w)


# Voxels projected at once by _view_cells: cache-sized temporaries on CPU, few synchronising nonzero() on GPU.
_SPLAT_CHUNK = {"cpu": 1 << 18, "cuda": 1 << 23}


def _per_sample(value: Tensor, batch: int, width: int) -> Tensor:
    """``(B, width)`` float64 from a scalar, ``(width,)``, ``(B,)`` or ``(B, width)`` tensor."""
    value = value.to(torch.float64)
    if value.dim() == 2:
        return value.expand(batch, width)
    return value.reshape(-1, 1).expand(batch, width) if width == 1 else value.reshape(1, width).expand(batch, width)


def _view_cells(
    intrinsics: Tensor,
    voxel_to_camera: Tensor,
    origin: Tensor,
    size: Tensor,
    grid_size: Sequence[int],
    image_size: Sequence[int],
    latent_size: Sequence[int],
    depth_edges: Tensor,
) -> tuple[Tensor, Tensor]:
    """Flat voxel index and flat frustum cell ``(d * h + i) * w + j`` of every in-view voxel centre of one view.

    In view: the centre projects inside the image (pixel centres at integer coordinates, so ``u`` in
    ``[-0.5, W - 0.5)``) at a camera depth in ``[depth_edges[0], depth_edges[-1])``. Projection as
    :func:`occscene_pl.geometry.project_points` (``u = fx x / z + cx``). The camera coordinates are sums of three
    per-axis terms (computed in float64), so only ``O(X Y Z)`` float32 scalars are materialised, never ``(N, 3)``.
    """
    height, width = (int(s) for s in image_size)
    h, w = (int(s) for s in latent_size)
    device = intrinsics.device
    t = voxel_to_camera.to(torch.float64)
    axes = [
        origin[a] + (torch.arange(int(n), device=device, dtype=torch.float64) + 0.5) * size
        for a, n in enumerate(grid_size)
    ]
    # terms[row][a]: contribution of voxel axis a to camera coordinate `row` (translation folded into the z term).
    terms = [[(t[row, a] * axes[a] + (t[row, 3] if a == 2 else 0.0)).float() for a in range(3)] for row in range(3)]
    k = intrinsics.to(torch.float64).cpu()
    fx, fy, cx, cy = (float(k[i, j]) for i, j in ((0, 0), (1, 1), (0, 2), (1, 2)))
    edges = depth_edges.to(torch.float64).cpu()
    near, far = float(edges[0]), float(edges[-1])
    inner = edges[1:-1].to(device=device, dtype=torch.float32)
    nx, ny, nz = (int(n) for n in grid_size)
    step = max(
        1, _SPLAT_CHUNK.get(device.type, 1 << 20) // (ny * nz)
    )  # x-slices per chunk: cache-sized temporaries, bounded memory
    voxels, cells = [], []
    for start in range(0, nx, step):
        stop = min(nx, start + step)

        def camera(row: int, start: int = start, stop: int = stop) -> Tensor:  # (x, Y, Z) float32
            x, y, z = terms[row]
            return (x[start:stop, None, None] + y[None, :, None]) + z[None, None, :]

        depth = camera(2)
        inside = (depth >= near) & (depth < far)
        u = camera(0).div_(depth).mul_(fx).add_(cx)  # inf / nan where depth == 0: outside [near, far) anyway
        inside &= (u >= -0.5) & (u < width - 0.5)
        v = camera(1).div_(depth).mul_(fy).add_(cy)
        inside &= (v >= -0.5) & (v < height - 0.5)
        voxel = inside.flatten().nonzero().squeeze(1)
        u, v, depth = u.flatten()[voxel], v.flatten()[voxel], depth.flatten()[voxel]
        col = ((u + 0.5) * (w / width)).floor_().long().clamp_(0, w - 1)
        row = ((v + 0.5) * (h / height)).floor_().long().clamp_(0, h - 1)
        bins = torch.bucketize(depth, inner, right=True).clamp_(max=inner.numel())
        voxels.append(voxel + start * ny * nz)
        cells.append((bins * h + row) * w + col)
    return torch.cat(voxels), torch.cat(cells)


def _trilinear_taps(points: Tensor, origin: Tensor, size: Tensor, grid_size: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Flat voxel indices ``(P, 8)`` and weights ``(P, 8)`` of trilinear interpolation at ``(P, 3)`` points.

    The same interpolation as ``grid_sample(..., align_corners=False, padding_mode="zeros")`` on
    :func:`frustum_grid` coordinates: voxel centres sit at integer voxel coordinates and corners outside the grid
    get weight 0 (their index is clamped into the grid).
    """
    coord = (points.to(torch.float64) - origin) / size - 0.5  # (P, 3) voxel coordinates
    low = coord.floor()
    frac = (coord - low).float()
    low_i = low.long()
    dims = [int(n) for n in grid_size]
    indices, weights = [], []
    for corner in range(8):
        offset = [(corner >> (2 - a)) & 1 for a in range(3)]
        flat = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
        weight = torch.ones(points.shape[0], dtype=torch.float32, device=points.device)
        for a in range(3):
            index = low_i[:, a] + offset[a]
            valid = (index >= 0) & (index < dims[a])
            weight = weight * (frac[:, a] if offset[a] else 1.0 - frac[:, a]) * valid
            flat = flat * dims[a] + index.clamp(0, dims[a] - 1)
        indices.append(flat)
        weights.append(weight)
    return torch.stack(indices, dim=1), torch.stack(weights, dim=1)


def splat_frustum(
    occupancy: Tensor,
    intrinsics: Tensor,
    voxel_to_camera: Tensor,
    voxel_origin: Tensor,
    voxel_size: Tensor | float,
    image_size: Sequence[int],
    latent_size: Sequence[int],
    depth_edges: Tensor,
    num_classes: int | None = None,
    fill_empty: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Average the class probabilities of the voxel centres falling into every frustum cell of every view.

    Cell ``(d, i, j)`` of a view is latent pixel ``(i, j)`` (image pixels ``[j W / w, (j + 1) W / w)``, likewise
    rows) times depth bin ``d`` (``[depth_edges[d], depth_edges[d + 1])``). Every voxel whose centre projects into
    the image at a depth inside ``[depth_edges[0], depth_edges[-1])`` lands in exactly one cell per view (a
    scatter-add of probabilities and counts), so every in-view voxel reaches the output. Cells that no voxel centre
    falls into (near the camera, where one voxel spans several latent pixels, or outside the grid) take with
    ``fill_empty`` the trilinear sample of the grid at the cell centre (latent pixel centre, bin centre), exactly
    what :func:`sample_frustum` reads there (zeros outside the grid). Differentiable w.r.t. float ``occupancy``;
    computed in float32 (float64 geometry) whatever the input dtype.

    Args:
        occupancy: ``(B, C, X, Y, Z)`` class probabilities, or ``(B, X, Y, Z)`` integer labels (with
            ``num_classes``; labels outside ``[0, num_classes)``, e.g. 255, count as all-zero probabilities).
        intrinsics: ``(B, V, 3, 3)`` at ``image_size``.
        voxel_to_camera: ``(B, V, 4, 4)``.
        voxel_origin: ``(B, 3)`` or ``(3,)`` corner of voxel ``[0, 0, 0]``.
        voxel_size: scalar, ``()`` or ``(B,)``.
        image_size: ``(H, W)`` the intrinsics refer to.
        latent_size: ``(h, w)``.
        depth_edges: ``(D + 1,)`` increasing camera depths, e.g. :func:`depth_bin_edges`.
        num_classes: ``C`` for integer labels (ignored for probabilities).
        fill_empty: Fill cells without a voxel centre by trilinear sampling (else they stay zero).

    Returns:
        ``(values, weight, count)``, view-major inside a sample (index ``b * V + v``): ``values``
        ``(B * V, C, D, h, w)`` float32 cell means (or samples); ``weight`` ``(B * V, 1, D, h, w)`` float32, the
        weight a constant field of ones would get (1 in splatted cells, the in-grid trilinear weight in filled ones,
        0 elsewhere: what the bias of a linear embedding of ``values`` must be multiplied by to equal embedding
        first); ``count`` ``(B * V, 1, D, h, w)`` int64 voxel centres per cell.
    """
    labels = not occupancy.is_floating_point()
    if labels and num_classes is None:
        raise ValueError("splat_frustum: num_classes is required for integer label occupancy")
    batch, views = intrinsics.shape[:2]
    grid_size = tuple(int(s) for s in occupancy.shape[-3:])
    channels = int(num_classes) if labels else int(occupancy.shape[1])  # type: ignore[arg-type]
    h, w = (int(s) for s in latent_size)
    bins = depth_edges.numel() - 1
    cells = bins * h * w
    device = occupancy.device
    origins = _per_sample(torch.as_tensor(voxel_origin, device=device), batch, 3)
    sizes = _per_sample(torch.as_tensor(voxel_size, device=device), batch, 1)[:, 0]
    edges64 = depth_edges.to(device=device, dtype=torch.float64)
    centres = 0.5 * (edges64[:-1] + edges64[1:])
    points = frustum_points(
        intrinsics.to(torch.float64), voxel_to_camera.to(torch.float64), image_size, latent_size, centres
    ).reshape(batch, views, cells, 3)
    values, weights, counts = [], [], []
    for b in range(batch):
        # All views of a sample at once: one gather (hence one dense gradient in backward) per sample.
        voxel_list, cell_list = [], []
        for view in range(views):
            voxel, cell = _view_cells(
                intrinsics[b, view],
                voxel_to_camera[b, view],
                origins[b],
                sizes[b],
                grid_size,
                image_size,
                latent_size,
                edges64,
            )
            voxel_list.append(voxel)
            cell_list.append(cell + view * cells)
        voxel, cell = torch.cat(voxel_list), torch.cat(cell_list)
        count = torch.bincount(cell, minlength=views * cells)
        weight = (count > 0).float()
        empty = (count == 0).nonzero().squeeze(1) if fill_empty else count.new_zeros(0)
        taps, tap_weight = _trilinear_taps(points[b].reshape(-1, 3)[empty], origins[b], sizes[b], grid_size)
        weight = weight.index_add(0, empty, tap_weight.sum(dim=1))
        flat = occupancy[b].reshape(-1) if labels else occupancy[b].reshape(channels, -1)
        if labels:
            label = flat[voxel].long()
            keep = (label >= 0) & (label < channels)
            sums = torch.bincount(cell[keep] * channels + label[keep], minlength=views * cells * channels)
            sums = sums.reshape(views * cells, channels).T.float()
            tap_label = flat[taps].long()  # (P, 8)
            one_hot = F.one_hot(tap_label.clamp(0, channels - 1), channels).float()
            one_hot = one_hot * ((tap_label >= 0) & (tap_label < channels))[..., None]
            sampled = (one_hot * tap_weight[..., None]).sum(dim=1).T  # elementwise: float32 under autocast too
        else:
            gathered = flat.index_select(1, torch.cat((voxel, taps.flatten()))).float()  # float32 whatever the input
            sums = gathered.new_zeros(channels, views * cells).index_add_(1, cell, gathered[:, : voxel.numel()])
            tap_values = gathered[:, voxel.numel() :].reshape(channels, -1, 8)
            sampled = (tap_values * tap_weight).sum(dim=-1)  # (C, P)
        # Empty cells have a zero sum and count: adding the sample there and dividing by max(count, 1) fills them.
        mean = sums.index_add(1, empty, sampled) / count.clamp(min=1).float()
        values.append(mean.reshape(channels, views, cells).transpose(0, 1))
        weights.append(weight.reshape(views, 1, cells))
        counts.append(count.reshape(views, 1, cells))
    shape = (batch * views, -1, bins, h, w)
    return (
        torch.cat(values).reshape(shape),
        torch.cat(weights).reshape(shape),
        torch.cat(counts).reshape(shape),
    )


class DeformConv3d(nn.Module):
    """3D deformable convolution (DCNv1 in 3D), pure PyTorch: learned offsets + trilinear ``grid_sample``.

    Stride 1, "same" zero padding. An offset ``Conv3d`` (zero-initialised, so the layer starts as a regular
    ``Conv3d``) predicts per output voxel and kernel tap a displacement ``(dd, dh, dw)`` in voxels (offset channel
    ``3 t + axis`` for tap ``t`` in ``(kd, kh, kw)`` C order); the input is sampled at ``p + k_t + offset_t`` (zeros
    outside) and the taps are combined by the kernel weights. Taps are sampled and reduced one at a time, so no
    ``(N, C * K^3, D, H, W)`` tensor is materialised; with ``checkpoint_taps`` each tap's sample is recomputed in
    backward instead of being kept, which bounds training memory at ``O(C + 3 K^3)`` per voxel instead of
    ``O(K^3 (C + 3))``.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Odd kernel edge ``K``.
        bias: Add a bias.
        checkpoint_taps: Recompute each tap's trilinear sample in backward.
    """

    kernel_taps: Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        checkpoint_taps: bool = False,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"DeformConv3d kernel_size must be odd and positive, got {kernel_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.checkpoint_taps = checkpoint_taps
        # Same parameters and initialisation as nn.Conv3d, so the zero-offset layer is exactly a Conv3d.
        reference = nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.weight = nn.Parameter(reference.weight.detach().clone())
        self.bias = nn.Parameter(reference.bias.detach().clone()) if reference.bias is not None else None
        taps = kernel_size**3
        self.offset_conv = nn.Conv3d(in_channels, 3 * taps, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)  # type: ignore[arg-type]
        r = torch.arange(kernel_size, dtype=torch.float32) - kernel_size // 2
        taps_grid = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(taps, 3)  # (K^3, 3) (d, h, w)
        self.register_buffer("kernel_taps", taps_grid, persistent=False)

    @staticmethod
    def _tap(x: Tensor, position: Tensor, weight: Tensor) -> Tensor:
        # position: (N, D, H, W, 3) voxel-index coordinates (d, h, w); weight: (C_out, C_in) of this tap.
        dims = position.new_tensor([float(s) for s in x.shape[-3:]])
        grid = ((2.0 * position + 1.0) / dims - 1.0).flip(-1)  # align_corners=False, grid_sample's (w, h, d) order
        sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return torch.einsum("oc,ncdhw->nodhw", weight, sampled)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the deformable convolution.

        Args:
            x: ``(N, C_in, D, H, W)``.

        Returns:
            ``(N, C_out, D, H, W)``.
        """
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"DeformConv3d expects (N, {self.in_channels}, D, H, W), got {tuple(x.shape)}")
        n, _, d, h, w = x.shape
        taps = int(self.kernel_taps.shape[0])
        offsets = self.offset_conv(x).reshape(n, taps, 3, d, h, w).permute(0, 1, 3, 4, 5, 2)  # (N, K^3, D, H, W, 3)
        dtype = _sampling_dtype(x)
        x, offsets = x.to(dtype), offsets.to(dtype)
        axes = [torch.arange(s, device=x.device, dtype=dtype) for s in (d, h, w)]
        base = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (D, H, W, 3) voxel indices
        weight = self.weight.reshape(self.out_channels, self.in_channels, taps).to(dtype)
        recompute = self.checkpoint_taps and torch.is_grad_enabled()
        out = None
        for t in range(taps):
            position = base + self.kernel_taps[t].to(offsets.dtype) + offsets[:, t]
            if recompute:
                term = checkpoint(self._tap, x, position, weight[:, :, t], use_reentrant=False)
            else:
                term = self._tap(x, position, weight[:, :, t])
            out = term if out is None else out + term
        assert out is not None
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1, 1)
        return out


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
        deformable: False replaces the deformable conv by a plain ``Conv3d`` of the same kernel (paper.md §10.4's
            fallback): ``K^3`` trilinear gathers per voxel dominate the CPU cost at latent resolution.
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
        if occupancy.is_floating_point():
            return occupancy.to(dtype)
        labels = occupancy.long()
        valid = (labels >= 0) & (labels < self.num_classes)  # 255 (ignore) and unknown labels embed as "nothing"
        one_hot = F.one_hot(torch.where(valid, labels, 0), self.num_classes).to(dtype) * valid[..., None].to(dtype)
        return one_hot.permute(0, 4, 1, 2, 3)

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
        sampled = self.frustum_volume(
            occupancy, intrinsics, voxel_to_camera, voxel_origin, voxel_size, image_size, latent_size
        )
        frustum = self.deform_conv(sampled)  # (B*V, E, D, h, w)
        camera = self.camera_encoder(intrinsics.flatten(0, 1), voxel_to_camera.flatten(0, 1), image_size)
        return frustum * camera[:, :, None, None, None].to(frustum.dtype)

    def forward(
        self,
        occupancy: Tensor | None,
        intrinsics: Tensor,
        voxel_to_camera: Tensor,
        voxel_origin: Tensor,
        voxel_size: Tensor | float,
        image_size: Sequence[int],
        latents: Tensor,
        frames: int = 1,
    ) -> tuple[list[Tensor] | None, Tensor | None]:
        """Compute the UNet residuals.

        Args:
            occupancy: ``(B, C, X, Y, Z)`` class probabilities / one-hot, ``(B, X, Y, Z)`` integer labels (255 and
                other out-of-range labels embed as empty space), or ``None`` (no condition).
            intrinsics: ``(B, V, 3, 3)`` at ``image_size``.
            voxel_to_camera: ``(B, V, 4, 4)``.
            voxel_origin: ``(B, 3)``.
            voxel_size: ``(B,)`` or a scalar.
            image_size: ``(H, W)`` of the images the intrinsics refer to.
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
        voxel_origin = torch.as_tensor(voxel_origin, device=intrinsics.device)
        voxel_size = torch.as_tensor(voxel_size, device=intrinsics.device)
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
