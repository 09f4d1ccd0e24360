"""Semantic scene completion metrics (``docs/design.md`` §7.3).

:class:`SSCMetric` keeps one dataset-wide confusion matrix ``conf[gt, pred]`` over every voxel whose ground truth is
not ``ignore_index`` (empty voxels included). Under DDP torchmetrics all-reduces the matrix (a sum), never per-rank
IoUs. ``compute()`` reproduces MonoScene's ``SSCMetrics`` exactly: per-class IoU ``tp / (tp + fp + fn + 1e-5)``,
mIoU the mean over classes ``1..C-1`` (a class never seen nor predicted counts as 0), and the completion
(geometry) IoU, precision and recall of "occupied = any non-empty class", 0 when there is no true positive.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["SSCMetric"]

MONOSCENE_EPS = 1e-5


class SSCMetric(Metric):
    """Dataset-level SSC IoU / mIoU / precision / recall, DDP-safe.

    Args:
        num_classes: number of classes ``C``, the empty class included.
        ignore_index: ground-truth label excluded from scoring.
        empty_index: the empty class: excluded from mIoU, "free" for the geometry metrics.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confusion: Tensor

    def __init__(self, num_classes: int, ignore_index: int = 255, empty_index: int = 0, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (empty + at least one class), got {num_classes}")
        if not 0 <= empty_index < num_classes:
            raise ValueError(f"empty_index {empty_index} is not a class index in [0, {num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.empty_index = empty_index
        self.add_state(
            "confusion", default=torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Accumulate a batch.

        Args:
            preds: predicted labels of the same shape as ``target``, or logits ``(B, C, X, Y, Z)`` (argmaxed over C).
            target: ``(B, X, Y, Z)`` ground-truth labels, ``ignore_index`` where unknown.
        """
        if preds.is_floating_point() and preds.dim() == target.dim() + 1:
            if preds.shape[1] != self.num_classes:
                raise ValueError(f"logits have {preds.shape[1]} classes, expected num_classes={self.num_classes}")
            preds = preds.argmax(dim=1)
        if preds.shape != target.shape:
            raise ValueError(f"preds of shape {tuple(preds.shape)} do not match target {tuple(target.shape)}")
        target = target.long().reshape(-1)
        preds = preds.long().reshape(-1)
        keep = target != self.ignore_index
        target, preds = target[keep], preds[keep]
        if target.numel() and (int(target.max()) >= self.num_classes or int(target.min()) < 0):
            raise ValueError(f"target holds labels outside [0, {self.num_classes}) other than {self.ignore_index}")
        if preds.numel() and (int(preds.max()) >= self.num_classes or int(preds.min()) < 0):
            raise ValueError(f"preds hold labels outside [0, {self.num_classes})")
        counts = torch.bincount(target * self.num_classes + preds, minlength=self.num_classes**2)
        self.confusion += counts.reshape(self.num_classes, self.num_classes)

    def compute(self) -> dict[str, Tensor]:
        """Return ``iou``, ``precision``, ``recall`` (geometry), ``miou`` and ``per_class_iou`` ``(C,)``."""
        conf = self.confusion.double()
        tp = conf.diagonal()
        fp = conf.sum(0) - tp
        fn = conf.sum(1) - tp
        per_class_iou = tp / (tp + fp + fn + MONOSCENE_EPS)
        semantic = torch.ones(self.num_classes, dtype=torch.bool, device=conf.device)
        semantic[self.empty_index] = False
        miou = per_class_iou[semantic].mean()

        occupied_gt, occupied_pred = semantic[:, None], semantic[None, :]
        tp_geo = conf[occupied_gt & occupied_pred].sum()
        fp_geo = conf[~occupied_gt & occupied_pred].sum()
        fn_geo = conf[occupied_gt & ~occupied_pred].sum()
        zero = torch.zeros((), dtype=conf.dtype, device=conf.device)
        has_tp = tp_geo > 0
        precision = torch.where(has_tp, tp_geo / (tp_geo + fp_geo).clamp_min(1), zero)
        recall = torch.where(has_tp, tp_geo / (tp_geo + fn_geo).clamp_min(1), zero)
        iou = torch.where(has_tp, tp_geo / (tp_geo + fp_geo + fn_geo).clamp_min(1), zero)
        return {
            "iou": iou.float(),
            "precision": precision.float(),
            "recall": recall.float(),
            "miou": miou.float(),
            "per_class_iou": per_class_iou.float(),
        }
