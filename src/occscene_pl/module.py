"""``OccSceneModule``: the one LightningModule of occscene-pl (``docs/design.md`` §2, §3, §9).

It wraps the four networks: :class:`~occscene_pl.models.SceneGenerator` (diffusers UNet, optional VAE, schedulers),
:class:`~occscene_pl.models.TextEncoder` (open_clip, frozen), :class:`~occscene_pl.models.MambaDualAlignment`
(occupancy -> UNet residuals) and :class:`~occscene_pl.models.OccupancyPerceiver` (image -> occupancy), and trains
them in one of three modes:

* ``perception``: the perceiver alone on real images (stage 1 of the paper; the generator is not even built);
* ``generation``: UNet + aligner with the ground-truth occupancy as the condition (the single-task baseline);
* ``joint``: OccScene. Diffusion loss with the condition taken from the perceiver's prediction on the real image
  (or the ground truth with probability ``gt_condition_prob``), plus the perception loss on the decoded one-step
  estimate ``decode(x0_hat)`` weighted by ``g(t)`` (gradients reach the UNet and the aligner through it), plus the
  perception loss on the real image.

Validation/test report the perceiver's SSC scores on real images (``val/miou``, ``val/iou``, ...) and, for a fixed
subset, generate scenes layout-controlled by the ground truth to report consistency mIoU (and FID/KID with local
Inception weights). ``predict`` is batch generation (text-only or layout-controlled), written by
:class:`~occscene_pl.writer.GenerationWriter`.
"""

from __future__ import annotations

import logging
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from occscene_pl import ema as ema_lib
from occscene_pl import random_streams
from occscene_pl.callbacks import GENERATED_KEY, SampleImageLogger
from occscene_pl.config import EvaluationConfig, LossConfig, OptimizerConfig, SamplingConfig
from occscene_pl.generation_metrics import GenerationMetrics
from occscene_pl.judge import load_judge
from occscene_pl.losses import SSCLossWeights, diffusion_loss, ssc_loss
from occscene_pl.metrics import SSCMetric
from occscene_pl.models import MambaDualAlignment, OccupancyPerceiver, SceneGenerator, TextEncoder
from occscene_pl.optim import build_optimizer
from occscene_pl.options import (
    AlignerOptions,
    GeneratorOptions,
    PerceiverOptions,
    TextEncoderOptions,
    coerce_options,
)
from occscene_pl.samples import GeneratedSample
from occscene_pl.sampling import Camera, labels_to_probabilities, sample_scenes

__all__ = ["OccSceneModule"]

log = logging.getLogger(__name__)

# The frozen VAE and text encoder (and, in generation mode, the perceiver) are in eval mode on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

Mode = Literal["perception", "generation", "joint"]
_CAMERA_KEYS = ("intrinsics", "voxel_to_camera", "voxel_origin", "voxel_size")
# Defaults of the network options (frozen, so sharing one instance is safe); typed as the option classes so that
# LightningCLI lists their fields in --help and sets them one by one.
_GENERATOR, _TEXT_ENCODER = GeneratorOptions(), TextEncoderOptions()
_ALIGNER, _PERCEIVER = AlignerOptions(), PerceiverOptions()


def _slice_batch(batch: Mapping[str, Any], index: Sequence[int]) -> dict[str, Any]:
    """Rows ``index`` of every tensor / list in a collated batch."""
    rows = torch.as_tensor(list(index), dtype=torch.long)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.ndim > 0:
            out[key] = value[rows.to(value.device)]
        elif isinstance(value, list):
            out[key] = [value[i] for i in index]
        else:
            out[key] = value
    return out


def _check_options(
    mode: str, gt_condition_prob: float, text_dropout: float, condition_dropout: float, ema_decay: float | None
) -> None:
    """Raise a ``ValueError`` naming the first out-of-range option of :class:`OccSceneModule`."""
    if mode not in ("perception", "generation", "joint"):
        raise ValueError(f"model.mode must be perception, generation or joint, got {mode!r}")
    probabilities = {"gt_condition_prob": gt_condition_prob, "text_dropout": text_dropout}
    probabilities["condition_dropout"] = condition_dropout
    for name, value in probabilities.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"model.{name} must be in [0, 1], got {value}")
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        raise ValueError(f"model.ema_decay must be in (0, 1) or null, got {ema_decay}")


