"""The training objective of :class:`~occscene_pl.module.OccSceneModule` (``docs/design.md`` §2.2-§2.5).

Plain functions that ``training_step`` composes: the condition of a training scene (:func:`training_condition`),
the noised latents (:func:`noised_latents`), prompt encoding with dropout (:func:`encode_prompts`), ``g(t)``
(:func:`timestep_weights`), the per-scene weighted SSC loss (:func:`weighted_ssc`) and the diffusion +
generated-image SSC losses (:func:`generation_losses`); plus ``init_from`` (:func:`load_initial_weights`).

Every random draw comes from the ``rng`` passed in (the step's stream, see
:func:`occscene_pl.random_streams.step_generator`), in a fixed order: timesteps, noise, text dropout, teacher
forcing, condition dropout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from occscene_pl.config import LossConfig
from occscene_pl.data.base import select_rows
from occscene_pl.losses import diffusion_loss
from occscene_pl.models import SceneGenerator, TextEncoder
from occscene_pl.sampling import Camera, labels_to_probabilities

if TYPE_CHECKING:
    from occscene_pl.module import OccSceneModule

__all__ = [
    "encode_prompts",
    "generation_losses",
    "load_initial_weights",
    "noised_latents",
    "timestep_weights",
    "training_condition",
    "weighted_ssc",
]

log = logging.getLogger(__name__)


def load_initial_weights(model: nn.Module, path: Path) -> None:
    """Load the weights of a checkpoint that fit ``model`` (``model.init_from``); weights only.

    Args:
        model: The model to initialise (its tensors of matching name and shape are overwritten).
        path: A Lightning ``.ckpt`` or a plain state dict. Only trusted files: it is unpickled.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file cannot be read, holds no state dict, has a tensor of a matching name but another
            shape, or no tensor of the model.
    """
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from: checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unpickling error: one message naming the file
        raise ValueError(f"model.init_from: could not read checkpoint {path}: {error}") from error
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"model.init_from: {path} holds no state dict (expected a Lightning .ckpt)")
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(
            f"model.init_from: {len(mismatched)} tensors of {path} do not fit this model, e.g. {mismatched[:3]}"
        )
    if not matched:
        raise ValueError(f"model.init_from: no weight of {path} matches this model")
    model.load_state_dict(matched, strict=False)
    log.info("init_from %s: loaded %d of %d tensors (%d of the model's)", path, len(matched), len(state), len(own))


def training_condition(
    batch: Mapping[str, Any],
    real_out: Mapping[str, Tensor] | None,
    num_classes: int,
    gt_condition_prob: float,
    rng: torch.Generator | None = None,
) -> Tensor:
    """The condition of each training scene: its ground truth (prob. ``gt_condition_prob``) or the prediction.

    Args:
        batch: The collated batch (its ``occupancy``).
        real_out: The perceiver's output on the real images, or None (then the ground truth).
        num_classes: Occupancy classes.
        gt_condition_prob: Probability of the ground truth per scene (teacher forcing); 1 skips the draw.
        rng: The step's random stream; the global one if None.

    Returns:
        ``(B, C, X, Y, Z)`` class probabilities.
    """
    gt = labels_to_probabilities(batch["occupancy"], num_classes)
    if gt_condition_prob >= 1.0 or real_out is None:
        return gt
    predicted = torch.softmax(real_out["logits"].detach().float(), dim=1)
    draw = torch.rand(gt.shape[0], generator=rng).to(gt.device)
    use_gt = (draw < gt_condition_prob).view(-1, 1, 1, 1, 1)
    return torch.where(use_gt, gt, predicted)


def noised_latents(
    generator: SceneGenerator, images: Tensor, rng: torch.Generator | None = None, t_scene: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Encode ``(B, V, 3, H, W)`` images and noise them at one timestep per scene, shared by its views.

    Everything here is float32 whatever the autocast: in bf16 the noise term at small ``t`` (``sqrt(1 -
    alpha_bar_1)`` ~ 0.03) vanishes next to the latent's own rounding error.

    Args:
        generator: The scene generator (its VAE, if any, and its training schedule).
        images: ``(B, V, 3, H, W)`` in ``[0, 1]``.
        rng: The random stream of the step (timesteps, noise); the global one if None.
        t_scene: ``(B,)`` timesteps to use instead of drawing them.

    Returns:
        ``(noisy, target, timesteps, t_scene)``: ``(B*V, c, h, w)`` float32 latents and regression targets,
        ``(B*V,)`` timesteps and the ``(B,)`` timesteps of the scenes.
    """
    b, v = images.shape[:2]
    with torch.no_grad():
        clean = generator.encode(images.flatten(0, 1)).float()
    if t_scene is None:
        t_scene = torch.randint(0, generator.num_train_timesteps, (b,), generator=rng)
    t_scene = t_scene.to(clean.device)
    with torch.autocast(device_type=clean.device.type, enabled=False):
        noisy, target, timesteps = generator.training_targets(
            clean, generator=rng, timesteps=t_scene.repeat_interleave(v)
        )
    return noisy, target.float(), timesteps, t_scene


