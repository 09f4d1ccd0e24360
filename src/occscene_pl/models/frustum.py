"""Frustum resampling of a voxel grid: the "interpolation" of the MDA (``docs/design.md`` §6, step 2).

A view's frustum volume ``(C, D, h, w)`` is pixel-aligned with the diffusion latent: cell ``(d, i, j)`` is latent
pixel ``(i, j)`` (image pixels ``[j W / w, (j + 1) W / w)`` through the latent scale, likewise rows) times depth bin
``d`` (:func:`depth_bin_edges`). Two ways to fill it:

- :func:`splat_frustum`: every voxel centre is projected with the view's intrinsics and ``voxel_to_camera`` and
  averaged into the cell it falls into (scatter-add of class probabilities and counts); cells no centre falls into
  are point-sampled, so every in-view voxel reaches the volume and the volume is complete near and far.
- :func:`frustum_points` + :func:`frustum_grid` + :func:`sample_frustum`: every latent pixel centre is
  back-projected at the bin-centre depths and the volume is sampled there trilinearly (``grid_sample``).

Camera conventions are those of :mod:`occscene_pl.geometry` (``docs/design.md`` §5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from occscene_pl.geometry import grid_sample_dtype

__all__ = [
    "DepthSpacing",
    "FrustumSampling",
    "depth_bin_centers",
    "depth_bin_edges",
    "frustum_grid",
    "frustum_points",
    "labels_to_probabilities",
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


def sample_frustum(volume: Tensor, grid: Tensor) -> Tensor:
    """Trilinearly sample a volume in every view's frustum (zeros outside the grid).

    Args:
        volume: ``(B, C, X, Y, Z)``.
        grid: ``(B, V, D, h, w, 3)`` from :func:`frustum_grid`.

    Returns:
        ``(B * V, C, D, h, w)``, view-major inside a sample (index ``b * V + v``).
    """
    b, v, d, h, w, _ = grid.shape
    dtype = grid_sample_dtype(volume)
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


def labels_to_probabilities(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot class probabilities of integer occupancy labels.

    Args:
        labels: ``(B, X, Y, Z)`` train ids.
        num_classes: ``C``; 255 (ignore) and other labels outside ``[0, C)`` become all-zero probabilities
            ("nothing").
        dtype: Output dtype.

    Returns:
        ``(B, C, X, Y, Z)``.
    """
    labels = labels.long()
    valid = (labels >= 0) & (labels < num_classes)
    one_hot = F.one_hot(torch.where(valid, labels, 0), num_classes).to(dtype) * valid[..., None].to(dtype)
    return one_hot.permute(0, 4, 1, 2, 3)
