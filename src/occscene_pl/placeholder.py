"""PLACEHOLDER LightningModule used by the CLI until ``OccSceneModule`` lands (issue 4 replaces it, not extends it).

It is a deliberately small but real monocular SSC baseline so that ``fit``/``validate``/``test``/``predict`` exercise
the data layer, the voxel->pixel projection and :class:`~occscene_pl.metrics.SSCMetric` end to end: a 2D conv
encoder, features lifted to every voxel through the camera (averaged over views, MonoScene's FLoSP idea at one
scale), a 3D conv head, cross-entropy with ``ignore_index=255``. It does not generate images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from occscene_pl.geometry import pixels_to_grid, project_voxels
from occscene_pl.metrics import SSCMetric

__all__ = ["PlaceholderSSCModule"]


class PlaceholderSSCModule(pl.LightningModule):
    """Placeholder image -> occupancy baseline (see the module docstring).

    Args:
        num_classes: linked from the DataModule.
        grid_size: ``(X, Y, Z)``, linked from the DataModule.
        class_names: linked from the DataModule (used to name per-class IoU logs).
        feature_dim: channels of the 2D and 3D features.
        lr: AdamW learning rate.
    """

    def __init__(
        self,
        num_classes: int = 20,
        grid_size: Sequence[int] = (256, 256, 32),
        class_names: Sequence[str] | None = None,
        feature_dim: int = 16,
        lr: float = 1e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.grid_size = tuple(int(g) for g in grid_size)
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names, expected num_classes={num_classes}")
        self.encoder = nn.Sequential(
            nn.Conv2d(3, feature_dim, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(feature_dim, feature_dim, 3, padding=1),
            nn.GELU(),
        )
        self.head = nn.Sequential(
            nn.Conv3d(feature_dim + 1, feature_dim, 3, padding=1),
            nn.GELU(),
            nn.Conv3d(feature_dim, num_classes, 1),
        )
        self.metrics = nn.ModuleDict({stage: SSCMetric(num_classes) for stage in ("val", "test")})

    def forward(self, batch: dict[str, Any]) -> Tensor:
        """Predict occupancy logits ``(B, C, X, Y, Z)`` from ``batch["image"]`` ``(B, V, 3, H, W)``."""
        images = batch["image"]
        b, v, _, h, w = images.shape
        features = self.encoder(images.flatten(0, 1))  # (B*V, F, h', w')
        projection = project_voxels(
            self.grid_size,
            batch["voxel_origin"],
            batch["voxel_size"],
            batch["intrinsics"],
            batch["voxel_to_camera"],
            (h, w),
        )
        grid = pixels_to_grid(projection.pixels, (h, w)).flatten(0, 1).unsqueeze(1)  # (B*V, 1, N, 2)
        lifted = F.grid_sample(features, grid, align_corners=False).squeeze(2)  # (B*V, F, N)
        mask = projection.fov_mask.flatten(0, 1).unsqueeze(1).to(lifted.dtype)  # (B*V, 1, N)
        lifted = (lifted * mask).unflatten(0, (b, v)).sum(1)  # (B, F, N)
        seen = mask.unflatten(0, (b, v)).sum(1)  # (B, 1, N)
        volume = torch.cat([lifted / seen.clamp_min(1), seen.clamp_max(1)], dim=1)
        return self.head(volume.unflatten(-1, self.grid_size))  # (B, C, X, Y, Z)

    def _metric(self, stage: str) -> SSCMetric:
        return cast(SSCMetric, self.metrics[stage])

    def _loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target.long(), ignore_index=255)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self._loss(self(batch), batch["occupancy"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        logits = self(batch)
        batch_size = batch["image"].shape[0]
        self.log(f"{stage}/loss", self._loss(logits, batch["occupancy"]), batch_size=batch_size, sync_dist=True)
        self._metric(stage).update(logits.argmax(1), batch["occupancy"])

    def _eval_epoch_end(self, stage: str) -> None:
        scores = self._metric(stage).compute()
        self.log_dict({f"{stage}/{k}": scores[k] for k in ("miou", "iou", "precision", "recall")}, prog_bar=True)
        for name, value in zip(self.class_names[1:], scores["per_class_iou"][1:], strict=True):
            self.log(f"{stage}_per_class_iou/{name}", value)
        self._metric(stage).reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        if "image" not in batch:
            raise RuntimeError(
                "PlaceholderSSCModule cannot generate from text prompts; predict over a dataset split "
                "(leave data.prompts unset) until OccSceneModule lands"
            )
        return {"frame_id": batch["frame_id"], "occupancy": self(batch).argmax(1).to(torch.uint8)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"])
