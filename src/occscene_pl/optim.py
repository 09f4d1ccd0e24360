"""The optimizer of :class:`~occscene_pl.module.OccSceneModule` (``docs/design.md`` §2.2).

AdamW with one learning rate per trained part and a linear warm-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from occscene_pl.config import OptimizerConfig

__all__ = ["build_optimizer", "parameter_groups"]


def parameter_groups(parts: Mapping[str, nn.Module], config: OptimizerConfig) -> list[dict[str, Any]]:
    """The named AdamW parameter groups of the trained parts, empty groups left out.

    Args:
        parts: The trained modules by name: ``perceiver`` (its ``encoder`` is the backbone), ``unet``, ``aligner``.
        config: Learning rates per part.

    Returns:
        Groups ``perceiver_backbone`` (``lr_perceiver_backbone``, None = ``lr_perceiver``), ``perceiver``, ``unet``
        (parameters with ``requires_grad`` only) and ``aligner``, in that order.
    """
    groups: list[dict[str, Any]] = []
    if "perceiver" in parts:
        perceiver = parts["perceiver"]
        backbone = [p for p in perceiver.get_submodule("encoder").parameters() if p.requires_grad]
        backbone_ids = {id(p) for p in backbone}
        rest = [p for p in perceiver.parameters() if p.requires_grad and id(p) not in backbone_ids]
        lr_backbone = config.lr_perceiver_backbone if config.lr_perceiver_backbone is not None else config.lr_perceiver
        groups += [
            {"params": backbone, "lr": lr_backbone, "name": "perceiver_backbone"},
            {"params": rest, "lr": config.lr_perceiver, "name": "perceiver"},
        ]
    if "unet" in parts:
        unet = [p for p in parts["unet"].parameters() if p.requires_grad]
        groups.append({"params": unet, "lr": config.lr_unet, "name": "unet"})
        groups.append({"params": list(parts["aligner"].parameters()), "lr": config.lr_aligner, "name": "aligner"})
    return [g for g in groups if g["params"]]


def build_optimizer(parts: Mapping[str, nn.Module], config: OptimizerConfig) -> Any:
    """AdamW over :func:`parameter_groups`, with a per-step linear warm-up scheduler when ``warmup_steps > 0``.

    Args:
        parts: The trained modules by name (see :func:`parameter_groups`).
        config: The optimizer settings.

    Returns:
        What ``LightningModule.configure_optimizers`` returns: the optimizer, or a dict with its scheduler.
    """
    optimizer = torch.optim.AdamW(
        parameter_groups(parts, config),
        betas=(float(config.betas[0]), float(config.betas[1])),
        weight_decay=config.weight_decay,
    )
    if config.warmup_steps == 0:
        return optimizer
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
