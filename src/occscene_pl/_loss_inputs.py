"""Per-voxel inputs shared by the SSC losses (``losses.py``, ``losses_frustum.py``): probabilities, labels, validity."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["flatten_voxels"]


def flatten_voxels(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Flatten a grid of logits and labels to per-voxel softmax probabilities, labels and validity, in float32.

    Args:
        logits: ``(B, C, X, Y, Z)`` (any float dtype; the softmax is taken in float32).
        target: ``(B, X, Y, Z)`` class ids, ``ignore_index`` = unknown.
        ignore_index: label marking voxels excluded from the losses.

    Returns:
        Softmax probabilities ``(B, C, N)``, the target ``(B, N)`` long with ignored voxels set to 0 (a valid index
        for gathers and one-hots), and the validity ``(B, N)`` bool (``target != ignore_index``).
    """
    probs = F.softmax(logits.float(), dim=1).flatten(2)
    target = target.reshape(target.shape[0], -1).long()
    valid = target != ignore_index
    return probs, torch.where(valid, target, torch.zeros_like(target)), valid
