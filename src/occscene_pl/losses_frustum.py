"""MonoScene's frustum proportion loss (``docs/design.md`` §7.2) and the frustums it is computed over.

Each view's image is cut into ``frustum_size x frustum_size`` equal cells; a voxel belongs to the frustum of the cell
its rounded projection falls in (with positive depth). :func:`frustum_masks` gives MonoScene's dense masks,
:func:`frustum_ids` the same partition as one index per voxel and view (much faster in the loss), and
:func:`frustum_proportion_loss` compares the class distribution of every frustum with the predicted one. Like the other
SSC losses, it returns a defined value where MonoScene would divide by zero and is computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from occscene_pl._loss_inputs import flatten_voxels

__all__ = ["frustum_ids", "frustum_masks", "frustum_proportion_loss"]


def frustum_masks(
    projection_pixels: Tensor,
    depth: Tensor,
    image_size: Sequence[int],
    grid_size: Sequence[int],
    frustum_size: int = 8,
) -> Tensor:
    """Local frustum masks of MonoScene's ``compute_local_frustums`` (``docs/design.md`` §7.2), batched.

    The image is cut into ``frustum_size`` equal row bands x ``frustum_size`` equal column bands (float bounds
    ``i / frustum_size * W``); frustum ``f = row * frustum_size + col`` holds the voxels whose rounded projection
    ``(u, v)`` falls in its cell and whose depth is positive. The ``target != 255`` part of MonoScene's mask is applied
    by :func:`frustum_proportion_loss`. With ``V`` views every view has its own ``frustum_size ** 2`` frustums, view
    ``v``'s numbered from ``v * frustum_size ** 2`` (a voxel seen by overlapping views lies in a frustum of each).

    Args:
        projection_pixels: ``(B, N, 2)`` ``(u, v)`` of the full-resolution grid in one view, or ``(B, V, N, 2)`` in
            ``V`` views (``project_voxels(...).pixels``; rounded half-to-even here, so continuous or already-rounded
            pixels both work).
        depth: ``(B, N)`` or ``(B, V, N)`` camera-frame depth.
        image_size: ``(H, W)`` the pixels refer to.
        grid_size: ``(X, Y, Z)`` with ``X * Y * Z == N``.
        frustum_size: bands per image axis (MonoScene: 8, i.e. 64 frustums per view).

    Returns:
        ``(B, V * frustum_size ** 2, X, Y, Z)`` bool (``V = 1`` for single-view inputs).

    Raises:
        ValueError: if the pixels, depth and grid size do not agree.
    """
    _check_projection(projection_pixels, depth, grid_size)
    if depth.dim() == 3:
        return torch.cat(
            [
                frustum_masks(pixels, view_depth, image_size, grid_size, frustum_size)
                for pixels, view_depth in zip(projection_pixels.unbind(1), depth.unbind(1), strict=True)
            ],
            dim=1,
        )
    height, width = image_size
    batch = depth.shape[0]
    pixels = torch.round(projection_pixels).double()  # float64 bounds, like MonoScene's numpy
    fractions = [(i * 1.0 / frustum_size, (i * 1.0 + 1) / frustum_size) for i in range(frustum_size)]
    device = projection_pixels.device
    starts_x = torch.tensor([a * width for a, _ in fractions], dtype=torch.float64, device=device)[None, :, None]
    ends_x = torch.tensor([b * width for _, b in fractions], dtype=torch.float64, device=device)[None, :, None]
    starts_y = torch.tensor([a * height for a, _ in fractions], dtype=torch.float64, device=device)[None, :, None]
    ends_y = torch.tensor([b * height for _, b in fractions], dtype=torch.float64, device=device)[None, :, None]
    u, v = pixels[:, None, :, 0], pixels[:, None, :, 1]
    in_x = (u >= starts_x) & (u < ends_x)  # (B, S, N)
    in_y = (v >= starts_y) & (v < ends_y) & (depth[:, None] > 0)
    masks = in_y[:, :, None] & in_x[:, None]  # (B, S_rows, S_cols, N), row-major like MonoScene
    return masks.reshape(batch, frustum_size * frustum_size, *grid_size)


def _check_projection(projection_pixels: Tensor, depth: Tensor, grid_size: Sequence[int]) -> None:
    """Check that pixels ``(B, [V,] N, 2)`` and depth ``(B, [V,] N)`` agree with each other and with the grid.

    Raises:
        ValueError: if the shapes do not match or ``N`` is not the grid's voxel count.
    """
    if depth.dim() not in (2, 3) or tuple(projection_pixels.shape) != (*depth.shape, 2):
        raise ValueError(
            f"projection_pixels must be (B, N, 2) or (B, V, N, 2) and depth (B, N) or (B, V, N), got "
            f"{tuple(projection_pixels.shape)} and {tuple(depth.shape)}"
        )
    if depth.shape[-1] != math.prod(grid_size):
        raise ValueError(
            f"projection has {depth.shape[-1]} voxels but grid_size {tuple(grid_size)} needs their product"
        )


def frustum_ids(
    projection_pixels: Tensor,
    depth: Tensor,
    image_size: Sequence[int],
    grid_size: Sequence[int],
    frustum_size: int = 8,
) -> Tensor:
    """The frustum of every voxel in every view: :func:`frustum_masks` as indices.

    A view's cells partition its image, so a voxel lies in at most one frustum per view.

    Args:
        projection_pixels: ``(B, N, 2)`` or ``(B, V, N, 2)`` ``(u, v)`` pixels, as for :func:`frustum_masks`.
        depth: ``(B, N)`` or ``(B, V, N)`` camera-frame depth.
        image_size: ``(H, W)`` the pixels refer to.
        grid_size: ``(X, Y, Z)`` with ``X * Y * Z == N``.
        frustum_size: bands per image axis.

    Returns:
        ``(B, X, Y, Z)`` long for single-view inputs, ``(B, V, X, Y, Z)`` for ``(B, V, N, 2)`` pixels: the index of
        the voxel's frustum in view ``v``, ``v * frustum_size ** 2 + row * frustum_size + col`` (the numbering of
        :func:`frustum_masks`), ``-1`` when it is in none of that view's frustums.

    Raises:
        ValueError: if the pixels, depth and grid size do not agree.
    """
    _check_projection(projection_pixels, depth, grid_size)
    if depth.dim() == 3:
        batch, n_views, n_voxels = depth.shape
        ids = frustum_ids(
            projection_pixels.reshape(batch * n_views, n_voxels, 2),
            depth.reshape(batch * n_views, n_voxels),
            image_size,
            grid_size,
            frustum_size,
        ).reshape(batch, n_views, -1)
        offsets = torch.arange(n_views, device=ids.device)[None, :, None] * frustum_size**2
        return torch.where(ids >= 0, ids + offsets, ids).reshape(batch, n_views, *grid_size)
    height, width = image_size
    batch = depth.shape[0]
    pixels = torch.round(projection_pixels).double()
    device = projection_pixels.device
    # Band i covers [i / S * size, (i + 1) / S * size): the float64 bounds of frustum_masks, searched instead of
    # compared one band at a time.
    fractions = torch.tensor([i * 1.0 / frustum_size for i in range(frustum_size + 1)], dtype=torch.float64)
    fractions[-1] = 1.0
    col = torch.bucketize(pixels[..., 0].contiguous(), (fractions * width).to(device), right=True) - 1
    row = torch.bucketize(pixels[..., 1].contiguous(), (fractions * height).to(device), right=True) - 1
    inside = (col >= 0) & (col < frustum_size) & (row >= 0) & (row < frustum_size) & (depth > 0)
    ids = torch.where(inside, row * frustum_size + col, torch.full_like(col, -1))
    return ids.reshape(batch, *grid_size)


def frustum_proportion_loss(
    logits: Tensor,
    target: Tensor,
    frustum_masks: Tensor,
    ignore_index: int = 255,
    chunk: int = 8,
    num_frustums: int | None = None,
) -> Tensor:
    """Frustum proportion loss (MonoScene ``monoscene.py::step``, ``KL_sep``).

    For every frustum ``f``, over the batch: target distribution ``t_f`` = class counts of the non-ignored voxels
    in the frustum / their total; predicted ``q_f`` = summed softmax probabilities over the same voxels / their total;
    ``KL_f = sum_{c: t_fc > 0} t_fc (log t_fc - log q_fc)``. Mean over frustums with a non-zero count and probability
    mass (0 when there is none, where MonoScene divides by zero). With several views the frustums of all views are
    pooled: ``F = V * 64`` and the mean runs over the non-empty frustums of every view.

    Args:
        logits: ``(B, C, X, Y, Z)``.
        target: ``(B, X, Y, Z)``.
        frustum_masks: ``(B, F, X, Y, Z)`` bool (:func:`frustum_masks`, frustums may overlap), or integer frustum ids
            (:func:`frustum_ids`, much faster) together with ``num_frustums``: ``(B, X, Y, Z)`` for one view or
            ``(B, V, X, Y, Z)`` with one id (or -1) per voxel and view.
        ignore_index: label excluded from the loss.
        chunk: frustums processed at once with masks (bounds memory at full KITTI resolution).
        num_frustums: ``F`` when ``frustum_masks`` holds ids (all views together).

    Returns:
        Scalar.

    Raises:
        ValueError: with frustum ids, if ``num_frustums`` is missing, the ids' shape does not match the logits or an
            id is ``>= num_frustums``.
    """
    probs, labels, valid = flatten_voxels(logits, target, ignore_index)
    batch, num_classes, n_voxels = probs.shape
    one_hot = torch.zeros_like(probs).scatter_(1, labels[:, None], valid[:, None].to(probs.dtype))
    both = torch.cat([probs, one_hot], dim=1)  # (B, 2C, N): probabilities and class indicators
    with torch.autocast(probs.device.type, enabled=False):  # exact float32 counts, even inside a bf16/fp16 step
        if frustum_masks.dtype == torch.bool:
            masks = frustum_masks.reshape(batch, -1, n_voxels) & valid[:, None]
            sums = torch.cat(
                [torch.einsum("bfn,bkn->fk", part.to(probs.dtype), both) for part in masks.split(chunk, dim=1)], dim=0
            )
        else:  # frustum ids: one index_add over the voxels per view instead of F dense masks
            if num_frustums is None:
                raise ValueError("frustum_proportion_loss: num_frustums is required with frustum ids")
            grid, shape = tuple(logits.shape[2:]), tuple(frustum_masks.shape)
            if shape[:1] != (batch,) or (shape[1:] != grid and (len(shape) != len(grid) + 2 or shape[2:] != grid)):
                raise ValueError(
                    f"frustum ids must be (B, X, Y, Z) or (B, V, X, Y, Z) for logits {tuple(logits.shape)}, "
                    f"got {tuple(frustum_masks.shape)}"
                )
            flat = both.permute(0, 2, 1).reshape(-1, 2 * num_classes)
            valid_flat = valid.reshape(-1)
            sums = flat.new_zeros(num_frustums, 2 * num_classes, dtype=torch.float32)
            for view_ids in frustum_masks.reshape(batch, -1, n_voxels).unbind(1):
                ids = view_ids.reshape(-1).long()
                keep = (ids >= 0) & valid_flat
                selected = ids[keep]
                if selected.numel() and int(selected.max()) >= num_frustums:
                    raise ValueError(
                        f"frustum_proportion_loss: frustum id {int(selected.max())} >= num_frustums={num_frustums}"
                    )
                sums.index_add_(0, selected, flat[keep].float())
    cum_prob, counts = sums[:, :num_classes], sums[:, num_classes:]  # (F, C) each
    total_prob, total_count = cum_prob.sum(1, keepdim=True), counts.sum(1, keepdim=True)
    used = (total_prob > 0) & (total_count > 0)  # (F, 1)
    target_dist = counts / torch.where(used, total_count, torch.ones_like(total_count))
    pred_dist = cum_prob / torch.where(used, total_prob, torch.ones_like(total_prob))
    positive = (target_dist > 0) & used
    ones = torch.ones_like(target_dist)
    log_ratio = torch.log(torch.where(positive, target_dist, ones)) - torch.log(torch.where(positive, pred_dist, ones))
    kl = torch.where(positive, target_dist * log_ratio, 0.0).sum(dim=1)
    n_used = used.sum()
    if not bool(n_used > 0):
        return logits.sum() * 0.0
    return kl.sum() / n_used
