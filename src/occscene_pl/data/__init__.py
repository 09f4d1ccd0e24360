"""Datasets and DataModules: every reader yields the sample schema documented in :mod:`occscene_pl.data.base`."""

from occscene_pl.data.base import OccupancyDataModule, OccupancyDataset, RawSample, collate_samples
from occscene_pl.data.prompts import PromptDataset, describe_scene
from occscene_pl.data.transforms import ImageTransform

__all__ = [
    "ImageTransform",
    "OccupancyDataModule",
    "OccupancyDataset",
    "PromptDataset",
    "RawSample",
    "collate_samples",
    "describe_scene",
]
