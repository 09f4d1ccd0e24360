"""Lightning callbacks of occscene-pl.

:class:`SampleImageLogger` logs one picture per evaluation epoch: for the first scenes of the first validation (or
test) batch, the real image, the image generated from its ground-truth layout and that layout rendered.
:class:`~occscene_pl.module.OccSceneModule` adds it by default (``configure_callbacks``) when
``evaluation.log_images > 0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from occscene_pl.render import render_occupancy_figure

__all__ = ["GENERATED_KEY", "SampleImageLogger", "sample_picture"]

# Key of the ``(B, V, 3, H, W)`` generated images in the outputs of ``OccSceneModule.validation_step`` / ``test_step``.
GENERATED_KEY = "generated_images"


def sample_picture(batch: Mapping[str, Any], generated: Tensor, max_images: int) -> np.ndarray:
    """One row per scene, real image | generated image | the conditioning occupancy rendered, stacked vertically.

    Args:
        batch: The collated evaluation batch (``image``, ``occupancy`` and the camera fields).
        generated: ``(B, V, 3, H, W)`` images in ``[0, 1]`` generated from the batch's occupancy.
        max_images: Scenes to show (the first ones; the first view of each).

    Returns:
        ``(rows, width, 3)`` uint8 picture.
    """
    rows = []
    for i in range(min(max_images, generated.shape[0])):
        real = (batch["image"][i, 0].float().clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy()
        fake = (generated[i, 0].clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy()
        figure = render_occupancy_figure(
            batch["occupancy"][i].cpu().numpy(),
            batch["voxel_origin"][i].cpu().numpy(),
            float(torch.as_tensor(batch["voxel_size"][i])),
            batch["intrinsics"][i, 0].cpu().numpy(),
            batch["voxel_to_camera"][i, 0].cpu().numpy(),
            real.shape[:2],
        )
        rows.append(np.concatenate([real, fake, figure[: real.shape[0]]], axis=1))
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])


class SampleImageLogger(pl.Callback):
    """Log :func:`sample_picture` of the first validation / test batch that generated images.

    The picture goes to the logger's ``experiment.add_image`` when it has one (TensorBoard), else to
    ``<log_dir>/samples/<stage>_step<global step>.png`` on rank 0 (CSV logger and others with a ``log_dir``).

    Args:
        max_images: Scenes per picture.
    """

    def __init__(self, max_images: int = 4) -> None:
        if max_images < 1:
            raise ValueError(f"SampleImageLogger: max_images must be >= 1, got {max_images}")
        self.max_images = int(max_images)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Log the picture of validation batch 0."""
        self._log(trainer, pl_module, "val", outputs, batch, batch_idx)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Log the picture of test batch 0."""
        self._log(trainer, pl_module, "test", outputs, batch, batch_idx)

    def _log(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx != 0 or not isinstance(outputs, Mapping) or outputs.get(GENERATED_KEY) is None:
            return
        picture = sample_picture(batch, outputs[GENERATED_KEY], self.max_images)
        logger = trainer.logger
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            experiment.add_image(f"{stage}/samples", picture, pl_module.global_step, dataformats="HWC")
        elif logger is not None and logger.log_dir is not None and trainer.is_global_zero:
            from PIL import Image

            folder = Path(logger.log_dir) / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture).save(folder / f"{stage}_step{pl_module.global_step:07d}.png")