def encode_prompts(
    text_encoder: TextEncoder,
    prompts: Sequence[str],
    dropout: float,
    device: torch.device,
    rng: torch.Generator | None = None,
) -> Tensor:
    """Encode prompts, each replaced by ``""`` with probability ``dropout`` (classifier-free guidance).

    Args:
        text_encoder: The frozen text encoder.
        prompts: One prompt per scene.
        dropout: Probability of dropping a prompt; 0 draws nothing.
        device: Where the embeddings go.
        rng: The step's random stream; the global one if None.

    Returns:
        ``(B, L, D)`` per-token embeddings on ``device``.
    """
    if dropout > 0:
        drop = torch.rand(len(prompts), generator=rng) < dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
    return text_encoder(list(prompts)).to(device)


def timestep_weights(config: LossConfig, generator: SceneGenerator, timesteps: Tensor) -> Tensor:
    """``g(t)`` of ``loss.timestep_weighting``: ``alpha_bar_t``, ``t < timestep_cutoff`` or 1.

    Args:
        config: The loss options.
        generator: The scene generator (its ``alphas_cumprod``).
        timesteps: ``(B,)`` timesteps.

    Returns:
        ``(B,)`` float32 weights.
    """
    if config.timestep_weighting == "alpha_bar":
        return generator.alphas_cumprod(timesteps)
    if config.timestep_weighting == "cutoff":
        return (timesteps < config.timestep_cutoff).float()
    return torch.ones_like(timesteps, dtype=torch.float32)


def weighted_ssc(
    ssc: Callable[[Mapping[str, Tensor], Mapping[str, Any]], dict[str, Tensor]],
    output: Mapping[str, Tensor],
    batch: Mapping[str, Any],
    weights: Tensor,
) -> Tensor:
    """``mean_i weights[i] * L_ssc(sample i)`` over the scenes of ``output`` (one loss call per scene).

    Args:
        ssc: The SSC loss of one output against its batch (a dict with ``loss``).
        output: The perceiver's output for the scenes.
        batch: The scenes' rows of the batch.
        weights: ``(B,)`` weights.

    Returns:
        The weighted mean, a float32 scalar.
    """
    total = output["logits"].new_zeros((), dtype=torch.float32)
    for i in range(weights.shape[0]):
        sample_out = {k: v[i : i + 1] for k, v in output.items()}
        total = total + weights[i] * ssc(sample_out, select_rows(batch, [i]))["loss"]
    return total / weights.shape[0]


def generation_losses(
    module: OccSceneModule,
    batch: Mapping[str, Any],
    camera: Camera,
    real_out: Mapping[str, Tensor] | None,
    logs: dict[str, Tensor],
    rng: torch.Generator | None = None,
) -> Tensor:
    """The diffusion loss and, in ``joint`` mode, the SSC loss on the decoded one-step estimates, weighted by g(t).

    Args:
        module: The module (its networks, options and losses).
        batch: The collated training batch.
        camera: The batch's camera.
        real_out: The perceiver's output on the real images (the condition when not teacher-forced), or None.
        logs: Receives the terms to log (``timestep``, ``diffusion``, ``generated_ssc``).
        rng: The step's random stream; the global one if None.

    Returns:
        The weighted sum of the terms, a scalar.
    """
    assert module.generator is not None and module.aligner is not None and module.text_encoder is not None
    gen, cfg = module.generator, module.loss_config
    images = batch["image"]
    b, v = images.shape[:2]
    noisy, target, timesteps, t_scene = noised_latents(gen, images, rng)
    logs["timestep"] = t_scene.float().mean()
    text = encode_prompts(module.text_encoder, batch["prompt"], module.text_dropout, module.device, rng)
    text = text.repeat_interleave(v, 0)
    condition = training_condition(batch, real_out, module.num_classes, module.gt_condition_prob, rng)
    down, mid = module.aligner(condition, camera, noisy)
    if module.condition_dropout > 0 and down is not None and mid is not None:
        # Scenes trained without a condition: zero residuals are exactly the UNet without the aligner.
        kept = (torch.rand(b, generator=rng) >= module.condition_dropout).repeat_interleave(v)
        kept = kept.to(device=noisy.device).view(-1, 1, 1, 1)
        down = [r * kept.to(r.dtype) for r in down]
        mid = mid * kept.to(mid.dtype)
    prediction = gen(noisy, timesteps, text, down, mid)
    diffusion = diffusion_loss(prediction, target)
    logs["diffusion"] = diffusion
    total = cfg.diffusion * diffusion
    if module.mode == "joint" and cfg.generated_ssc > 0:
        weights = timestep_weights(cfg, gen, t_scene)
        keep = torch.nonzero(weights > 0).flatten().tolist()
        if keep:
            x0 = gen.predict_x0(noisy, prediction, timesteps).unflatten(0, (b, v))[keep]
            estimate = gen.decode(x0.flatten(0, 1)).unflatten(0, (len(keep), v))
            sub = select_rows(batch, keep)
            output = module.perceive(estimate, module.camera({**sub, "image": estimate}))
            # Scenes with g(t) = 0 contribute 0 to the mean over the whole batch.
            generated = weighted_ssc(module._ssc, output, sub, weights[keep]) * len(keep) / b
            logs["generated_ssc"] = generated
            total = total + cfg.generated_ssc * generated
    return total
