"""``OccSceneModule``: the one LightningModule of occscene-pl (DESIGN §2, §3, §6).

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

import copy
import logging
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, cast

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from occscene_pl.config import EvaluationConfig, LossConfig, OptimizerConfig, SamplingConfig
from occscene_pl.generation_metrics import GenerationMetrics
from occscene_pl.losses import SSCLossWeights, diffusion_loss, ssc_loss
from occscene_pl.metrics import SSCMetric
from occscene_pl.models import MambaDualAlignment, OccupancyPerceiver, SceneGenerator, TextEncoder
from occscene_pl.render import render_occupancy_figure
from occscene_pl.sampling import Camera, labels_to_probabilities, sample_scenes

__all__ = ["OccSceneModule"]

log = logging.getLogger(__name__)

# The frozen VAE and text encoder (and, in generation mode, the perceiver) are in eval mode on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

Mode = Literal["perception", "generation", "joint"]
_CAMERA_KEYS = ("intrinsics", "voxel_to_camera", "voxel_origin", "voxel_size")


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


class OccSceneModule(pl.LightningModule):
    """OccScene: joint text-to-scene generation and semantic occupancy perception (see the module docstring).

    Args:
        num_classes: Occupancy classes (0 = empty); linked from the DataModule.
        grid_size: ``(X, Y, Z)`` of the dataset's occupancy; linked from the DataModule.
        class_names: Linked from the DataModule (names the per-class IoU logs).
        class_weights: CE class weights by train id; linked from the DataModule (MonoScene / OpenOccupancy values).
        mode: ``perception``, ``generation`` or ``joint`` (DESIGN §2).
        generator: :class:`~occscene_pl.models.SceneGenerator` arguments (``pretrained`` folder or ``unet``/``vae``
            configs, ``scheduler``, ``sampler``, ...). Unused in ``perception`` mode.
        text_encoder: :class:`~occscene_pl.models.TextEncoder` arguments; its width must equal the UNet's
            ``cross_attention_dim``.
        aligner: :class:`~occscene_pl.models.MambaDualAlignment` arguments besides ``num_classes``, ``residual_spec``
            and ``latent_channels`` (taken from the generator).
        perceiver: :class:`~occscene_pl.models.OccupancyPerceiver` arguments besides ``num_classes`` and
            ``grid_size``.
        loss: Loss weights and the ``g(t)`` weighting.
        optimizer: Learning rates per part, AdamW settings, warm-up.
        sampling: The sampling loop of validation, test and predict.
        evaluation: Generation metrics in validation and test.
        gt_condition_prob: Joint mode: probability that a training scene is conditioned on its ground-truth
            occupancy instead of the perceiver's prediction (teacher forcing). Generation mode always uses the
            ground truth.
        text_dropout: Probability of replacing a training prompt by ``""`` (classifier-free guidance).
        ema_decay: Keep an exponential moving average of the UNet with this decay (sampled with when
            ``sampling.use_ema``); None disables it.
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
        generator: dict[str, Any] | None = None,
        text_encoder: dict[str, Any] | None = None,
        aligner: dict[str, Any] | None = None,
        perceiver: dict[str, Any] | None = None,
        loss: LossConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        sampling: SamplingConfig | None = None,
        evaluation: EvaluationConfig | None = None,
        gt_condition_prob: float = 0.5,
        text_dropout: float = 0.1,
        ema_decay: float | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if mode not in ("perception", "generation", "joint"):
            raise ValueError(f"model.mode must be perception, generation or joint, got {mode!r}")
        if not 0.0 <= gt_condition_prob <= 1.0:
            raise ValueError(f"model.gt_condition_prob must be in [0, 1], got {gt_condition_prob}")
        if not 0.0 <= text_dropout <= 1.0:
            raise ValueError(f"model.text_dropout must be in [0, 1], got {text_dropout}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"model.ema_decay must be in (0, 1) or null, got {ema_decay}")
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
        weights = None
        if class_weights is not None and self.loss_config.use_class_weights:
            if len(class_weights) != num_classes:
                raise ValueError(f"model.class_weights has {len(class_weights)} values, expected {num_classes}")
            weights = torch.tensor([float(w) for w in class_weights], dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)
        lw = self.loss_config
        self.ssc_weights = SSCLossWeights(lw.ce, lw.sem_scal, lw.geo_scal, lw.frustum, lw.relation)

        self.perceiver = OccupancyPerceiver(self.num_classes, self.grid_size, **(perceiver or {}))
        self.generator: SceneGenerator | None = None
        self.text_encoder: TextEncoder | None = None
        self.aligner: MambaDualAlignment | None = None
        self.unet_ema: nn.Module | None = None
        if mode != "perception":
            if generator is None:
                raise ValueError(f"model.generator is required in {mode} mode (a `pretrained` folder or `unet` config)")
            self.generator = SceneGenerator(**generator)
            self.text_encoder = TextEncoder(**(text_encoder or {}))
            if self.text_encoder.width != self.generator.cross_attention_dim:
                raise ValueError(
                    f"model.text_encoder width {self.text_encoder.width} != the UNet's cross_attention_dim "
                    f"{self.generator.cross_attention_dim}; pick a matching open_clip model or UNet config"
                )
            self.aligner = MambaDualAlignment(
                self.num_classes, self.generator.residual_spec(), self.generator.latent_channels, **(aligner or {})
            )
        if init_from is not None:
            self._load_initial_weights(Path(init_from))
        if ema_decay is not None and self.generator is not None:
            self.unet_ema = copy.deepcopy(self.generator.unet).requires_grad_(False).eval()
        if mode == "generation":
            self.perceiver.requires_grad_(False)

        self.ssc_metrics = nn.ModuleDict({stage: SSCMetric(self.num_classes) for stage in ("val", "test")})
        self.generation_metrics = nn.ModuleDict(
            {
                stage: GenerationMetrics(
                    self.num_classes,
                    inception_weights=self.evaluation.inception_weights,
                    kid_subset_size=self.evaluation.kid_subset_size,
                )
                for stage in ("val", "test")
            }
            if mode != "perception"
            else {}
        )
        self._reported: set[str] = set()
        self._generated: set[str] = set()

    # ------------------------------------------------------------------ set-up
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
        if self.unet_ema is not None:
            self.unet_ema.eval()
        return self

    def configure_optimizers(self) -> Any:
        cfg = self.optimizer_config
        groups: list[dict[str, Any]] = []
        parts = self.trainable_parts()
        if "perceiver" in parts:
            backbone = [p for p in self.perceiver.encoder.parameters() if p.requires_grad]
            backbone_ids = {id(p) for p in backbone}
            rest = [p for p in self.perceiver.parameters() if p.requires_grad and id(p) not in backbone_ids]
            lr_backbone = cfg.lr_perceiver_backbone if cfg.lr_perceiver_backbone is not None else cfg.lr_perceiver
            groups += [
                {"params": backbone, "lr": lr_backbone, "name": "perceiver_backbone"},
                {"params": rest, "lr": cfg.lr_perceiver, "name": "perceiver"},
            ]
        if "unet" in parts:
            groups.append(
                {
                    "params": [p for p in parts["unet"].parameters() if p.requires_grad],
                    "lr": cfg.lr_unet,
                    "name": "unet",
                }
            )
            groups.append({"params": list(parts["aligner"].parameters()), "lr": cfg.lr_aligner, "name": "aligner"})
        groups = [g for g in groups if g["params"]]
        optimizer = torch.optim.AdamW(
            groups, betas=(float(cfg.betas[0]), float(cfg.betas[1])), weight_decay=cfg.weight_decay
        )
        if cfg.warmup_steps == 0:
            return optimizer
        warmup = cfg.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

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

    def perceive(self, images: Tensor, camera: Camera) -> dict[str, Tensor]:
        """The perceiver's output (``logits``, maybe ``relation_logits``) on ``(B, V, 3, H, W)`` images."""
        return self.perceiver(images, camera.intrinsics, camera.voxel_to_camera, camera.voxel_origin, camera.voxel_size)

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

    def _encode_prompts(self, prompts: Sequence[str], dropout: float) -> Tensor:
        assert self.text_encoder is not None
        if dropout > 0:
            drop = torch.rand(len(prompts)) < dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
        return self.text_encoder(list(prompts)).to(self.device)

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within the context the generator samples with the EMA UNet (if any and ``sampling.use_ema``)."""
        if self.unet_ema is None or self.generator is None or not self.sampling.use_ema:
            yield
            return
        live = self.generator.unet
        self.generator.unet = self.unet_ema
        try:
            yield
        finally:
            self.generator.unet = live

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images = batch["image"]
        camera = self.camera(batch)
        batch_size = images.shape[0]
        cfg = self.loss_config
        logs: dict[str, Tensor] = {}
        total = images.new_zeros((), dtype=torch.float32)

        real_out: dict[str, Tensor] | None = None
        needs_prediction = self.mode == "joint" and self.gt_condition_prob < 1.0
        if (self.mode != "generation" and cfg.real_ssc > 0) or needs_prediction:
            real_out = self.perceive(images, camera)
        if self.mode != "generation" and cfg.real_ssc > 0 and real_out is not None:
            terms = self._ssc(real_out, batch)
            total = total + cfg.real_ssc * terms["loss"]
            logs.update({f"real_ssc/{k}": v for k, v in terms.items() if k != "loss"})
            logs["real_ssc"] = terms["loss"]
        if self.mode != "perception":
            total = total + self._generation_losses(batch, camera, real_out, logs)

        self.log("train/loss", total, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v.detach() for k, v in logs.items()}, batch_size=batch_size)
        return total

    def _condition(self, batch: Mapping[str, Any], real_out: Mapping[str, Tensor] | None) -> Tensor:
        """Training condition per scene: ground truth (prob. ``gt_condition_prob``) or the perceiver's prediction."""
        gt = labels_to_probabilities(batch["occupancy"], self.num_classes)
        if self.gt_condition_prob >= 1.0 or real_out is None:
            return gt
        predicted = torch.softmax(real_out["logits"].detach().float(), dim=1)
        use_gt = (torch.rand(gt.shape[0], device=gt.device) < self.gt_condition_prob).view(-1, 1, 1, 1, 1)
        return torch.where(use_gt, gt, predicted)

    def _generation_losses(
        self, batch: Mapping[str, Any], camera: Camera, real_out: Mapping[str, Tensor] | None, logs: dict[str, Tensor]
    ) -> Tensor:
        assert self.generator is not None and self.aligner is not None
        gen, cfg = self.generator, self.loss_config
        images = batch["image"]
        b, v = images.shape[:2]
        with torch.no_grad():
            clean = gen.encode(images.flatten(0, 1))
        # One timestep per scene, shared by its views (they are denoised together at sampling time).
        t_scene = torch.randint(0, gen.num_train_timesteps, (b,), device=clean.device)
        noisy, target, timesteps = gen.training_targets(clean, timesteps=t_scene.repeat_interleave(v))
        text = self._encode_prompts(batch["prompt"], self.text_dropout).repeat_interleave(v, 0)
        condition = self._condition(batch, real_out)
        down, mid = self.aligner(
            condition,
            camera.intrinsics,
            camera.voxel_to_camera,
            camera.voxel_origin,
            camera.voxel_size,
            camera.image_size,
            noisy,
        )
        prediction = gen(noisy, timesteps, text.to(noisy.dtype), down, mid)
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
        if self.unet_ema is not None and self.generator is not None:
            decay = float(self.hparams["ema_decay"])
            ema: list[Tensor] = list(self.unet_ema.parameters())
            live: list[Tensor] = [p.detach() for p in self.generator.unet.parameters()]
            torch._foreach_lerp_(ema, live, 1.0 - decay)

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        images = batch["image"]
        camera = self.camera(batch)
        output = self.perceive(images, camera)
        self.log(f"{stage}/loss", self._ssc(output, batch)["loss"], batch_size=images.shape[0], sync_dist=True)
        cast(SSCMetric, self.ssc_metrics[stage]).update(output["logits"].argmax(1), batch["occupancy"])
        limit = self.evaluation.generation_batches if stage == "val" else self.evaluation.test_generation_batches
        if self.mode == "perception" or (0 <= limit <= batch_idx):
            return
        result = self._generate(batch, camera, condition=batch["occupancy"])
        metrics = cast(GenerationMetrics, self.generation_metrics[stage])
        metrics.update(images.flatten(0, 1), result.images.flatten(0, 1), result.logits.argmax(1), batch["occupancy"])
        self._generated.add(stage)
        if batch_idx == 0 and self.evaluation.log_images > 0:
            self._log_samples(stage, batch, result.images)

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

    def _log_samples(self, stage: str, batch: Mapping[str, Any], generated: Tensor) -> None:
        """One picture per logged scene: real image | generated image | the conditioning occupancy rendered."""
        rows = []
        for i in range(min(self.evaluation.log_images, generated.shape[0])):
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
            row = np.concatenate([real, fake, figure[: real.shape[0]]], axis=1)
            rows.append(row)
        width = max(r.shape[1] for r in rows)
        picture = np.concatenate(
            [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
        )
        logger = self.logger
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            experiment.add_image(f"{stage}/samples", picture, self.global_step, dataformats="HWC")
        elif logger is not None and logger.log_dir is not None and self.trainer.is_global_zero:
            from PIL import Image

            folder = Path(logger.log_dir) / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture).save(folder / f"{stage}_step{self.global_step:07d}.png")

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
        if stage in self._generated:
            self._generated.discard(stage)
            values = generation.compute()
            self.log_dict({f"{stage}/{k}": v for k, v in values.items() if v.ndim == 0})
            if generation.message and generation.message not in self._reported:
                self._reported.add(generation.message)
                log.warning(generation.message)
        generation.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._evaluation_epoch_end("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._evaluation_epoch_end("test")

    # ------------------------------------------------------------------ predict
    def _prediction_writer(self) -> Any:
        from occscene_pl.writer import GenerationWriter

        for callback in self.trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, GenerationWriter):
                return callback
        return None

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Generate the batch's scenes; samples the writer already completed are skipped before sampling."""
        if self.mode == "perception":
            raise RuntimeError("model.mode=perception has no generator; predict needs a generation or joint model")
        writer = self._prediction_writer()
        frame_ids = [str(f) for f in batch["frame_id"]]
        todo = [i for i, f in enumerate(frame_ids) if writer is None or not writer.should_skip(f)]
        if not todo:
            return []
        batch = _slice_batch(batch, todo)
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
        probabilities = torch.softmax(result.logits.float(), dim=1).half()
        seeds = batch.get("seed")
        samples = []
        for i, frame_id in enumerate(batch["frame_id"]):
            seed = int(seeds[i]) if seeds is not None else self.sampling.seed + zlib.crc32(str(frame_id).encode())
            meta: dict[str, Any] = {
                "sampler": self.generator.sampler if self.generator is not None else None,
                "num_inference_steps": self.sampling.num_inference_steps,
                "guidance_scale": self.sampling.guidance_scale,
                "occupancy_refresh": self.sampling.occupancy_refresh,
                "eta": self.sampling.eta,
                "ema": self.unet_ema is not None and self.sampling.use_ema,
            }
            if condition is not None:
                metric = SSCMetric(self.num_classes).to(labels.device)
                metric.update(labels[i : i + 1], condition[i : i + 1])
                scores = metric.compute()
                meta["consistency_miou"] = float(scores["miou"])
                meta["consistency_iou"] = float(scores["iou"])
            samples.append(
                {
                    "frame_id": str(frame_id),
                    "prompt": batch["prompt"][i],
                    "seed": seed,
                    "mode": mode,
                    "images": result.images[i].cpu(),
                    "occupancy": labels[i].cpu(),
                    "probabilities": probabilities[i].cpu(),
                    "condition": condition[i].to(torch.uint8).cpu() if condition is not None else None,
                    "intrinsics": camera.intrinsics[i].cpu(),
                    "voxel_to_camera": camera.voxel_to_camera[i].cpu(),
                    "voxel_origin": camera.voxel_origin[i].cpu(),
                    "voxel_size": float(camera.voxel_size[i]),
                    "meta": meta,
                }
            )
        return samples
