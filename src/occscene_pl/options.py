"""Typed options of the four networks of :class:`~occscene_pl.module.OccSceneModule` (``model.generator``, ...).

Each class mirrors the keyword arguments of its network (:class:`~occscene_pl.models.SceneGenerator`,
:class:`~occscene_pl.models.TextEncoder`, :class:`~occscene_pl.models.MambaDualAlignment` and
:class:`~occscene_pl.models.OccupancyPerceiver`) minus what the module derives itself (classes, grid, the UNet's
residual layout), with the same defaults. Being dataclasses with attribute docstrings, LightningCLI lists every field
with its doc in ``occscene-pl fit --help``, sets them field by field from YAML (an overlay changes one field, not the
whole group), accepts ``--model.aligner.depth_bins 16`` and rejects a misspelt field when the config is parsed. Only
the diffusers configs ``generator.unet``, ``generator.vae`` and ``generator.scheduler`` stay free-form dicts.

The classes are frozen (the module's defaults are shared instances) and are converted back into keyword arguments
with :meth:`NetworkOptions.kwargs`, so the networks stay usable without them::

    MambaDualAlignment(num_classes, spec, latent_channels, **AlignerOptions(depth_bins=32).kwargs())
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar, get_args

import torch

from occscene_pl.models.frustum import DepthSpacing, FrustumSampling
from occscene_pl.models.generator import SAMPLERS, SamplerName
from occscene_pl.models.text_encoder import Padding

__all__ = [
    "AlignerOptions",
    "GeneratorOptions",
    "NetworkOptions",
    "PerceiverOptions",
    "TextEncoderOptions",
    "coerce_options",
]

_Options = TypeVar("_Options", bound="NetworkOptions")


@dataclass(frozen=True)
class NetworkOptions:
    """Base of the option dataclasses: conversion to keyword arguments and from plain dicts (no fields itself)."""

    option: ClassVar[str] = "model"
    """Dotted name of the option group (``model.aligner``), used in error messages."""

    def kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments of the network (shallow: nested dicts are shared, not copied)."""
        assert dataclasses.is_dataclass(self)
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def from_mapping(cls: type[_Options], values: Mapping[str, Any]) -> _Options:
        """Build the options from a plain dict (e.g. the hyper-parameters of a checkpoint written before them).

        Raises:
            ValueError: A key that is not a field, naming it.
        """
        assert dataclasses.is_dataclass(cls)
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = [str(key) for key in values if key not in names]
        if unknown:
            raise ValueError(f"{cls.option}: unknown option {unknown[0]!r}; expected one of {', '.join(names)}")
        return cls(**values)

    def _require(self, condition: bool, name: str, expectation: str) -> None:
        if not condition:
            raise ValueError(f"{self.option}.{name} must be {expectation}, got {getattr(self, name)!r}")


def coerce_options(cls: type[_Options], value: _Options | Mapping[str, Any] | None) -> _Options:
    """``value`` as a ``cls`` instance: an instance is kept, a mapping converted, None gives the defaults.

    Raises:
        ValueError: A mapping with a key that is not a field of ``cls``.
        TypeError: Any other type.
    """
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls.from_mapping(value)
    raise TypeError(f"{cls.option} must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}")


