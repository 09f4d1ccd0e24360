"""Losses: MonoScene's SSC losses (``docs/design.md`` §7.2) and the diffusion MSE.

Every SSC loss matches MonoScene's definition (``monoscene/loss/ssc_loss.py``, ``CRP_loss.py`` and the frustum term of
``monoscene.py::step``) and is vectorised. Where MonoScene would divide by zero (no valid voxel, no present class, no
positive relation entry, ...) these return a well-defined value instead of NaN or a ``ZeroDivisionError``; each case is
stated in the function's docstring. Losses are computed in float32 whatever the logits' dtype (mixed precision).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from occscene_pl.geometry import project_voxels

__all__ = [
    "SSCLossWeights",
    "diffusion_loss",
    "downsample_labels",
    "frustum_ids",
    "frustum_masks",
    "frustum_proportion_loss",
    "geo_scal_loss",
    "relation_loss",
    "relation_targets",
    "sem_scal_loss",
    "ssc_cross_entropy",
    "ssc_loss",
]


_EXP_MINUS_100 = math.exp(-100.0)


def _bce_with_one(x: Tensor) -> Tensor:
    """``F.binary_cross_entropy(x, 1) = min(-log x, 100)`` as PyTorch clamps it; finite gradient at ``x = 0``."""
    return -torch.log(x.clamp(min=_EXP_MINUS_100))


def _affinity_term(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``BCE(numerator / denominator, 1)``, 0 where the denominator is 0 (MonoScene skips those terms); NaN-free."""
    positive = denominator > 0
    ratio = numerator / torch.where(positive, denominator, torch.ones_like(denominator))
    return torch.where(positive, _bce_with_one(torch.where(positive, ratio, torch.ones_like(ratio))), 0.0)


