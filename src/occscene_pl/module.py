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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from occscene_pl import ema as ema_lib
from occscene_pl import objective, random_streams
from occscene_pl.callbacks import GENERATED_KEY, SampleImageLogger
from occscene_pl.config import EvaluationConfig, LossConfig, OptimizerConfig, SamplingConfig
from occscene_pl.generation_metrics import GenerationMetrics
from occscene_pl.judge import load_judge
from occscene_pl.losses import SSCLossWeights, ssc_loss
from occscene_pl.metrics import SSCMetric
from occscene_pl.models import MambaDualAlignment, OccupancyPerceiver, SceneGenerator, TextEncoder
from occscene_pl.module_parts import build_metrics, build_networks, check_options
from occscene_pl.optim import build_optimizer
from occscene_pl.options import (
    AlignerOptions,
    GeneratorOptions,
    PerceiverOptions,
    TextEncoderOptions,
    coerce_options,
)
from occscene_pl.prediction import generated_samples
from occscene_pl.samples import GeneratedSample
from occscene_pl.sampling import Camera, sample_scenes

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
        """Build the losses, networks, EMA and metrics of ``mode`` (arguments: see the class docstring)."""
        super().__init__()
        # Python callers may pass plain dicts (or None for the defaults), e.g. the hyper-parameters of a checkpoint
        # written before the option classes: converted before they are saved, so checkpoints hold the classes.
        generator = coerce_options(GeneratorOptions, generator)
        text_encoder = coerce_options(TextEncoderOptions, text_encoder)
        aligner = coerce_options(AlignerOptions, aligner)
        perceiver = coerce_options(PerceiverOptions, perceiver)
        self.save_hyperparameters()
        check_options(mode, gt_condition_prob, text_dropout, condition_dropout, ema_decay)
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
            objective.load_initial_weights(self, Path(init_from))
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
        networks = build_networks(
            self.mode, self.num_classes, self.grid_size, generator, text_encoder, aligner, perceiver
        )
        self.perceiver = networks.perceiver
        self.generator: SceneGenerator | None = networks.generator
        self.text_encoder: TextEncoder | None = networks.text_encoder
        self.aligner: MambaDualAlignment | None = networks.aligner

    def _build_ema(self) -> None:
        """The EMA of the UNet and the aligner (``ema_decay`` set and a generator built), else ``self.ema = None``."""
        self.ema: nn.ModuleDict | None = None
        if self.ema_decay is not None and self.generator is not None and self.aligner is not None:
            # The aligner is averaged with the UNet: sampling pairs them, so both come from the same average.
            self.ema = ema_lib.make_ema({"unet": self.generator.unet, "aligner": self.aligner})
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    def _build_metrics(self) -> None:
        """SSC scores of the perceiver and, with a generator, generation and judge scores, for val and test."""
        metrics = build_metrics(self.num_classes, self.evaluation, generates=self.mode != "perception")
        self.ssc_metrics, self.generation_metrics, self.judge_metrics = metrics
        # The judge itself is loaded on first use and kept out of the state dict: it is an evaluation instrument,
        # not part of the model.
        self.__dict__["_judge"] = None

    def configure_callbacks(self) -> list[pl.Callback]:
        """The callbacks the module needs: the image logger when validation / test log generated images.

        Returns:
            :class:`~occscene_pl.callbacks.SampleImageLogger` when ``evaluation.log_images > 0`` and scenes are
            generated in validation / test, else nothing.
        """
        if self.mode == "perception" or self.evaluation.log_images <= 0:
            return []
        return [SampleImageLogger(self.evaluation.log_images)]

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

    def noised_latents(
        self, images: Tensor, rng: torch.Generator | None = None, t_scene: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Encode images and noise them at one timestep per scene (:func:`occscene_pl.objective.noised_latents`).

        Args:
            images: ``(B, V, 3, H, W)`` in ``[0, 1]``.
            rng: The random stream of the step (timesteps, noise); the global one if None.
            t_scene: ``(B,)`` timesteps to use instead of drawing them.

        Returns:
            ``(noisy, target, timesteps, t_scene)`` (float32 latents and targets, per view and per scene timesteps).
        """
        assert self.generator is not None
        return objective.noised_latents(self.generator, images, rng, t_scene)

    def step_generator(self, step: int, micro_batch: int = 0) -> torch.Generator:
        """The CPU random stream of one training micro-batch of this rank.

        Args:
            step: The optimizer step.
            micro_batch: The micro-batch within the step.

        Returns:
            :func:`occscene_pl.random_streams.step_generator` of this rank.
        """
        return random_streams.step_generator(int(self.global_rank), step, micro_batch)

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within the context the generator samples with the EMA UNet and aligner (if any and ``sampling.use_ema``).

        Yields:
            Nothing; the live modules are back on exit.
        """
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
        """The loss of one training batch: the real-image SSC loss and the generation losses of the mode.

        Args:
            batch: The collated batch.
            batch_idx: Its index (unused: the random stream is keyed by the optimizer step).

        Returns:
            The total loss (terms logged under ``train/``).
        """
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
            total = total + objective.generation_losses(self, batch, camera, real_out, logs, rng)

        self.log("train/loss", total, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v.detach() for k, v in logs.items()}, batch_size=batch_size)
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
        """The shared validation / test step: SSC scores of the perceiver, then generation scores.

        The perceiver is scored on the real images; for the first ``generation_batches`` scenes are also generated
        from the ground truth and scored.

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
            seeds = [random_streams.frame_seed(self.sampling.seed, f) for f in batch["frame_id"]]
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
        """Log and reset the validation metrics."""
        self._evaluation_epoch_end("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor] | None:
        """:meth:`_evaluate` on a test batch."""
        return self._evaluate(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        """Log and reset the test metrics."""
        self._evaluation_epoch_end("test")

    # ------------------------------------------------------------------ predict
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
        meta = {
            "sampler": self.generator.sampler if self.generator is not None else None,
            "num_inference_steps": self.sampling.num_inference_steps,
            "guidance_scale": self.sampling.guidance_scale,
            "occupancy_refresh": self.sampling.occupancy_refresh,
            "eta": self.sampling.eta,
            "ema": self.ema is not None and self.sampling.use_ema,
        }
        judged = self.judged_labels(result.images, camera)
        return generated_samples(
            batch,
            result,
            camera,
            condition,
            judged,
            mode=mode,
            num_classes=self.num_classes,
            base_seed=self.sampling.seed,
            meta=meta,
        )

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