def _ints(values: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


@dataclass(frozen=True)
class GeneratorOptions(NetworkOptions):
    """:class:`~occscene_pl.models.SceneGenerator`: the diffusers UNet, optional VAE and noise schedule.

    Give either ``pretrained`` (a local diffusers folder) or a ``unet`` config; ``generation`` and ``joint`` modes
    need one of them, ``perception`` mode builds no generator.
    """

    option = "model.generator"

    pretrained: str | None = None
    """Local diffusers folder with ``unet/``, ``scheduler/`` and optionally ``vae/`` (e.g. Stable Diffusion v1.5);
    loaded with ``local_files_only``, never a hub name. None: build from ``unet`` / ``vae``."""
    unet: dict[str, Any] | None = None
    """``UNet2DConditionModel`` config kwargs when ``pretrained`` is None (free-form, diffusers' own); ``in_channels``
    / ``out_channels`` default to the latent channels (3 in pixel space)."""
    vae: dict[str, Any] | None = None
    """``AutoencoderKL`` config kwargs when ``pretrained`` is None (free-form); None = pixel-space diffusion."""
    scheduler: dict[str, Any] | None = None
    """``DDPMScheduler`` config kwargs of the training noise schedule (free-form); with ``pretrained`` they override
    the folder's scheduler config (e.g. ``prediction_type``)."""
    sampler: SamplerName = "ddim"
    """Scheduler of the sampling loop: ``ddim``, ``dpmsolver++``, ``ddpm`` or ``euler``."""
    use_vae: bool = True
    """False ignores any VAE (the folder's or ``vae``) and diffuses in pixel space."""
    gradient_checkpointing: bool = False
    """diffusers gradient checkpointing in the UNet and the VAE (the generated-image loss back-propagates through
    the decoder, whose activations dominate memory at Stable Diffusion sizes)."""
    freeze_vae: bool = True
    """Keep the VAE frozen (no gradients, always in eval mode)."""

    def __post_init__(self) -> None:
        self._require(self.sampler in SAMPLERS, "sampler", f"one of {', '.join(sorted(SAMPLERS))}")
        for name in ("unet", "vae", "scheduler"):
            self._require(getattr(self, name) is None or isinstance(getattr(self, name), Mapping), name, "a dict")
        if self.pretrained is not None and (self.unet is not None or self.vae is not None):
            raise ValueError(
                f"{self.option}: give either pretrained (a local diffusers folder) or unet/vae configs, not both; "
                f"set {self.option}.pretrained to null to build from configs"
            )

    @property
    def is_configured(self) -> bool:
        """Whether a generator can be built (a ``pretrained`` folder or a ``unet`` config)."""
        return self.pretrained is not None or self.unet is not None


@dataclass(frozen=True)
class TextEncoderOptions(NetworkOptions):
    """:class:`~occscene_pl.models.TextEncoder`: the frozen open_clip text tower.

    Its width must equal the UNet's ``cross_attention_dim``.
    """

    option = "model.text_encoder"

    model_name: str = "ViT-L-14"
    """open_clip config name (``ViT-L-14-quickgelu`` is Stable Diffusion v1's text encoder; the packaged
    ``occscene-tiny-clip`` / ``occscene-demo-clip`` are registered on demand)."""
    pretrained: str | None = None
    """Local open_clip checkpoint (state dict or OpenAI TorchScript archive); None = random init. Never a hub name."""
    freeze: bool = True
    """No gradients, always in eval mode, forward under ``torch.no_grad()``."""
    context_length: int | None = None
    """Token length (at most the model's); None = the model's."""
    padding: Padding = "zero"
    """Token after a prompt's end token: ``eot`` (Stable Diffusion v1.x) or ``zero`` (open_clip, SD 2.x)."""

    def __post_init__(self) -> None:
        self._require(self.padding in get_args(Padding), "padding", "eot or zero")
        self._require(self.context_length is None or self.context_length >= 1, "context_length", ">= 1 or null")


@dataclass(frozen=True)
class AlignerOptions(NetworkOptions):
    """:class:`~occscene_pl.models.MambaDualAlignment` (occupancy -> UNet residuals).

    The classes, the UNet's residual layout and the latent channels come from the data and the generator.
    """

    option = "model.aligner"

    embed_dim: int = 32
    """Channels of the occupancy embedding / frustum volume."""
    depth_bins: int = 16
    """Depth samples per latent pixel; divisible by ``patch_size[0]``."""
    depth_range: tuple[float, float] = (1.0, 60.0)
    """``(near, far)`` camera-frame depths in metres covered by the bins, ``0 < near < far``."""
    patch_size: tuple[int, int, int] = (4, 2, 2)
    """``(pd, ph, pw)`` 3D patch of the tokeniser (depth, latent rows, latent columns)."""
    num_layers: int = 2
    """Bidirectional Mamba blocks."""
    d_state: int = 16
    """SSM state size."""
    d_model: int | None = None
    """Token width; None = the UNet's first block width."""
    d_conv: int = 4
    """Mamba causal convolution width."""
    expand: float = 2.0
    """Mamba inner expansion."""
    norm: Literal["layer", "rms"] = "layer"
    """Normalisation in the Mamba blocks."""
    depth_spacing: DepthSpacing = "linear"
    """Depth bins ``linear`` or ``linear_increasing`` (finer near the camera)."""
    deform_kernel_size: int = 3
    """Kernel of the deformable 3D convolution (odd)."""
    deformable: bool = True
    """False: a plain ``Conv3d`` of the same kernel instead of the deformable one (much cheaper on the CPU)."""
    camera_frequencies: int = 4
    """Fourier octaves of the camera encoding."""
    latent_fusion: bool = True
    """Add the patch-embedded noisy latent to the occupancy tokens."""
    depth_reduction: Literal["attention", "mean"] = "attention"
    """Reduction of the depth tokens: learned-score softmax ``attention`` or ``mean``."""
    gradient_checkpointing: bool = False
    """Recompute the deformable-convolution taps and each Mamba block in backward (memory)."""
    frustum_sampling: FrustumSampling = "splat"
    """How the frustum volume reads the occupancy: ``splat`` (voxel centres averaged into their cells) or
    ``point`` (trilinear sampling at the cell centres)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "depth_range", tuple(float(d) for d in self.depth_range))
        object.__setattr__(self, "patch_size", _ints(self.patch_size))
        for name in ("embed_dim", "depth_bins", "num_layers", "d_state", "d_conv"):
            self._require(getattr(self, name) >= 1, name, ">= 1")
        self._require(self.d_model is None or self.d_model >= 1, "d_model", ">= 1 or null")
        self._require(self.expand > 0, "expand", "> 0")
        self._require(self.camera_frequencies >= 0, "camera_frequencies", ">= 0")
        near_far = self.depth_range
        self._require(
            len(near_far) == 2 and 0 < near_far[0] < near_far[1], "depth_range", "[near, far], 0 < near < far"
        )
        self._require(len(self.patch_size) == 3 and min(self.patch_size) >= 1, "patch_size", "three positive ints")
        self._require(self.depth_bins % self.patch_size[0] == 0, "depth_bins", "divisible by patch_size[0]")
        self._require(self.deform_kernel_size >= 1 and self.deform_kernel_size % 2 == 1, "deform_kernel_size", "odd")
        self._require(self.norm in ("layer", "rms"), "norm", "layer or rms")
        self._require(self.depth_spacing in get_args(DepthSpacing), "depth_spacing", "linear or linear_increasing")
        self._require(self.depth_reduction in ("attention", "mean"), "depth_reduction", "attention or mean")
        self._require(self.frustum_sampling in get_args(FrustumSampling), "frustum_sampling", "splat or point")


@dataclass(frozen=True)
class PerceiverOptions(NetworkOptions):
    """:class:`~occscene_pl.models.OccupancyPerceiver` (MonoScene-style image -> occupancy).

    The classes and the grid come from the data.
    """

    option = "model.perceiver"

    backbone: str = "tf_efficientnet_b7.ns_jft_in1k"
    """timm model name of the 2D encoder (a CNN with NCHW feature maps)."""
    pretrained: str | None = None
    """Local weights file of ``backbone``; None = random init."""
    feature_dim: int = 64
    """Channels of the lifted 3D features (MonoScene: 64 KITTI, 200 NYU); a multiple of 4."""
    decoder_dim: int | None = None
    """2D decoder width at the coarsest scale; None = the encoder's coarsest channel count."""
    lift_scales: tuple[int, ...] = (1, 2, 4, 8)
    """2D scales lifted by FLoSP; each 1 or an encoder stride."""
    project_scale: int = 2
    """FLoSP lifts onto ``grid_size // project_scale`` (MonoScene: 2 KITTI, 1 NYU); a power of two."""
    context_prior: bool = True
    """Add the 3D context-relation prior at the bottleneck."""
    n_relations: int = 4
    """Relation maps of the context prior."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "lift_scales", _ints(self.lift_scales))
        self._require(self.feature_dim >= 4 and self.feature_dim % 4 == 0, "feature_dim", "a positive multiple of 4")
        self._require(self.decoder_dim is None or self.decoder_dim >= 1, "decoder_dim", ">= 1 or null")
        self._require(len(self.lift_scales) > 0 and min(self.lift_scales) >= 1, "lift_scales", "positive ints")
        scale = self.project_scale
        self._require(scale >= 1 and scale & (scale - 1) == 0, "project_scale", "a power of two")
        self._require(self.n_relations >= 1, "n_relations", ">= 1")


# Checkpoints save these groups in their hyper-parameters: allow them in weights-only loads (see config.py).
torch.serialization.add_safe_globals([AlignerOptions, GeneratorOptions, PerceiverOptions, TextEncoderOptions])