class OccSceneModule(pl.LightningModule):
    """OccScene: joint text-to-scene generation and semantic occupancy perception (see the module docstring).

    The four network groups (``generator``, ``text_encoder``, ``aligner``, ``perceiver``) are the dataclasses of
    :mod:`occscene_pl.options`; from Python each also accepts a plain dict of its fields (converted, an unknown key
    is an error naming it) or None (the defaults).

    Args:
        num_classes: Occupancy classes (0 = empty); linked from the DataModule.
        grid_size: ``(X, Y, Z)`` of the dataset's occupancy; linked from the DataModule.
        class_names: Linked from the DataModule (names the per-class IoU logs).
        class_weights: CE class weights by train id; linked from the DataModule (MonoScene / OpenOccupancy values).
        mode: ``perception``, ``generation`` or ``joint`` (``docs/design.md`` §2.2).
        generator: The generator (``pretrained`` folder or ``unet``/``vae`` configs, ``scheduler``, ``sampler``,
            ...); required in ``generation`` and ``joint`` modes, unused in ``perception`` mode.
        text_encoder: The open_clip text encoder; its width must equal the UNet's ``cross_attention_dim``.
        aligner: MambaDualAlignment (occupancy -> UNet residuals).
        perceiver: The MonoScene-style perceiver (image -> occupancy).
        loss: Loss weights and the ``g(t)`` weighting.
        optimizer: Learning rates per part, AdamW settings, warm-up.
        sampling: The sampling loop of validation, test and predict.
        evaluation: Generation metrics in validation and test.
        gt_condition_prob: Joint mode: probability that a training scene is conditioned on its ground-truth
            occupancy instead of the perceiver's prediction (teacher forcing). Generation mode always uses the
            ground truth.
        text_dropout: Probability of replacing a training prompt by ``""`` (classifier-free guidance).
        condition_dropout: Probability of training a scene without any occupancy condition (all aligner residuals
            zero), so that the UNet learns the state that text-only sampling starts from (its first
            ``sampling.occupancy_refresh`` steps run before the perceiver has seen an image).
        ema_decay: Keep an exponential moving average of the UNet and the aligner with this (maximum) decay,
            sampled with when ``sampling.use_ema``; None disables it.
        ema_warmup: Ramp the EMA decay up as diffusers' ``EMAModel`` does: update ``n`` (from 0) uses 0 for
            ``n = 0``, then ``min(ema_decay, (1 + n) / (10 + n))``, so the average forgets the initial weights early.
        init_from: A checkpoint (Lightning ``.ckpt`` or a plain state dict) whose matching weights initialise the
            model, e.g. the stage-1 ``perception`` checkpoint for stage-2 ``joint`` training. Weights only: no
            optimizer state, no step counter. Only trusted files: they are unpickled.
    """

    def __init__(
        self,
        num_classes: int = 20,
        grid_size: Sequence[int] = (256, 256, 32),
        class_names: Sequence[str] | None = None,
        class_weights: Sequence[float] | None = None,
        mode: Mode = "joint",
        generator: GeneratorOptions = _GENERATOR,
        text_encoder: TextEncoderOptions = _TEXT_ENCODER,
        aligner: AlignerOptions = _ALIGNER,
        perceiver: PerceiverOptions = _PERCEIVER,
        loss: LossConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        sampling: SamplingConfig | None = None,
        evaluation: EvaluationConfig | None = None,
        gt_condition_prob: float = 0.5,
        text_dropout: float = 0.1,
        condition_dropout: float = 0.1,
        ema_decay: float | None = None,
        ema_warmup: bool = True,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        # Python callers may pass plain dicts (or None for the defaults), e.g. the hyper-parameters of a checkpoint
        # written before the option classes: converted before they are saved, so checkpoints hold the classes.
        generator = coerce_options(GeneratorOptions, generator)
        text_encoder = coerce_options(TextEncoderOptions, text_encoder)
        aligner = coerce_options(AlignerOptions, aligner)
        perceiver = coerce_options(PerceiverOptions, perceiver)
        self.save_hyperparameters()
        _check_options(mode, gt_condition_prob, text_dropout, condition_dropout, ema_decay)
        self.mode: Mode = mode
        self.num_classes = int(num_classes)
        self.grid_size = tuple(int(g) for g in grid_size)
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"model.class_names has {len(self.class_names)} names, expected num_classes={num_classes}")
        self.loss_config = loss or LossConfig()
        self.optimizer_config = optimizer or OptimizerConfig()
        self.sampling = sampling or SamplingConfig()
        self.evaluation = evaluation or EvaluationConfig()
        self.gt_condition_prob = 1.0 if mode == "generation" else float(gt_condition_prob)
        self.text_dropout = float(text_dropout)
        self.condition_dropout = float(condition_dropout)
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self.ema_warmup = bool(ema_warmup)

        self._build_losses(class_weights)
        self._build_networks(generator, text_encoder, aligner, perceiver)
        if init_from is not None:
            self._load_initial_weights(Path(init_from))
        self._build_ema()
        if mode == "generation":
            self.perceiver.requires_grad_(False)
        self._build_metrics()
        self._rng_step, self._micro_batch = -1, 0  # see training_step / step_generator
        self._reported: set[str] = set()
        self._generated: set[str] = set()

    # ------------------------------------------------------------------ set-up
    def _build_losses(self, class_weights: Sequence[float] | None) -> None:
        """The SSC term weights and the CE class weights (a non-persistent buffer, None unless used)."""
        weights = None
        if class_weights is not None and self.loss_config.use_class_weights:
            if len(class_weights) != self.num_classes:
                raise ValueError(f"model.class_weights has {len(class_weights)} values, expected {self.num_classes}")
            weights = torch.tensor([float(w) for w in class_weights], dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)
        lw = self.loss_config
        self.ssc_weights = SSCLossWeights(lw.ce, lw.sem_scal, lw.geo_scal, lw.frustum, lw.relation)

    def _build_networks(
        self,
        generator: GeneratorOptions,
        text_encoder: TextEncoderOptions,
        aligner: AlignerOptions,
        perceiver: PerceiverOptions,
    ) -> None:
        """The perceiver always; the generator, text encoder and aligner except in ``perception`` mode."""
        self.perceiver = OccupancyPerceiver(self.num_classes, self.grid_size, **perceiver.kwargs())
        self.generator: SceneGenerator | None = None
        self.text_encoder: TextEncoder | None = None
        self.aligner: MambaDualAlignment | None = None
        if self.mode == "perception":
            return
        if not generator.is_configured:
            raise ValueError(
                f"model.generator is required in {self.mode} mode (model.generator.pretrained or model.generator.unet)"
            )
        self.generator = SceneGenerator(**generator.kwargs())
        self.text_encoder = TextEncoder(**text_encoder.kwargs())
        if self.text_encoder.width != self.generator.cross_attention_dim:
            raise ValueError(
                f"model.text_encoder width {self.text_encoder.width} != the UNet's cross_attention_dim "
                f"{self.generator.cross_attention_dim}; pick a matching open_clip model or UNet config"
            )
        self.aligner = MambaDualAlignment(
            self.num_classes, self.generator.residual_spec(), self.generator.latent_channels, **aligner.kwargs()
        )

    def _build_ema(self) -> None:
        """The EMA of the UNet and the aligner (``ema_decay`` set and a generator built), else ``self.ema = None``."""
        self.ema: nn.ModuleDict | None = None
        if self.ema_decay is not None and self.generator is not None and self.aligner is not None:
            # The aligner is averaged with the UNet: sampling pairs them, so both come from the same average.
            self.ema = ema_lib.make_ema({"unet": self.generator.unet, "aligner": self.aligner})
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    def _build_metrics(self) -> None:
        """SSC scores of the perceiver and, with a generator, generation and judge scores, for val and test."""
        stages = ("val", "test")
        self.ssc_metrics = nn.ModuleDict({stage: SSCMetric(self.num_classes) for stage in stages})
        generates = self.mode != "perception"
        weights, kid_subset = self.evaluation.inception_weights, self.evaluation.kid_subset_size
        self.generation_metrics = nn.ModuleDict(
            {
                stage: GenerationMetrics(self.num_classes, inception_weights=weights, kid_subset_size=kid_subset)
                for stage in stages
            }
            if generates
            else {}
        )
        # The judge's consistency scores (headline ``consistency_*``); the judge itself is loaded on first use and
        # kept out of the state dict: it is an evaluation instrument, not part of the model.
        self.judge_metrics = nn.ModuleDict(
            {stage: SSCMetric(self.num_classes) for stage in stages} if generates else {}
        )
        self.__dict__["_judge"] = None

    def configure_callbacks(self) -> list[pl.Callback]:
        """:class:`~occscene_pl.callbacks.SampleImageLogger` when ``evaluation.log_images > 0`` and scenes are
        generated in validation / test."""
        if self.mode == "perception" or self.evaluation.log_images <= 0:
            return []
        return [SampleImageLogger(self.evaluation.log_images)]

    def _load_initial_weights(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"model.init_from: checkpoint {path} does not exist")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001 - any unpickling error: one message naming the file
            raise ValueError(f"model.init_from: could not read checkpoint {path}: {error}") from error
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"model.init_from: {path} holds no state dict (expected a Lightning .ckpt)")
        own = self.state_dict()
        matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        if mismatched:
            raise ValueError(
                f"model.init_from: {len(mismatched)} tensors of {path} do not fit this model, e.g. {mismatched[:3]}"
            )
        if not matched:
            raise ValueError(f"model.init_from: no weight of {path} matches this model")
        self.load_state_dict(matched, strict=False)
        log.info("init_from %s: loaded %d of %d tensors (%d of the model's)", path, len(matched), len(state), len(own))

    def trainable_parts(self) -> dict[str, nn.Module]:
        """The parts the optimizer updates in the current mode (the VAE and text encoder are always frozen)."""
        parts: dict[str, nn.Module] = {}
        if self.mode in ("perception", "joint"):
            parts["perceiver"] = self.perceiver
        if self.mode in ("generation", "joint"):
            assert self.generator is not None and self.aligner is not None
            parts["unet"] = self.generator.unet
            parts["aligner"] = self.aligner
        return parts

    def train(self, mode: bool = True) -> OccSceneModule:
        """Frozen parts stay in eval mode (batch-norm statistics, dropout) whatever Lightning asks for."""
        super().train(mode)
        if self.mode == "generation":
            self.perceiver.eval()
        if self.ema is not None:
            self.ema.eval()
        return self

    def setup(self, stage: str) -> None:
        """Refuse sharded strategies before they wrap the model (Lightning calls this hook before wrapping).

        The EMA update reads whole parameters and sampling swaps whole UNet / aligner modules; FSDP, DeepSpeed and
        tensor parallelism replace parameters by shards, so both would silently use partial or stale weights.
        """
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

        strategy = self.trainer.strategy
        if isinstance(strategy, FSDPStrategy | DeepSpeedStrategy | ModelParallelStrategy):
            raise ValueError(
                f"trainer.strategy: {type(strategy).__name__} (sharded parameters) is not supported by OccSceneModule "
                "(its EMA and the EMA/UNet swap at sampling need whole modules); use ddp (data parallel), with "
                "model.generator.gradient_checkpointing and model.aligner.gradient_checkpointing to save memory"
            )

    def configure_optimizers(self) -> Any:
        """AdamW over the :meth:`trainable_parts` (:func:`occscene_pl.optim.build_optimizer`)."""
        return build_optimizer(self.trainable_parts(), self.optimizer_config)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def camera(batch: Mapping[str, Any]) -> Camera:
        """The :class:`~occscene_pl.sampling.Camera` of a collated batch (``image`` or ``image_size`` gives H, W)."""
        if "image" in batch:
            size = tuple(int(s) for s in batch["image"].shape[-2:])
        else:
            size = tuple(int(s) for s in batch["image_size"][0].tolist())
        return Camera(
            batch["intrinsics"].float(),
            batch["voxel_to_camera"].float(),
            batch["voxel_origin"].float(),
            torch.as_tensor(batch["voxel_size"], device=batch["intrinsics"].device).float().reshape(-1),
            (size[0], size[1]),
        )

    def judge(self) -> OccupancyPerceiver | None:
        """The frozen judge of ``evaluation.judge`` on the module's device (loaded once), or None without one."""
        if self.evaluation.judge is None:
            return None
        judge = self.__dict__["_judge"]
        if judge is None:
            judge = load_judge(self.evaluation.judge, self.num_classes, self.grid_size)
            self.__dict__["_judge"] = judge
        return cast(OccupancyPerceiver, judge.to(self.device))

    def judged_labels(self, images: Tensor, camera: Camera) -> Tensor | None:
        """The judge's ``(B, X, Y, Z)`` labels for ``(B, V, 3, H, W)`` images, or None without a judge."""
        judge = self.judge()
        if judge is None:
            return None
        with torch.no_grad():
            logits = judge(images, camera)
        return logits["logits"].argmax(1)

    def perceive(self, images: Tensor, camera: Camera) -> dict[str, Tensor]:
        """The perceiver's output (``logits``, maybe ``relation_logits``) on ``(B, V, 3, H, W)`` images."""
        return self.perceiver(images, camera)

    def _ssc(self, output: Mapping[str, Tensor], batch: Mapping[str, Any]) -> dict[str, Tensor]:
        return ssc_loss(output, batch, self.ssc_weights, cast(Tensor | None, self.class_weights))

    def _weighted_ssc(self, output: Mapping[str, Tensor], batch: Mapping[str, Any], weights: Tensor) -> Tensor:
        """``mean_i weights[i] * L_ssc(sample i)`` over the scenes of ``output`` (one loss call per scene)."""
        total = output["logits"].new_zeros((), dtype=torch.float32)
        for i in range(weights.shape[0]):
            sample_out = {k: v[i : i + 1] for k, v in output.items()}
            total = total + weights[i] * self._ssc(sample_out, _slice_batch(batch, [i]))["loss"]
        return total / weights.shape[0]

    def _timestep_weights(self, timesteps: Tensor) -> Tensor:
        cfg = self.loss_config
        if cfg.timestep_weighting == "alpha_bar":
            assert self.generator is not None
            return self.generator.alphas_cumprod(timesteps)
        if cfg.timestep_weighting == "cutoff":
            return (timesteps < cfg.timestep_cutoff).float()
        return torch.ones_like(timesteps, dtype=torch.float32)

    def _encode_prompts(self, prompts: Sequence[str], dropout: float, rng: torch.Generator | None = None) -> Tensor:
        assert self.text_encoder is not None
        if dropout > 0:
            drop = torch.rand(len(prompts), generator=rng) < dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
        return self.text_encoder(list(prompts)).to(self.device)

    def step_generator(self, step: int, micro_batch: int = 0) -> torch.Generator:
        """The CPU random stream of one training micro-batch of this rank
        (:func:`occscene_pl.random_streams.step_generator`)."""
        return random_streams.step_generator(int(self.global_rank), step, micro_batch)

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within the context the generator samples with the EMA UNet and the EMA aligner (if any and
        ``sampling.use_ema``)."""
        if self.ema is None or self.generator is None or not self.sampling.use_ema:
            yield
            return
        swaps = [(self.generator, "unet", self.ema["unet"]), (self, "aligner", self.ema["aligner"])]
        with ema_lib.swapped_modules(swaps):
            yield

    def ema_decay_at(self, update: int) -> float:
        """EMA decay of update ``n = update`` (0-based): :func:`occscene_pl.ema.ema_decay` of ``ema_decay``."""
        assert self.ema_decay is not None
        return ema_lib.ema_decay(update, self.ema_decay, self.ema_warmup)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images = batch["image"]
        camera = self.camera(batch)
        batch_size = images.shape[0]
        cfg = self.loss_config
        logs: dict[str, Tensor] = {}
        total = images.new_zeros((), dtype=torch.float32)
        step = int(self.global_step)
        self._micro_batch = self._micro_batch + 1 if step == self._rng_step else 0
        self._rng_step = step
        rng = self.step_generator(step, self._micro_batch)

        real_out: dict[str, Tensor] | None = None
        needs_prediction = self.mode == "joint" and self.gt_condition_prob < 1.0
        if (self.mode != "generation" and cfg.real_ssc > 0) or needs_prediction:
            # The perceiver reads the colour-augmented view when the dataset made one; the diffusion target below
            # is always the un-augmented image.
            real_out = self.perceive(batch.get("perceiver_image", images), camera)
        if self.mode != "generation" and cfg.real_ssc > 0 and real_out is not None:
            terms = self._ssc(real_out, batch)
            total = total + cfg.real_ssc * terms["loss"]
            logs.update({f"real_ssc/{k}": v for k, v in terms.items() if k != "loss"})
            logs["real_ssc"] = terms["loss"]
        if self.mode != "perception":
            total = total + self._generation_losses(batch, camera, real_out, logs, rng)

        self.log("train/loss", total, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v.detach() for k, v in logs.items()}, batch_size=batch_size)
        return total

    def _condition(
        self, batch: Mapping[str, Any], real_out: Mapping[str, Tensor] | None, rng: torch.Generator | None = None
    ) -> Tensor:
        """Training condition per scene: ground truth (prob. ``gt_condition_prob``) or the perceiver's prediction."""
        gt = labels_to_probabilities(batch["occupancy"], self.num_classes)
        if self.gt_condition_prob >= 1.0 or real_out is None:
            return gt
        predicted = torch.softmax(real_out["logits"].detach().float(), dim=1)
        draw = torch.rand(gt.shape[0], generator=rng).to(gt.device)
        use_gt = (draw < self.gt_condition_prob).view(-1, 1, 1, 1, 1)
        return torch.where(use_gt, gt, predicted)

    def noised_latents(
        self, images: Tensor, rng: torch.Generator | None = None, t_scene: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Encode ``(B, V, 3, H, W)`` images and noise them at one timestep per scene, shared by its views.

        Everything here is float32 whatever the autocast: in bf16 the noise term at small ``t`` (``sqrt(1 -
        alpha_bar_1)`` ~ 0.03) vanishes next to the latent's own rounding error.

        Args:
            images: ``(B, V, 3, H, W)`` in ``[0, 1]``.
            rng: The random stream of the step (timesteps, noise); the global one if None.
            t_scene: ``(B,)`` timesteps to use instead of drawing them.

        Returns:
            ``(noisy, target, timesteps, t_scene)``: ``(B*V, c, h, w)`` float32 latents and regression targets,
            ``(B*V,)`` timesteps and the ``(B,)`` timesteps of the scenes.
        """
        assert self.generator is not None
        gen = self.generator
        b, v = images.shape[:2]
        with torch.no_grad():
            clean = gen.encode(images.flatten(0, 1)).float()
        if t_scene is None:
            t_scene = torch.randint(0, gen.num_train_timesteps, (b,), generator=rng)
        t_scene = t_scene.to(clean.device)
        with torch.autocast(device_type=clean.device.type, enabled=False):
            noisy, target, timesteps = gen.training_targets(
                clean, generator=rng, timesteps=t_scene.repeat_interleave(v)
            )
        return noisy, target.float(), timesteps, t_scene

    def _generation_losses(
        self,
        batch: Mapping[str, Any],
        camera: Camera,
        real_out: Mapping[str, Tensor] | None,
        logs: dict[str, Tensor],
        rng: torch.Generator | None = None,
    ) -> Tensor:
        assert self.generator is not None and self.aligner is not None
        gen, cfg = self.generator, self.loss_config
        images = batch["image"]
        b, v = images.shape[:2]
        noisy, target, timesteps, t_scene = self.noised_latents(images, rng)
        logs["timestep"] = t_scene.float().mean()
        text = self._encode_prompts(batch["prompt"], self.text_dropout, rng).repeat_interleave(v, 0)
        condition = self._condition(batch, real_out, rng)
        down, mid = self.aligner(condition, camera, noisy)
        if self.condition_dropout > 0 and down is not None and mid is not None:
            # Scenes trained without a condition: zero residuals are exactly the UNet without the aligner.
            kept = (torch.rand(b, generator=rng) >= self.condition_dropout).repeat_interleave(v)
            kept = kept.to(device=noisy.device).view(-1, 1, 1, 1)
            down = [r * kept.to(r.dtype) for r in down]
            mid = mid * kept.to(mid.dtype)
        prediction = gen(noisy, timesteps, text, down, mid)
        diffusion = diffusion_loss(prediction, target)
        logs["diffusion"] = diffusion
        total = cfg.diffusion * diffusion
        if self.mode == "joint" and cfg.generated_ssc > 0:
            weights = self._timestep_weights(t_scene)
            keep = torch.nonzero(weights > 0).flatten().tolist()
            if keep:
                x0 = gen.predict_x0(noisy, prediction, timesteps).unflatten(0, (b, v))[keep]
                estimate = gen.decode(x0.flatten(0, 1)).unflatten(0, (len(keep), v))
                sub = _slice_batch(batch, keep)
                output = self.perceive(estimate, self.camera({**sub, "image": estimate}))
                # Scenes with g(t) = 0 contribute 0 to the mean over the whole batch.
                generated = self._weighted_ssc(output, sub, weights[keep]) * len(keep) / b
                logs["generated_ssc"] = generated
                total = total + cfg.generated_ssc * generated
        return total

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA update: once per optimizer step, also with gradient accumulation."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and self.generator is not None and self.aligner is not None:
            updates = cast(Tensor, self.ema_updates)
            live = {"unet": self.generator.unet, "aligner": self.aligner}
            ema_lib.update_ema(self.ema, live, self.ema_decay_at(int(updates)))
            updates += 1

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: dict[str, Any], batch_idx: int, stage: str) -> dict[str, Tensor] | None:
        """The shared validation / test step: SSC scores of the perceiver on the real images, then (for the first
        ``generation_batches``) scenes generated from the ground truth and their scores.

        Returns:
            ``{GENERATED_KEY: (B, V, 3, H, W) images}`` when scenes were generated (read by
            :class:`~occscene_pl.callbacks.SampleImageLogger`), else None.
        """
        images = batch["image"]
        camera = self.camera(batch)
        output = self.perceive(images, camera)
        self.log(f"{stage}/loss", self._ssc(output, batch)["loss"], batch_size=images.shape[0], sync_dist=True)
        cast(SSCMetric, self.ssc_metrics[stage]).update(output["logits"].argmax(1), batch["occupancy"])
        limit = self.evaluation.generation_batches if stage == "val" else self.evaluation.test_generation_batches
        if self.mode == "perception" or (0 <= limit <= batch_idx):
            return None
        result = self._generate(batch, camera, condition=batch["occupancy"])
        metrics = cast(GenerationMetrics, self.generation_metrics[stage])
        metrics.update(images.flatten(0, 1), result.images.flatten(0, 1), result.logits.argmax(1), batch["occupancy"])
        judged = self.judged_labels(result.images, camera)
        if judged is not None:
            cast(SSCMetric, self.judge_metrics[stage]).update(judged, batch["occupancy"])
        self._generated.add(stage)
        return {GENERATED_KEY: result.images}

    def _generate(self, batch: Mapping[str, Any], camera: Camera, condition: Tensor | None, seeds: Any = None) -> Any:
        assert self.generator is not None and self.text_encoder is not None and self.aligner is not None
        if seeds is None:
            seeds = [self.sampling.seed + zlib.crc32(str(f).encode()) for f in batch["frame_id"]]
        s = self.sampling
        with self.ema_weights():
            return sample_scenes(
                self.generator,
                self.text_encoder,
                self.aligner,
                self.perceiver,
                list(batch["prompt"]),
                camera,
                [int(x) for x in seeds],
                condition=condition,
                num_inference_steps=s.num_inference_steps,
                guidance_scale=s.guidance_scale,
                occupancy_refresh=s.occupancy_refresh,
                eta=s.eta,
            )

    def _evaluation_epoch_end(self, stage: str) -> None:
        metric = cast(SSCMetric, self.ssc_metrics[stage])
        scores = metric.compute()
        self.log_dict({f"{stage}/{k}": scores[k] for k in ("miou", "iou", "precision", "recall")}, prog_bar=True)
        for name, value in zip(self.class_names[1:], scores["per_class_iou"][1:], strict=True):
            self.log(f"{stage}_per_class_iou/{name}", value)
        metric.reset()
        if stage not in self.generation_metrics:
            return
        generation = cast(GenerationMetrics, self.generation_metrics[stage])
        judge_metric = cast(SSCMetric, self.judge_metrics[stage])
        if stage in self._generated:
            self._generated.discard(stage)
            values = generation.compute()
            # The co-trained perceiver reads its own generator's images: reported, but not as the headline.
            values = {k.replace("consistency_", "cotrained_consistency_"): v for k, v in values.items()}
            if self.evaluation.judge is not None:
                judged = judge_metric.compute()
                values.update({f"consistency_{k}": judged[k] for k in ("miou", "iou", "precision", "recall")})
            self.log_dict({f"{stage}/{k}": v for k, v in values.items() if v.ndim == 0})
            if generation.message and generation.message not in self._reported:
                self._reported.add(generation.message)
                log.warning(generation.message)
        generation.reset()
        judge_metric.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor] | None:
        """:meth:`_evaluate` on a validation batch."""
        return self._evaluate(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._evaluation_epoch_end("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor] | None:
        """:meth:`_evaluate` on a test batch."""
        return self._evaluate(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._evaluation_epoch_end("test")

    # ------------------------------------------------------------------ predict
    def _consistency(self, predicted: Tensor, reference: Tensor) -> tuple[float, float]:
        """``(mIoU, IoU)`` of predicted labels against reference labels (255 ignored)."""
        metric = SSCMetric(self.num_classes).to(predicted.device)
        metric.update(predicted, reference.to(predicted.device))
        scores = metric.compute()
        return float(scores["miou"]), float(scores["iou"])

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[GeneratedSample]:
        """Generate every scene of the batch (text-only or layout-controlled, ``sampling.predict_mode``).

        Resuming is the :class:`~occscene_pl.writer.GenerationWriter`'s: it removes the samples it already completed
        from the batch before this step, so the batch may be empty (then nothing is generated).

        Returns:
            One :class:`~occscene_pl.samples.GeneratedSample` per scene, on the CPU.
        """
        if self.mode == "perception":
            raise RuntimeError("model.mode=perception has no generator; predict needs a generation or joint model")
        if len(batch["frame_id"]) == 0:
            return []
        mode = self.sampling.predict_mode
        if mode == "auto":
            mode = "layout" if "occupancy" in batch else "text"
        if mode == "layout" and "occupancy" not in batch:
            raise ValueError(
                "model.sampling.predict_mode=layout needs occupancy in the batch: predict over a dataset split "
                "(leave data.prompts unset)"
            )
        condition = batch["occupancy"] if mode == "layout" else None
        camera = self.camera(batch)
        result = self._generate(batch, camera, condition, seeds=batch.get("seed"))
        labels = result.logits.argmax(1).to(torch.uint8)
        judged = self.judged_labels(result.images, camera)
        probabilities = torch.softmax(result.logits.float(), dim=1).half()
        seeds = batch.get("seed")
        samples: list[GeneratedSample] = []
        for i, frame_id in enumerate(batch["frame_id"]):
            seed = int(seeds[i]) if seeds is not None else self.sampling.seed + zlib.crc32(str(frame_id).encode())
            meta: dict[str, Any] = {
                "sampler": self.generator.sampler if self.generator is not None else None,
                "num_inference_steps": self.sampling.num_inference_steps,
                "guidance_scale": self.sampling.guidance_scale,
                "occupancy_refresh": self.sampling.occupancy_refresh,
                "eta": self.sampling.eta,
                "ema": self.ema is not None and self.sampling.use_ema,
            }
            if condition is not None:
                scores = self._consistency(labels[i : i + 1], condition[i : i + 1])
                meta["cotrained_consistency_miou"], meta["cotrained_consistency_iou"] = scores
            if judged is not None:
                # The judge's reading of the generated image vs the layout it was generated from (layout mode) or
                # vs the occupancy generated with it (text mode).
                reference = condition[i : i + 1] if condition is not None else labels[i : i + 1]
                meta["consistency_miou"], meta["consistency_iou"] = self._consistency(judged[i : i + 1], reference)
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
                    meta=meta,
                )
            )
        return samples

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the generator's architecture, so that the checkpoint alone rebuilds the model.

        The UNet/VAE/scheduler configs go under
        :data:`~occscene_pl.checkpoint_architecture.ARCHITECTURE_KEY` as plain values (``weights_only`` loadable);
        ``validate``/``test``/``predict --ckpt_path`` then build the generator from them instead of the fit-time
        diffusers folder (see :mod:`occscene_pl.checkpoint_architecture`).
        """
        from occscene_pl.checkpoint_architecture import ARCHITECTURE_KEY, model_architecture

        checkpoint[ARCHITECTURE_KEY] = model_architecture(self.generator)
