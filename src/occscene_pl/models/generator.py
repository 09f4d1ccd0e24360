"""Scene generator: an optional frozen VAE + a text-conditioned ``UNet2DConditionModel`` + a DDPM noise schedule.

The generation half of OccScene (``docs/design.md`` §2.1, §11): Stable Diffusion's latent diffusion
built from real ``diffusers`` classes, either loaded from a local diffusers folder (``unet/``, ``vae/``,
``scheduler/`` subfolders, e.g. a Stable Diffusion checkpoint on disk; nothing is ever downloaded) or built from
config dicts for a from-scratch model. Without a VAE the model diffuses in pixel space (latents are the images
mapped to ``[-1, 1]``), which is what the CPU demo uses.

Training: ``encode`` the real images, ``training_targets`` noises them at uniformly drawn timesteps, ``forward``
predicts the scheduler's target (noise or velocity) with optional ControlNet-style residuals from
:class:`~occscene_pl.models.alignment.MambaDualAlignment`, and ``predict_x0`` / ``decode`` give the differentiable
image estimate that the occupancy perceiver reads. Sampling uses ``make_sampler`` (a fresh scheduler, so the
training schedule is never mutated).

The VAE is frozen by default (``requires_grad`` False and kept in ``eval()`` even when the parent calls
``train()``): OccScene fine-tunes the UNet, and the image loss back-propagates *through* the frozen decoder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

__all__ = ["SAMPLERS", "ResidualSpec", "SamplerName", "SceneGenerator"]

SamplerName = Literal["ddim", "dpmsolver++", "ddpm", "euler"]

# Scheduler class and the config overrides that select the variant; every sampler is built with ``from_config`` of
# the training schedule, so betas, prediction type and timestep count always match what the UNet was trained on.
SAMPLERS: dict[str, tuple[Any, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
}

_WEIGHT_PATTERNS = ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")


@dataclass(frozen=True)
class ResidualSpec:
    """Layout of the additional residuals a ``UNet2DConditionModel`` accepts (ControlNet-style injection).

    Attributes:
        channels: Channels of every tensor of ``down_block_additional_residuals``, in the order the UNet consumes
            them: the ``conv_in`` output, then for each down block the output of each of its layers (resnet, or
            resnet + attention), then its downsampler's output.
        downsample: Spatial reduction of each of those tensors relative to the latent (1, 1, 2, 2, 4, ...).
        mid_channels: Channels of ``mid_block_additional_residual``.
        mid_downsample: Spatial reduction of the mid residual relative to the latent.
    """

    channels: list[int]
    downsample: list[int]
    mid_channels: int
    mid_downsample: int

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.downsample):
            raise ValueError(
                f"ResidualSpec needs one downsample factor per channel entry, got channels={self.channels} and "
                f"downsample={self.downsample}"
            )

    def shapes(
        self, batch: int, height: int, width: int
    ) -> tuple[list[tuple[int, int, int, int]], tuple[int, int, int, int]]:
        """Residual shapes for a latent of spatial size ``(height, width)``.

        Args:
            batch: Number of latents ``N``.
            height: Latent height ``h``.
            width: Latent width ``w``.

        Returns:
            ``(down, mid)``: one ``(N, ch_i, ceil(h / ds_i), ceil(w / ds_i))`` per down residual and the mid shape
            (``ceil`` because diffusers' stride-2 convolutions with padding 1 round odd sizes up).
        """

        def size(n: int, factor: int) -> int:
            return -(-n // factor)

        down = [
            (batch, c, size(height, d), size(width, d)) for c, d in zip(self.channels, self.downsample, strict=True)
        ]
        mid = (batch, self.mid_channels, size(height, self.mid_downsample), size(width, self.mid_downsample))
        return down, mid


def _check_subfolder(folder: Path, name: str, config_file: str, weights: bool) -> Path:
    """Path of ``folder/name`` after checking it holds ``config_file`` (and diffusers weights when ``weights``)."""
    sub = folder / name
    if not (sub / config_file).is_file():
        raise FileNotFoundError(
            f"SceneGenerator pretrained folder {folder}: expected {sub / config_file} (a diffusers `{name}` "
            f"subfolder saved with save_pretrained), but it does not exist"
        )
    if weights and not any(any(sub.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise FileNotFoundError(
            f"SceneGenerator pretrained folder {folder}: {sub} has no weights (expected "
            f"diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin, possibly sharded)"
        )
    return sub


def _cross_attention_dim(unet: Any) -> int:
    dim = unet.config.cross_attention_dim
    if isinstance(dim, int):
        return dim
    dims = set(dim)
    if len(dims) != 1:
        raise ValueError(f"SceneGenerator needs one cross_attention_dim for all UNet blocks, got {dim}")
    return int(dims.pop())


class SceneGenerator(nn.Module):
    """Latent (or pixel-space) text-to-image diffusion from diffusers components.

    Args:
        pretrained: Local diffusers folder with ``unet/`` and ``scheduler/`` subfolders and optionally ``vae/``
            (e.g. Stable Diffusion v1.5 on disk). Loaded with ``local_files_only=True``; never a hub name.
        unet: ``UNet2DConditionModel`` config kwargs when ``pretrained`` is None. ``in_channels`` and
            ``out_channels`` default to the latent channels (3 in pixel space).
        vae: ``AutoencoderKL`` config kwargs when ``pretrained`` is None; None means pixel-space diffusion.
        scheduler: ``DDPMScheduler`` config kwargs of the training noise schedule; with ``pretrained`` they
            override the folder's scheduler config (e.g. ``prediction_type``). From scratch, ``clip_sample``
            defaults to True in pixel space only (latents are not bounded by 1).
        sampler: Scheduler type returned by :meth:`make_sampler`.
        use_vae: False ignores any VAE (the folder's or ``vae``) and diffuses in pixel space.
        gradient_checkpointing: Enable diffusers gradient checkpointing in the UNet and the VAE (the image loss
            back-propagates through the decoder, whose activations dominate memory at Stable Diffusion sizes).
        freeze_vae: Keep the VAE frozen (``requires_grad`` False, always in eval mode). Default True.

    Raises:
        FileNotFoundError: ``pretrained`` or one of its required subfolders is missing.
        ValueError: Inconsistent arguments (both ``pretrained`` and ``unet``/``vae``, neither, channel mismatch
            between UNet and latents, unknown ``sampler``).

    Attributes:
        unet: The ``UNet2DConditionModel`` (trainable).
        vae: The ``AutoencoderKL`` or None (pixel space).
        noise_scheduler: The training ``DDPMScheduler``.
        latent_channels: Channels ``c`` of the latents (3 in pixel space).
        latent_scale: Image size / latent size (``2 ** (len(vae block_out_channels) - 1)``, 8 for SD; 1 in pixel
            space).
        cross_attention_dim: Width ``D`` the text embeddings must have.
    """

    # diffusers' classes are opaque to mypy (lazy imports, dynamic config attributes).
    unet: Any
    vae: Any
    noise_scheduler: Any

    def __init__(
        self,
        pretrained: str | None = None,
        unet: dict[str, Any] | None = None,
        vae: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        sampler: SamplerName = "ddim",
        use_vae: bool = True,
        gradient_checkpointing: bool = False,
        freeze_vae: bool = True,
    ) -> None:
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"SceneGenerator: unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
        self.sampler = sampler
        self.freeze_vae = freeze_vae

        if pretrained is not None:
            if unet is not None or vae is not None:
                raise ValueError(
                    "SceneGenerator: give either `pretrained` (a local diffusers folder) or `unet`/`vae` configs, "
                    "not both"
                )
            self.unet, self.vae, self.noise_scheduler = self._load(Path(pretrained), scheduler, use_vae)
        else:
            if unet is None:
                raise ValueError("SceneGenerator needs `pretrained` (a local diffusers folder) or a `unet` config dict")
            self.vae = AutoencoderKL(**dict(vae)) if vae is not None and use_vae else None
            channels = self.vae.config.latent_channels if self.vae is not None else 3
            unet_config = {"in_channels": channels, "out_channels": channels, **dict(unet)}
            self.unet = UNet2DConditionModel(**unet_config)
            scheduler_config = {"clip_sample": self.vae is None, **dict(scheduler or {})}
            self.noise_scheduler = DDPMScheduler(**scheduler_config)

        self.latent_channels = int(self.vae.config.latent_channels) if self.vae is not None else 3
        self.latent_scale = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        self.cross_attention_dim = _cross_attention_dim(self.unet)
        for key in ("in_channels", "out_channels"):
            if self.unet.config[key] != self.latent_channels:
                space = "the VAE latent" if self.vae is not None else "pixel space (RGB)"
                raise ValueError(
                    f"SceneGenerator: UNet {key}={self.unet.config[key]} but {space} has {self.latent_channels} "
                    "channels"
                )
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"SceneGenerator: unsupported scheduler prediction_type {prediction_type!r}; expected epsilon, "
                "v_prediction or sample"
            )
        if self.vae is not None and freeze_vae:
            self.vae.requires_grad_(False)
            self.vae.eval()
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.vae is not None:
                self.vae.enable_gradient_checkpointing()

    @staticmethod
    def _load(folder: Path, scheduler: Mapping[str, Any] | None, use_vae: bool) -> tuple[Any, Any, Any]:
        if not folder.is_dir():
            raise FileNotFoundError(
                f"SceneGenerator pretrained folder {folder} does not exist; expected a local diffusers folder with "
                "unet/ and scheduler/ subfolders (vae/ optional), e.g. a Stable Diffusion checkpoint on disk"
            )
        _check_subfolder(folder, "unet", "config.json", weights=True)
        _check_subfolder(folder, "scheduler", "scheduler_config.json", weights=False)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
        vae = None
        if use_vae and (folder / "vae").exists():
            _check_subfolder(folder, "vae", "config.json", weights=True)
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
        noise_scheduler = DDPMScheduler.from_pretrained(
            folder, subfolder="scheduler", local_files_only=True, **dict(scheduler or {})
        )
        return unet, vae, noise_scheduler

    @classmethod
    def from_folder(cls, folder: str | Path, **kwargs: Any) -> SceneGenerator:
        """Load a generator saved with :meth:`save_pretrained` (or any local diffusers folder).

        Args:
            folder: The diffusers folder.
            **kwargs: Other constructor arguments (``sampler``, ``use_vae``, ...).
        """
        return cls(pretrained=str(folder), **kwargs)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``unet/``, ``scheduler/`` and (latent mode) ``vae/`` diffusers subfolders into ``folder``.

        Raises:
            FileExistsError: A pixel-space model is saved over a folder that already has a ``vae/`` subfolder
                (loading it back would silently turn the model into a latent one).
        """
        folder = Path(folder)
        if self.vae is None and (folder / "vae").exists():
            raise FileExistsError(
                f"SceneGenerator.save_pretrained: {folder / 'vae'} exists but this model has no VAE (pixel space); "
                "save into an empty folder"
            )
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet")
        if self.vae is not None:
            self.vae.save_pretrained(folder / "vae")
        self.noise_scheduler.save_pretrained(folder / "scheduler")

    def train(self, mode: bool = True) -> SceneGenerator:
        """Set train mode; a frozen VAE stays in eval mode."""
        super().train(mode)
        if self.vae is not None and self.freeze_vae:
            self.vae.eval()
        return self

    @property
    def prediction_type(self) -> str:
        """The scheduler's ``prediction_type`` (``epsilon``, ``v_prediction`` or ``sample``)."""
        return str(self.noise_scheduler.config.prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        """Number of timesteps of the training noise schedule."""
        return int(self.noise_scheduler.config.num_train_timesteps)

    def encode(self, images: Tensor) -> Tensor:
        """Images to diffusion latents.

        Args:
            images: ``(N, 3, H, W)`` in ``[0, 1]``.

        Returns:
            ``(N, c, H / s, W / s)``: the VAE posterior mean (shifted and) scaled by the VAE's ``scaling_factor``
            (deterministic, as the DDPM objective only needs a consistent encoding), or ``images * 2 - 1`` in pixel
            space (``s = latent_scale``).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"SceneGenerator.encode expects images of shape (N, 3, H, W), got {tuple(images.shape)}")
        x = images * 2 - 1
        if self.vae is None:
            return x
        x = x.to(self.vae.dtype)
        latents = self.vae.encode(x).latent_dist.mean
        shift = self.vae.config.shift_factor
        if shift is not None:
            latents = latents - shift
        return latents * self.vae.config.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        """Latents to images; differentiable (the generated-image perception loss back-propagates through it).

        Args:
            latents: ``(N, c, h, w)``.

        Returns:
            ``(N, 3, h * s, w * s)`` in ``[0, 1]`` (clamped).
        """
        if self.vae is None:
            x = latents
        else:
            z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
            shift = self.vae.config.shift_factor
            if shift is not None:
                z = z + shift
            x = self.vae.decode(z).sample
        return ((x + 1) / 2).clamp(0, 1)

    def alphas_cumprod(self, timesteps: Tensor) -> Tensor:
        """``alpha_bar_t`` of the training schedule (for the ``g(t)`` weighting of the perception loss).

        Fractional timesteps (sigma-based samplers such as Euler space them evenly in ``[0, T - 1]``) interpolate
        ``sigma = sqrt((1 - a) / a)`` linearly between the neighbouring integer steps, as those diffusers schedulers
        do, so that :meth:`predict_x0` matches their own x0 estimate.

        Args:
            timesteps: ``(N,)`` timesteps (integer, or float for sigma-based samplers).

        Returns:
            ``(N,)`` float32 on the device of ``timesteps``.
        """
        # Read from the scheduler in float32 on every call (not a module buffer that a half-precision cast of the
        # module would round: alpha_bar near 1 needs float32).
        t = torch.as_tensor(timesteps)
        table = torch.as_tensor(self.noise_scheduler.alphas_cumprod, dtype=torch.float32, device=t.device)
        if not t.is_floating_point():
            return table[t.long()]
        t = t.float().clamp(0, table.numel() - 1)
        low, high = t.floor().long(), t.ceil().long()
        weight = t - low
        sigma = ((1 - table) / table).sqrt()
        interpolated = 1 / (1 + (sigma[low] * (1 - weight) + sigma[high] * weight) ** 2)
        return torch.where(weight == 0, table[low], interpolated)

    def training_targets(
        self, latents: Tensor, generator: torch.Generator | None = None, timesteps: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Noise clean latents at uniformly drawn (or given) timesteps.

        Args:
            latents: ``(N, c, h, w)`` clean latents ``z_0``.
            generator: Optional RNG for the timesteps and the noise (on any device).
            timesteps: Optional ``(N,)`` integer timesteps to use instead of drawing them (e.g. one per scene,
                shared by its camera views).

        Returns:
            ``(noisy, target, timesteps)``: ``z_t`` ``(N, c, h, w)``; the regression target of the UNet for the
            scheduler's ``prediction_type`` (the noise for ``epsilon``, ``sqrt(a) eps - sqrt(1 - a) z_0`` for
            ``v_prediction``, ``z_0`` for ``sample``); ``(N,)`` long timesteps on the latents' device.
        """
        n = latents.shape[0]
        rng_device = generator.device if generator is not None else latents.device
        if timesteps is None:
            timesteps = torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=rng_device)
        elif timesteps.shape != (n,) or timesteps.is_floating_point():
            raise ValueError(f"SceneGenerator: timesteps must be ({n},) integers, got {tuple(timesteps.shape)}")
        timesteps = timesteps.to(latents.device)
        noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = latents
        return noisy, target, timesteps

    def predict_x0(self, noisy: Tensor, model_output: Tensor, timesteps: Tensor) -> Tensor:
        """Closed-form estimate of the clean latent from one UNet prediction (differentiable).

        With ``a = alpha_bar_t``: ``epsilon``: ``(z_t - sqrt(1 - a) eps) / sqrt(a)``; ``v_prediction``:
        ``sqrt(a) z_t - sqrt(1 - a) v``; ``sample``: the output itself.

        Args:
            noisy: ``(N, c, h, w)`` noisy latents ``z_t``.
            model_output: ``(N, c, h, w)`` UNet output.
            timesteps: ``(N,)`` timesteps (or a scalar, broadcast).

        Returns:
            ``(N, c, h, w)`` estimate of ``z_0`` in float32 whatever the inputs' dtype (under bf16 autocast the UNet
            output is bf16; the estimate is what the perceiver and the generated-image loss read).
        """
        if self.prediction_type == "sample":
            return model_output.float()
        timesteps = torch.as_tensor(timesteps, device=noisy.device).reshape(-1).expand(noisy.shape[0])
        a = self.alphas_cumprod(timesteps).reshape(-1, *([1] * (noisy.ndim - 1)))
        sqrt_a, sqrt_1ma = a.sqrt(), (1 - a).sqrt()
        if self.prediction_type == "epsilon":
            x0 = (noisy.float() - sqrt_1ma * model_output.float()) / sqrt_a
        else:
            x0 = sqrt_a * noisy.float() - sqrt_1ma * model_output.float()
        return x0

    def forward(
        self,
        noisy: Tensor,
        timesteps: Tensor | int,
        text_embeddings: Tensor,
        down_residuals: Sequence[Tensor] | None = None,
        mid_residual: Tensor | None = None,
    ) -> Tensor:
        """One UNet evaluation.

        Args:
            noisy: ``(N, c, h, w)`` noisy latents.
            timesteps: ``(N,)`` timesteps or a scalar.
            text_embeddings: ``(N, L, D)`` per-token text embeddings, ``D == cross_attention_dim``.
            down_residuals: Tensors shaped like :meth:`residual_spec` (ControlNet-style), added to the UNet's skip
                features; must come with ``mid_residual``.
            mid_residual: Residual added to the mid block output.

        Returns:
            ``(N, c, h, w)`` the UNet prediction (noise, velocity or sample per ``prediction_type``).
        """
        if text_embeddings.ndim != 3 or text_embeddings.shape[-1] != self.cross_attention_dim:
            raise ValueError(
                f"SceneGenerator: text_embeddings must be (N, L, {self.cross_attention_dim}), got "
                f"{tuple(text_embeddings.shape)}"
            )
        if (down_residuals is None) != (mid_residual is None):
            # diffusers would silently treat lone down residuals as T2I-Adapter (intra-block) residuals.
            raise ValueError("SceneGenerator: down_residuals and mid_residual must be given together (or neither)")
        extra: dict[str, Any] = {}
        if down_residuals is not None:
            n_expected = len(self.residual_spec().channels)
            if len(down_residuals) != n_expected:
                raise ValueError(
                    f"SceneGenerator: expected {n_expected} down residuals (see residual_spec()), got "
                    f"{len(down_residuals)}"
                )
            extra = {
                "down_block_additional_residuals": tuple(down_residuals),
                "mid_block_additional_residual": mid_residual,
            }
        # float32 latents (see OccSceneModule.noised_latents) meet a half-precision UNet only without autocast.
        dtype = self.unet.dtype
        return self.unet(
            noisy.to(dtype), timesteps, encoder_hidden_states=text_embeddings.to(dtype), return_dict=False, **extra
        )[0]

    def residual_spec(self) -> ResidualSpec:
        """The residual layout of this UNet, read off its down blocks (layers per block, downsamplers, widths).

        Returns:
            A :class:`ResidualSpec` whose entries match, in order, the skip features the UNet collects in its
            forward pass (what ``down_block_additional_residuals`` is added to).
        """
        channels = [int(self.unet.conv_in.out_channels)]
        downsample = [1]
        factor = 1
        for i, block in enumerate(self.unet.down_blocks):
            if not hasattr(block, "resnets"):
                raise ValueError(f"SceneGenerator.residual_spec: unsupported down block {type(block).__name__}")
            out = int(self.unet.config.block_out_channels[i])
            for resnet in block.resnets:
                channels.append(int(getattr(resnet, "out_channels", out)))
                downsample.append(factor)
            for down in getattr(block, "downsamplers", None) or []:
                factor *= 2
                channels.append(int(getattr(down, "out_channels", out) or out))
                downsample.append(factor)
        return ResidualSpec(
            channels=channels,
            downsample=downsample,
            mid_channels=int(self.unet.config.block_out_channels[-1]),
            mid_downsample=factor,
        )

    def make_sampler(self, num_inference_steps: int, device: torch.device | str | None = None) -> SchedulerMixin:
        """A fresh scheduler of type ``sampler`` built from the training schedule's config, timesteps set.

        ``euler`` (like every sigma-based scheduler) needs ``scheduler.scale_model_input`` on the UNet input and the
        initial noise multiplied by ``scheduler.init_noise_sigma``; the other samplers accept both as no-ops.
        ``scale_model_input`` maps the sampler's state to the DDPM parameterisation, so
        ``predict_x0(scheduler.scale_model_input(x, t), output, t)`` is the x0 estimate for every sampler (the
        occupancy refresh of ``docs/design.md`` §3.1).

        Args:
            num_inference_steps: Number of denoising steps.
            device: Device of the scheduler's timesteps.

        Returns:
            The scheduler; the training ``noise_scheduler`` is left untouched.
        """
        cls, overrides = SAMPLERS[self.sampler]
        scheduler = cls.from_config(self.noise_scheduler.config, **overrides)
        scheduler.set_timesteps(num_inference_steps, device=device)
        return scheduler
