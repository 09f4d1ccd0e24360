"""Typed option groups of :class:`~occscene_pl.module.OccSceneModule` (``model.loss``, ``model.optimizer``, ...).

They are plain dataclasses, so LightningCLI documents and validates them (``occscene-pl fit --print_config`` shows
every field with its default) and YAML configs set them field by field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = ["EvaluationConfig", "LossConfig", "OptimizerConfig", "SamplingConfig"]

TimestepWeighting = Literal["alpha_bar", "cutoff", "none"]
PredictMode = Literal["auto", "text", "layout"]


@dataclass
class LossConfig:
    """Weights of the joint objective (``docs/design.md`` §2.3); a weight of 0 skips the term's computation.

    ``loss = diffusion * L_diff + generated_ssc * g(t) * L_ssc(perceiver(decode(x0_hat))) + real_ssc * L_ssc(
    perceiver(image))`` where each ``L_ssc`` is MonoScene's sum ``ce * CE + sem_scal * ... + relation * ...``.
    """

    diffusion: float = 1.0
    """Diffusion (noise / velocity regression) loss."""
    generated_ssc: float = 1.0
    """SSC loss of the perceiver on the decoded one-step estimate ``decode(x0_hat)`` (joint mode only)."""
    real_ssc: float = 1.0
    """SSC loss of the perceiver on the real images (perception and joint modes)."""
    timestep_weighting: TimestepWeighting = "alpha_bar"
    """``g(t)``: ``alpha_bar`` (``alpha_bar_t``), ``cutoff`` (1 for ``t < timestep_cutoff``, else 0) or ``none``."""
    timestep_cutoff: int = 400
    """Timestep bound of the ``cutoff`` weighting."""
    ce: float = 1.0
    """Class-weighted cross-entropy inside each SSC loss."""
    sem_scal: float = 1.0
    """Semantic scene-class affinity inside each SSC loss."""
    geo_scal: float = 1.0
    """Geometric scene-class affinity inside each SSC loss."""
    frustum: float = 1.0
    """Frustum proportion inside each SSC loss."""
    relation: float = 1.0
    """Context-prior relation loss (when the perceiver has a context prior)."""
    use_class_weights: bool = True
    """Weight the CE by the dataset's reference class weights (linked from the DataModule)."""

    def __post_init__(self) -> None:
        for name in ("diffusion", "generated_ssc", "real_ssc", "ce", "sem_scal", "geo_scal", "frustum", "relation"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.timestep_weighting not in ("alpha_bar", "cutoff", "none"):
            raise ValueError(
                f"model.loss.timestep_weighting must be alpha_bar, cutoff or none, got {self.timestep_weighting!r}"
            )


@dataclass
class OptimizerConfig:
    """AdamW with one learning rate per part and a linear warm-up."""

    lr_unet: float = 1.0e-5
    """UNet (``docs/design.md`` §2.2: 1e-5 when fine-tuning Stable Diffusion)."""
    lr_aligner: float = 1.0e-4
    """MambaDualAlignment (new, zero-initialised)."""
    lr_perceiver: float = 1.0e-4
    """Perceiver decoder, 3D network and head."""
    lr_perceiver_backbone: float | None = None
    """Perceiver 2D backbone; None = ``lr_perceiver``."""
    weight_decay: float = 1.0e-2
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    """Optimizer steps of linear learning-rate warm-up from 0."""

    def __post_init__(self) -> None:
        for name in ("lr_unet", "lr_aligner", "lr_perceiver", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.optimizer.{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"model.optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class SamplingConfig:
    """The sampling loop of ``docs/design.md`` §3 (validation, test and predict)."""

    num_inference_steps: int = 50
    """Denoising steps of the sampler (``model.generator.sampler``: DDIM, DPM-Solver++, ...)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale; 1 disables guidance (one UNet pass per step)."""
    occupancy_refresh: int = 5
    """Text-only mode: re-predict the occupancy condition from ``decode(x0_hat)`` every this many steps."""
    eta: float = 0.0
    """DDIM's eta (0 = deterministic); ignored by other samplers."""
    predict_mode: PredictMode = "auto"
    """``text``: prompts + camera only (no ground truth reaches the sampler, even if the batch has it); ``layout``:
    the batch's occupancy conditions every step; ``auto``: layout when the batch has occupancy, else text."""
    seed: int = 0
    """Base seed of dataset samples in predict (sample seed = seed + crc32(frame_id)); prompt files carry their own
    seeds (``data.predict_seed``)."""
    use_ema: bool = True
    """Sample with the EMA UNet when ``model.ema_decay`` is set."""

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"model.sampling.num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.occupancy_refresh < 1:
            raise ValueError(f"model.sampling.occupancy_refresh must be >= 1, got {self.occupancy_refresh}")
        if self.guidance_scale < 0:
            raise ValueError(f"model.sampling.guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.predict_mode not in ("auto", "text", "layout"):
            raise ValueError(f"model.sampling.predict_mode must be auto, text or layout, got {self.predict_mode!r}")


@dataclass
class EvaluationConfig:
    """What validation and test measure besides the perceiver's SSC scores."""

    generation_batches: int = 1
    """Validation batches (the first ones: a fixed subset) for which scenes are generated, layout-controlled by the
    ground truth, to measure consistency mIoU and FID/KID; 0 disables generation in validation."""
    test_generation_batches: int = -1
    """Same for ``test``; -1 = every test batch."""
    inception_weights: str | None = None
    """Local FID Inception weights (``pt_inception-2015-12-05-6726825d.pth``); None = no FID/KID (nothing is
    downloaded)."""
    kid_subset_size: int = 50
    judge: str | None = None
    """A perception-mode checkpoint (``.ckpt`` of ``fit --model.mode perception``, a perceiver that never saw a
    generated image) whose frozen perceiver judges generated scenes: ``consistency_miou`` / ``consistency_iou``
    compare its prediction on the generated image with the condition (layout mode) or with the generated occupancy
    (text mode). The co-trained perceiver's scores are reported as ``cotrained_consistency_*``. None: no judge."""
    log_images: int = 4
    """Samples shown in the logged validation picture (real | generated | occupancy); 0 disables it."""


# Checkpoints save these option groups in their hyper-parameters: allow them in weights-only loads (torch's default
# and Lightning's resume), so that no checkpoint ever needs ``weights_only=False``. They are plain dataclasses.
SAFE_CHECKPOINT_CLASSES: list[Any] = [EvaluationConfig, LossConfig, OptimizerConfig, SamplingConfig]
torch.serialization.add_safe_globals(SAFE_CHECKPOINT_CLASSES)
