"""Losses: MonoScene's SSC loss (``docs/design.md`` §7.2) and the diffusion MSE.

This module holds the SSC loss composition (:func:`ssc_loss`, :class:`SSCLossWeights`), the class-weighted
cross-entropy, the semantic and geometric scene-class affinity losses and :func:`diffusion_loss`. The frustum
proportion loss lives in ``losses_frustum.py`` and the context-prior relation loss in ``losses_relation.py``; their
public names are re-exported here, so ``from occscene_pl.losses import ...`` reaches every loss.

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

from occscene_pl._loss_inputs import flatten_voxels
from occscene_pl.geometry import project_voxels
from occscene_pl.losses_frustum import frustum_ids, frustum_masks, frustum_proportion_loss
from occscene_pl.losses_relation import downsample_labels, relation_loss, relation_targets

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
    probs, labels, valid = flatten_voxels(logits, target, ignore_index)
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
    probs, labels, valid = flatten_voxels(logits, target, ignore_index)
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


def diffusion_loss(model_output: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Diffusion MSE, optionally weighted per sample.

    Args:
        model_output: ``(N, ...)`` predicted noise / v / x0.
        target: same shape.
        weights: ``(N,)`` per-sample multipliers (e.g. ``g(t)``) or ``None``.

    Returns:
        ``mean_i(w_i * mean(|output_i - target_i|^2))`` (plain MSE without weights).

    Raises:
        ValueError: if the output and target differ in shape, or ``weights`` is not one value per sample.
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
        """Check the weights.

        Raises:
            ValueError: if a weight is negative.
        """
        for field in fields(self):
            if getattr(self, field.name) < 0:
                raise ValueError(f"SSCLossWeights.{field.name} must be >= 0, got {getattr(self, field.name)}")


def _batch_frustum_ids(batch: Mapping[str, Any], grid_size: Sequence[int], frustum_size: int) -> Tensor:
    """Frustum ids ``(B, V, X, Y, Z)`` of every view (:func:`frustum_ids`) from the batch's cameras.

    Views are projected one at a time, so the peak memory is that of one view's projection (nuScenes: 6 views of a
    512 x 512 x 40 grid).

    Args:
        batch: collated samples with ``image (B, V, 3, H, W)``, ``intrinsics (B, V, 3, 3)``,
            ``voxel_to_camera (B, V, 4, 4)``, ``voxel_origin`` and ``voxel_size``.
        grid_size: ``(X, Y, Z)`` of the full-resolution target.
        frustum_size: bands per image axis.

    Returns:
        ``(B, V, X, Y, Z)`` long; view ``v``'s ids offset by ``v * frustum_size ** 2``, ``-1`` outside every frustum.

    Raises:
        KeyError: if a camera key is missing from the batch.
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
    """Relation targets for ``relation_logits`` from the full-resolution target (:func:`relation_targets`).

    The context-prior grid is taken to be the target's grid divided by one integer factor per axis, inferred from
    the number of voxels of the relation logits; the target is brought to it with :func:`downsample_labels`.

    Args:
        target: ``(B, X, Y, Z)`` long labels at full resolution.
        relation_logits: ``(B, R, N, N_super)`` with ``N`` the voxel count of the context-prior grid.
        ignore_index: the unknown label.

    Returns:
        ``(B, R, N, N_super)`` uint8.

    Raises:
        ValueError: if no integer factor maps the target's grid onto ``N`` voxels.
    """
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
