"""Network components of OccScene (plain ``nn.Module``s; only ``occscene_pl.module`` knows Lightning)."""

from __future__ import annotations

from occscene_pl.models.alignment import CameraEncoder, MambaDualAlignment
from occscene_pl.models.deform_conv import DeformConv3d
from occscene_pl.models.generator import ResidualSpec, SceneGenerator
from occscene_pl.models.mamba import BiMambaBlock, MambaMixer
from occscene_pl.models.perceiver import OccupancyPerceiver
from occscene_pl.models.text_encoder import TextEncoder, register_tiny_config

__all__ = [
    "BiMambaBlock",
    "CameraEncoder",
    "DeformConv3d",
    "MambaDualAlignment",
    "MambaMixer",
    "OccupancyPerceiver",
    "ResidualSpec",
    "SceneGenerator",
    "TextEncoder",
    "register_tiny_config",
]
