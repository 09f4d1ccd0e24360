"""The parts :class:`~occscene_pl.module.OccSceneModule` builds in ``__init__`` (``docs/design.md`` §2.1, §7.3).

:func:`check_options` validates the module's scalar options, :func:`build_networks` builds the four networks of a
mode and :func:`build_metrics` the validation / test metrics. The module assigns what they return, in the order
they return it (the order of its state dict).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from occscene_pl.config import EvaluationConfig
from occscene_pl.generation_metrics import GenerationMetrics
from occscene_pl.metrics import SSCMetric
from occscene_pl.models import MambaDualAlignment, OccupancyPerceiver, SceneGenerator, TextEncoder
from occscene_pl.options import AlignerOptions, GeneratorOptions, PerceiverOptions, TextEncoderOptions

__all__ = ["Metrics", "Networks", "build_metrics", "build_networks", "check_options"]


class Networks(NamedTuple):
    """The networks of a mode; all but the perceiver are None in ``perception`` mode."""

    perceiver: OccupancyPerceiver
    generator: SceneGenerator | None
    text_encoder: TextEncoder | None
    aligner: MambaDualAlignment | None


class Metrics(NamedTuple):
    """The metrics of ``val`` and ``test``, by stage; generation and judge metrics are empty without a generator."""

    ssc: nn.ModuleDict
    generation: nn.ModuleDict
    judge: nn.ModuleDict


def check_options(
    mode: str, gt_condition_prob: float, text_dropout: float, condition_dropout: float, ema_decay: float | None
) -> None:
    """Check the scalar options of :class:`~occscene_pl.module.OccSceneModule`.

    Args:
        mode: ``perception``, ``generation`` or ``joint``.
        gt_condition_prob: A probability.
        text_dropout: A probability.
        condition_dropout: A probability.
        ema_decay: In ``(0, 1)``, or None.

    Raises:
        ValueError: Naming the first out-of-range option.
    """
    if mode not in ("perception", "generation", "joint"):
        raise ValueError(f"model.mode must be perception, generation or joint, got {mode!r}")
    probabilities = {"gt_condition_prob": gt_condition_prob, "text_dropout": text_dropout}
    probabilities["condition_dropout"] = condition_dropout
    for name, value in probabilities.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"model.{name} must be in [0, 1], got {value}")
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        raise ValueError(f"model.ema_decay must be in (0, 1) or null, got {ema_decay}")


def build_networks(
    mode: str,
    num_classes: int,
    grid_size: tuple[int, ...],
    generator: GeneratorOptions,
    text_encoder: TextEncoderOptions,
    aligner: AlignerOptions,
    perceiver: PerceiverOptions,
) -> Networks:
    """The perceiver always; the generator, text encoder and aligner except in ``perception`` mode.

    They are built (and so initialised from the global random state) in that order.

    Args:
        mode: ``perception``, ``generation`` or ``joint``.
        num_classes: Occupancy classes.
        grid_size: ``(X, Y, Z)`` of the occupancy.
        generator: The generator's options.
        text_encoder: The text encoder's options.
        aligner: The aligner's options.
        perceiver: The perceiver's options.

    Returns:
        The networks.

    Raises:
        ValueError: No generator configured outside ``perception`` mode, or a text encoder whose width is not the
            UNet's ``cross_attention_dim``.
    """
    built_perceiver = OccupancyPerceiver(num_classes, grid_size, **perceiver.kwargs())
    if mode == "perception":
        return Networks(built_perceiver, None, None, None)
    if not generator.is_configured:
        raise ValueError(
            f"model.generator is required in {mode} mode (model.generator.pretrained or model.generator.unet)"
        )
    built_generator = SceneGenerator(**generator.kwargs())
    built_text_encoder = TextEncoder(**text_encoder.kwargs())
    if built_text_encoder.width != built_generator.cross_attention_dim:
        raise ValueError(
            f"model.text_encoder width {built_text_encoder.width} != the UNet's cross_attention_dim "
            f"{built_generator.cross_attention_dim}; pick a matching open_clip model or UNet config"
        )
    built_aligner = MambaDualAlignment(
        num_classes, built_generator.residual_spec(), built_generator.latent_channels, **aligner.kwargs()
    )
    return Networks(built_perceiver, built_generator, built_text_encoder, built_aligner)


def build_metrics(num_classes: int, evaluation: EvaluationConfig, generates: bool) -> Metrics:
    """SSC scores of the perceiver and, with a generator, generation and judge scores, for val and test.

    Args:
        num_classes: Occupancy classes.
        evaluation: The evaluation options (Inception weights, KID subset size).
        generates: Whether scenes are generated in validation / test (a generator is built).

    Returns:
        The metrics by stage.
    """
    stages = ("val", "test")
    ssc = nn.ModuleDict({stage: SSCMetric(num_classes) for stage in stages})
    weights, kid_subset = evaluation.inception_weights, evaluation.kid_subset_size
    generation = nn.ModuleDict(
        {
            stage: GenerationMetrics(num_classes, inception_weights=weights, kid_subset_size=kid_subset)
            for stage in stages
        }
        if generates
        else {}
    )
    # The judge's consistency scores (headline ``consistency_*``).
    judge = nn.ModuleDict({stage: SSCMetric(num_classes) for stage in stages} if generates else {})
    return Metrics(ssc, generation, judge)