def _flatten(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax probabilities ``(B, C, N)``, target ``(B, N)`` with ignored voxels set to 0, validity ``(B, N)``."""
    probs = F.softmax(logits.float(), dim=1).flatten(2)
    target = target.reshape(target.shape[0], -1).long()
    valid = target != ignore_index
    return probs, torch.where(valid, target, torch.zeros_like(target)), valid


def ssc_cross_entropy(
    logits: Tensor, target: Tensor, class_weights: Tensor | None = None, ignore_index: int = 255
) -> Tensor:
    """Class-weighted cross-entropy, weighted mean over non-ignored voxels (MonoScene ``CE_ssc_loss``).

    Args:
        logits: ``(B, C, X, Y, Z)``.
        target: ``(B, X, Y, Z)`` class ids, ``ignore_index`` = unknown.
        class_weights: ``(C,)`` or ``None``.
        ignore_index: label excluded from the loss.

    Returns:
        Scalar; 0 when every voxel is ignored (PyTorch would return NaN).
    """
    target = target.long()
    if not bool((target != ignore_index).any()):
        return logits.sum() * 0.0
    weight = class_weights.to(device=logits.device, dtype=torch.float32) if class_weights is not None else None
    return F.cross_entropy(logits.float(), target, weight=weight, ignore_index=ignore_index)


def sem_scal_loss(logits: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """Semantic scene-class affinity loss (MonoScene ``sem_scal_loss``).

    Over the non-ignored voxels of the whole batch, for every class ``c`` present in the target, with ``p_c`` the
    softmax probability and ``y_c = [target == c]``: precision ``P = sum(p_c y_c) / sum(p_c)``, recall
    ``R = sum(p_c y_c) / sum(y_c)``, specificity ``S = sum((1 - p_c)(1 - y_c)) / sum(1 - y_c)``;
    ``loss_c = BCE(P, 1) + BCE(R, 1) + BCE(S, 1)``, a term skipped when its denominator is 0. Mean over present classes.

    Args:
        logits: ``(B, C, X, Y, Z)``.
        target: ``(B, X, Y, Z)``.
        ignore_index: label excluded from the loss.

    Returns:
        Scalar; 0 when no class is present (MonoScene divides by a zero count).
    """
    probs, labels, valid = _flatten(logits, target, ignore_index)
    num_classes = probs.shape[1]
    # Per-class sums from C-vectors instead of a (B, C, N) one-hot; float64 keeps the differences below exact enough.
    valid_f = valid.to(probs.dtype)
    n_valid = valid_f.sum(dtype=torch.float64)
    prob_sum = (probs * valid_f[:, None]).sum(dim=(0, 2), dtype=torch.float64)  # sum(p_c)
    prob_at_label = (probs.gather(1, labels[:, None]).squeeze(1) * valid_f).double()  # p_{y} per voxel
    nominator = prob_sum.new_zeros(num_classes).index_add(0, labels.flatten(), prob_at_label.flatten())  # sum(p_c y_c)
    count = torch.bincount(labels[valid], minlength=num_classes).double()  # sum(y_c)
    negatives = n_valid - count  # sum(1 - y_c)
    true_negative = (n_valid - prob_sum) - (count - nominator)  # sum((1 - p_c)(1 - y_c))
    precision = _affinity_term(nominator, prob_sum)
    recall = _affinity_term(nominator, count)
    specificity = _affinity_term(true_negative, negatives)
    per_class = precision + recall + specificity
    present = count > 0
    if not bool(present.any()):
        return logits.sum() * 0.0
    return (per_class[present].sum() / present.sum()).float()


def geo_scal_loss(logits: Tensor, target: Tensor, empty_index: int = 0, ignore_index: int = 255) -> Tensor:
    """Geometric scene-class affinity loss (MonoScene ``geo_scal_loss``).

    With ``q = 1 - p_empty`` and ``y = [target != empty]`` over non-ignored voxels: precision ``sum(q y) / sum(q)``,
    recall ``sum(q y) / sum(y)``, specificity ``sum(p_empty (1 - y)) / sum(1 - y)``; sum of their ``BCE(., 1)``.

    Args:
        logits: ``(B, C, X, Y, Z)``.
        target: ``(B, X, Y, Z)``.
        empty_index: class id of empty space.
        ignore_index: label excluded from the loss.

    Returns:
        Scalar. A term whose denominator is 0 (e.g. no occupied voxel) is skipped, where MonoScene returns NaN.
    """
    probs, labels, valid = _flatten(logits, target, ignore_index)
    valid_f = valid.to(probs.dtype)
    empty_probs = probs[:, empty_index] * valid_f
    nonempty_probs = (1.0 - probs[:, empty_index]) * valid_f
    nonempty_target = ((labels != empty_index) & valid).to(probs.dtype)
    empty_target = valid_f - nonempty_target
    intersection = (nonempty_target * nonempty_probs).sum()
    return (
        _affinity_term(intersection, nonempty_probs.sum())
        + _affinity_term(intersection, nonempty_target.sum())
        + _affinity_term((empty_target * empty_probs).sum(), empty_target.sum())
    )


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
    """Raise a ``ValueError`` unless pixels ``(B, [V,] N, 2)`` and depth ``(B, [V,] N)`` agree with the grid."""
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
    """The frustum of every voxel in every view, :func:`frustum_masks` as indices: a view's cells partition its image,
    so a voxel lies in at most one frustum per view. Same arguments as :func:`frustum_masks`.

    Returns:
        ``(B, X, Y, Z)`` long for single-view inputs, ``(B, V, X, Y, Z)`` for ``(B, V, N, 2)`` pixels: the index of
        the voxel's frustum in view ``v``, ``v * frustum_size ** 2 + row * frustum_size + col`` (the numbering of
        :func:`frustum_masks`), ``-1`` when it is in none of that view's frustums.
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
    """
    probs, labels, valid = _flatten(logits, target, ignore_index)
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


def downsample_labels(target: Tensor, factor: int, ignore_index: int = 255) -> Tensor:
    """MonoScene's ``_downsample_label`` (``docs/design.md`` §8.4), batched.

    Per ``factor``-cube block of ``n = factor**3`` voxels: if empty + ignored voxels exceed ``0.95 n`` the block is 0
    when empty voxels outnumber ignored ones, else ``ignore_index`` (ties -> ignore); otherwise it is the most frequent
    semantic label (``0 < l < ignore_index``; ties -> smallest id). Trailing voxels that do not fill a block are
    dropped, as MonoScene does.

    Args:
        target: ``(B, X, Y, Z)`` integer labels.
        factor: block edge.
        ignore_index: the unknown label.

    Returns:
        ``(B, X // factor, Y // factor, Z // factor)`` in ``target``'s dtype.
    """
    if factor == 1:
        return target
    batch = target.shape[0]
    small = [n // factor for n in target.shape[1:]]
    labels = target[:, : small[0] * factor, : small[1] * factor, : small[2] * factor].long()
    blocks = labels.reshape(batch, small[0], factor, small[1], factor, small[2], factor)
    blocks = blocks.permute(0, 1, 3, 5, 2, 4, 6).reshape(batch, *small, factor**3)
    n_empty = (blocks == 0).sum(-1)
    n_ignore = (blocks == ignore_index).sum(-1)
    semantic = (blocks > 0) & (blocks < ignore_index)
    num_classes = int(blocks[semantic].max()) + 1 if bool(semantic.any()) else 1
    votes = torch.zeros(*blocks.shape[:-1], num_classes + 1, dtype=torch.long, device=target.device)
    votes.scatter_add_(-1, torch.where(semantic, blocks, num_classes), semantic.long())
    majority = votes[..., :num_classes].argmax(-1)  # first maximum = smallest id on ties
    mostly_empty = (n_empty + n_ignore) > 0.95 * factor**3
    out = torch.where(mostly_empty, torch.where(n_empty > n_ignore, 0, ignore_index), majority)
    return out.to(target.dtype)


def relation_targets(target_low: Tensor, n_relations: int = 4, ignore_index: int = 255) -> Tensor:
    """MonoScene's CP mega matrices (``compute_CP_mega_matrix``, ``docs/design.md`` §7.2), batched.

    Supervoxels are the ``2 x 2 x 2`` blocks of the low-resolution target (``S = shape // 2`` per axis, flattened in C
    order). Entry ``[r, n, s]`` is 1 when some non-ignored child label ``lc`` of supervoxel ``s`` and the non-ignored
    label ``lr`` of voxel ``n`` satisfy relation ``r``: 0 ``lc == lr != 0``; 1 ``lc != lr``, both non-empty;
    2 ``lc == lr == 0``; 3 ``lc != lr`` and one of them empty. With ``n_relations=2``: 0 ``lc != lr``, 1 ``lc == lr``.

    Args:
        target_low: ``(B, X', Y', Z')`` labels at the context-prior bottleneck resolution
            (e.g. :func:`downsample_labels` of the full target by ``OccupancyPerceiver.relation_downsample``).
        n_relations: 4 or 2.
        ignore_index: the unknown label.

    Returns:
        ``(B, n_relations, N, N_super)`` uint8 with ``N = X' * Y' * Z'``.
    """
    if n_relations not in (2, 4):
        raise ValueError(f"n_relations must be 4 or 2 (MonoScene's relation sets), got {n_relations}")
    batch = target_low.shape[0]
    sx, sy, sz = (n // 2 for n in target_low.shape[1:])
    labels = target_low.long()
    children = labels[:, : 2 * sx, : 2 * sy, : 2 * sz].reshape(batch, sx, 2, sy, 2, sz, 2)
    children = children.permute(0, 1, 3, 5, 2, 4, 6).reshape(batch, sx * sy * sz, 8)
    rows = labels.reshape(batch, -1)
    row_valid, child_valid = rows != ignore_index, children != ignore_index
    num_classes = int(labels[labels != ignore_index].max()) + 1 if bool((labels != ignore_index).any()) else 1
    # present[b, s, c]: supervoxel s has a non-ignored child of class c.
    present = torch.zeros(batch, children.shape[1], num_classes + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(-1, torch.where(child_valid, children, num_classes), True)
    present = present[..., :num_classes]
    row_index = torch.where(row_valid, rows, 0)
    same = present.transpose(1, 2).gather(1, row_index[:, :, None].expand(-1, -1, present.shape[1]))  # (B, N, S)
    same = same & row_valid[:, :, None]
    if n_relations == 2:
        n_present = present.sum(-1)[:, None]  # distinct child classes
        different = row_valid[:, :, None] & (n_present - same.long() > 0)
        return torch.stack([different, same], dim=1).to(torch.uint8)
    row_empty = (row_valid & (rows == 0))[:, :, None]
    row_full = (row_valid & (rows != 0))[:, :, None]
    n_full_classes = present[..., 1:].sum(-1)[:, None]  # distinct non-empty child classes
    child_empty = present[..., 0][:, None]
    child_full = n_full_classes > 0
    same_full = row_full & same
    different_full = row_full & (n_full_classes - same.long() > 0)
    both_empty = row_empty & child_empty
    empty_vs_full = (row_empty & child_full) | (row_full & child_empty)
    return torch.stack([same_full, different_full, both_empty, empty_vs_full], dim=1).to(torch.uint8)


def relation_loss(relation_logits: Tensor, targets: Tensor) -> Tensor:
    """Context-prior relation loss (MonoScene ``compute_super_CP_multilabel_loss``).

    Binary cross-entropy with logits over every (sample, relation, voxel, supervoxel) entry, mean-reduced, with
    ``pos_weight[r] = #negatives_r / #positives_r`` counted over the batch. A relation without positives gets
    ``pos_weight = #negatives_r`` (MonoScene's division by zero gives NaN; the weight only scales positive entries, so
    any finite value gives the same loss).

    Args:
        relation_logits: ``(B, R, N, N_super)``.
        targets: same shape, 0/1 (:func:`relation_targets`).

    Returns:
        Scalar.
    """
    if relation_logits.shape != targets.shape:
        raise ValueError(
            f"relation_logits {tuple(relation_logits.shape)} and targets {tuple(targets.shape)} differ in shape"
        )
    labels = targets.float()
    positives = labels.sum(dim=(0, 2, 3))
    negatives = labels[:, 0].numel() - positives
    pos_weight = (negatives / positives.clamp(min=1.0)).reshape(-1, 1, 1)
    return F.binary_cross_entropy_with_logits(relation_logits.float(), labels, pos_weight=pos_weight)


def diffusion_loss(model_output: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Diffusion MSE, optionally weighted per sample.

    Args:
        model_output: ``(N, ...)`` predicted noise / v / x0.
        target: same shape.
        weights: ``(N,)`` per-sample multipliers (e.g. ``g(t)``) or ``None``.

    Returns:
        ``mean_i(w_i * mean(|output_i - target_i|^2))`` (plain MSE without weights).
    """
    if model_output.shape != target.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} and target {tuple(target.shape)} differ in shape")
    per_sample = (model_output.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if weights is None:
        return per_sample.mean()
    if weights.shape != per_sample.shape:
        raise ValueError(f"weights must be ({per_sample.shape[0]},), one per sample, got {tuple(weights.shape)}")
    return (weights.to(per_sample) * per_sample).mean()


@dataclass(frozen=True)
class SSCLossWeights:
    """Weights of the SSC loss terms (MonoScene: all 1). A weight of 0 skips the term's computation."""

    ce: float = 1.0
    """Class-weighted cross-entropy."""
    sem_scal: float = 1.0
    """Semantic scene-class affinity."""
    geo_scal: float = 1.0
    """Geometric scene-class affinity."""
    frustum: float = 1.0
    """Frustum proportion."""
    relation: float = 1.0
    """Context-prior relation loss (only when the perceiver returns ``relation_logits``)."""

    def __post_init__(self) -> None:
        for field in fields(self):
            if getattr(self, field.name) < 0:
                raise ValueError(f"SSCLossWeights.{field.name} must be >= 0, got {getattr(self, field.name)}")


def _batch_frustum_ids(batch: Mapping[str, Any], grid_size: Sequence[int], frustum_size: int) -> Tensor:
    """Frustum ids ``(B, V, X, Y, Z)`` of every view (:func:`frustum_ids`) from the batch's cameras.

    Views are projected one at a time, so the peak memory is that of one view's projection (nuScenes: 6 views of a
    512 x 512 x 40 grid).
    """
    missing = [k for k in ("image", "intrinsics", "voxel_to_camera", "voxel_origin", "voxel_size") if k not in batch]
    if missing:
        raise KeyError(f"the frustum loss needs batch keys {missing} (or a precomputed 'frustum_masks')")
    image_size = batch["image"].shape[-2:]
    n_views = batch["intrinsics"].shape[1]
    views = []
    for view in range(n_views):
        projection = project_voxels(
            grid_size,
            batch["voxel_origin"],
            batch["voxel_size"],
            batch["intrinsics"][:, view : view + 1],
            batch["voxel_to_camera"][:, view : view + 1],
            image_size,
        )
        ids = frustum_ids(projection.pixels[:, 0], projection.depth[:, 0], image_size, grid_size, frustum_size)
        views.append(torch.where(ids >= 0, ids + view * frustum_size**2, ids))
    return torch.stack(views, dim=1)


def _batch_relation_targets(target: Tensor, relation_logits: Tensor, ignore_index: int) -> Tensor:
    n_full, n_low = target[0].numel(), relation_logits.shape[2]
    factor = round((n_full / n_low) ** (1.0 / 3.0))
    grid = target.shape[1:]
    if factor < 1 or any(n % factor for n in grid) or math.prod(n // factor for n in grid) != n_low:
        raise ValueError(
            f"cannot infer the relation grid of {n_low} voxels from the target {tuple(target.shape[1:])}; "
            "put precomputed 'relation_targets' in the batch"
        )
    low = downsample_labels(target, factor, ignore_index)
    return relation_targets(low, relation_logits.shape[1], ignore_index)


def ssc_loss(
    output: Mapping[str, Tensor],
    batch: Mapping[str, Any],
    weights: SSCLossWeights | None = None,
    class_weights: Tensor | None = None,
    ignore_index: int = 255,
    frustum_size: int = 8,
) -> dict[str, Tensor]:
    """MonoScene's total SSC loss: weighted sum of CE, sem/geo scene-class affinity, frustum proportion and relation.

    Args:
        output: the perceiver's output, ``logits (B, C, X, Y, Z)`` and optionally ``relation_logits``.
        batch: collated samples: ``occupancy (B, X, Y, Z)``; for the frustum term either ``frustum_masks
            (B, F, X, Y, Z)`` or the cameras (``image``, ``intrinsics``, ``voxel_to_camera``, ``voxel_origin``,
            ``voxel_size``; at full grid resolution as MonoScene, every view with its own ``frustum_size ** 2``
            frustums); for the relation term optionally
            ``relation_targets (B, R, N, N_super)``, else they are built from ``occupancy`` downsampled to the
            relation grid with :func:`downsample_labels`.
        weights: term weights (default all 1); a 0 weight skips the term.
        class_weights: ``(C,)`` CE class weights (e.g. ``occscene_pl.data.semantic_kitti.class_weights()``).
        ignore_index: the unknown label.
        frustum_size: frustum bands per image axis when the masks are computed here.

    Returns:
        ``loss`` (weighted total) and the unweighted ``ce``, ``sem_scal``, ``geo_scal``, ``frustum``, ``relation``
        (0 for skipped terms, e.g. ``relation`` without ``relation_logits``).
    """
    weights = weights if weights is not None else SSCLossWeights()
    logits = output["logits"]
    target = batch["occupancy"].long()
    zero = logits.new_zeros((), dtype=torch.float32)
    terms = dict.fromkeys(("ce", "sem_scal", "geo_scal", "frustum", "relation"), zero)
    if weights.ce:
        terms["ce"] = ssc_cross_entropy(logits, target, class_weights, ignore_index)
    if weights.sem_scal:
        terms["sem_scal"] = sem_scal_loss(logits, target, ignore_index)
    if weights.geo_scal:
        terms["geo_scal"] = geo_scal_loss(logits, target, ignore_index=ignore_index)
    if weights.frustum:
        masks = batch.get("frustum_masks")
        if masks is None:
            ids = _batch_frustum_ids(batch, target.shape[1:], frustum_size)
            terms["frustum"] = frustum_proportion_loss(
                logits, target, ids, ignore_index, num_frustums=ids.shape[1] * frustum_size**2
            )
        else:
            terms["frustum"] = frustum_proportion_loss(logits, target, masks, ignore_index)
    relation_logits = output.get("relation_logits")
    if weights.relation and relation_logits is not None:
        targets = batch.get("relation_targets")
        if targets is None:
            targets = _batch_relation_targets(target, relation_logits, ignore_index)
        terms["relation"] = relation_loss(relation_logits, targets)
    total = sum((getattr(weights, name) * value for name, value in terms.items()), zero)
    return {"loss": total, **terms}
