"""MonoScene's context-prior relation loss (``docs/design.md`` §7.2) and its targets.

:func:`downsample_labels` is MonoScene's ``_downsample_label`` (``docs/design.md`` §8.4), used to bring the target
to the context-prior resolution; :func:`relation_targets` builds the "CP mega" matrices from it and
:func:`relation_loss` is the weighted binary cross-entropy of the perceiver's relation logits against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["downsample_labels", "relation_loss", "relation_targets"]


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

    Raises:
        ValueError: if ``n_relations`` is not 4 or 2.
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

    Raises:
        ValueError: if the logits and targets differ in shape.
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
