"""The samples of :meth:`OccSceneModule.predict_step <occscene_pl.module.OccSceneModule.predict_step>` (§3, §9.1).

:func:`generated_samples` packs the scenes of one sampled batch into
:class:`~occscene_pl.samples.GeneratedSample` objects on the CPU, with their seeds, cameras and the consistency
scores of the co-trained perceiver and of the judge in ``meta``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from occscene_pl import random_streams
from occscene_pl.metrics import SSCMetric
from occscene_pl.samples import GeneratedSample
from occscene_pl.sampling import Camera, SampleResult

__all__ = ["consistency", "generated_samples"]


def consistency(num_classes: int, predicted: Tensor, reference: Tensor) -> tuple[float, float]:
    """``(mIoU, IoU)`` of predicted labels against reference labels (255 ignored).

    Args:
        num_classes: Occupancy classes (0 = empty).
        predicted: ``(B, X, Y, Z)`` labels.
        reference: ``(B, X, Y, Z)`` labels (moved to ``predicted``'s device).

    Returns:
        The mean IoU over the non-empty classes and the geometric IoU.
    """
    metric = SSCMetric(num_classes).to(predicted.device)
    metric.update(predicted, reference.to(predicted.device))
    scores = metric.compute()
    return float(scores["miou"]), float(scores["iou"])


def generated_samples(
    batch: Mapping[str, Any],
    result: SampleResult,
    camera: Camera,
    condition: Tensor | None,
    judged: Tensor | None,
    *,
    mode: Literal["text", "layout"],
    num_classes: int,
    base_seed: int,
    meta: Mapping[str, Any],
) -> list[GeneratedSample]:
    """One :class:`~occscene_pl.samples.GeneratedSample` per scene of a sampled batch, on the CPU.

    Args:
        batch: The collated batch (``frame_id``, ``prompt`` and maybe ``seed``).
        result: The batch's sampled scenes (images and occupancy logits).
        camera: The batch's camera.
        condition: ``(B, X, Y, Z)`` layouts the scenes were generated from (layout mode), or None (text mode).
        judged: The judge's ``(B, X, Y, Z)`` labels of the generated images, or None without a judge.
        mode: ``layout`` or ``text``.
        num_classes: Occupancy classes.
        base_seed: ``sampling.seed`` (the seed of a frame without its own is
            :func:`~occscene_pl.random_streams.frame_seed`).
        meta: The sampling settings, copied into every sample's ``meta``.

    Returns:
        The samples, in batch order.
    """
    labels = result.logits.argmax(1).to(torch.uint8)
    probabilities = torch.softmax(result.logits.float(), dim=1).half()
    seeds = batch.get("seed")
    samples: list[GeneratedSample] = []
    for i, frame_id in enumerate(batch["frame_id"]):
        seed = int(seeds[i]) if seeds is not None else random_streams.frame_seed(base_seed, frame_id)
        sample_meta: dict[str, Any] = dict(meta)
        if condition is not None:
            scores = consistency(num_classes, labels[i : i + 1], condition[i : i + 1])
            sample_meta["cotrained_consistency_miou"], sample_meta["cotrained_consistency_iou"] = scores
        if judged is not None:
            # The judge's reading of the generated image vs the layout it was generated from (layout mode) or
            # vs the occupancy generated with it (text mode).
            reference = condition[i : i + 1] if condition is not None else labels[i : i + 1]
            scores = consistency(num_classes, judged[i : i + 1], reference)
            sample_meta["consistency_miou"], sample_meta["consistency_iou"] = scores
        samples.append(
            GeneratedSample(
                frame_id=str(frame_id),
                prompt=str(batch["prompt"][i]),
                seed=seed,
                mode=mode,
                images=result.images[i].cpu().numpy(),
                labels=labels[i].cpu().numpy(),
                probabilities=probabilities[i].cpu().numpy(),
                condition=condition[i].to(torch.uint8).cpu().numpy() if condition is not None else None,
                intrinsics=camera.intrinsics[i].cpu().numpy(),
                voxel_to_camera=camera.voxel_to_camera[i].cpu().numpy(),
                voxel_origin=camera.voxel_origin[i].cpu().numpy(),
                voxel_size=float(camera.voxel_size[i]),
                meta=sample_meta,
            )
        )
    return samples
