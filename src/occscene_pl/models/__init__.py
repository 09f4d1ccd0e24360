"""Network components of OccScene (plain ``nn.Module``s; only ``occscene_pl.module`` knows Lightning)."""

from __future__ import annotations

from occscene_pl.models.generator import ResidualSpec, SceneGenerator
from occscene_pl.models.text_encoder import TextEncoder, register_tiny_config

__all__ = ["ResidualSpec", "SceneGenerator", "TextEncoder", "register_tiny_config"]
