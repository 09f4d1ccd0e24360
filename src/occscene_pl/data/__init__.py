"""Datasets and DataModules: every reader yields the sample schema documented in :mod:`occscene_pl.data.base`."""

from occscene_pl.data.base import OccupancyDataModule, OccupancyDataset, RawSample, collate_samples
from occscene_pl.data.demo import DemoDataModule, generate_demo_dataset
from occscene_pl.data.nuscenes_occupancy import NuScenesOccupancyDataModule, NuScenesOccupancyDataset
from occscene_pl.data.nyuv2 import NYUv2DataModule, NYUv2Dataset
from occscene_pl.data.prompts import PromptDataset, describe_scene
from occscene_pl.data.semantic_kitti import SemanticKittiDataModule, SemanticKittiDataset
from occscene_pl.data.transforms import ImageTransform

__all__ = [
    "DemoDataModule",
    "ImageTransform",
    "NYUv2DataModule",
    "NYUv2Dataset",
    "NuScenesOccupancyDataModule",
    "NuScenesOccupancyDataset",
    "OccupancyDataModule",
    "OccupancyDataset",
    "PromptDataset",
    "RawSample",
    "SemanticKittiDataModule",
    "SemanticKittiDataset",
    "collate_samples",
    "describe_scene",
    "generate_demo_dataset",
]
