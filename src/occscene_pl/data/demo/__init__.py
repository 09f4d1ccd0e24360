"""The embedded demo dataset: procedural street scenes in the real SemanticKITTI layout (``docs/design.md`` §8.5).

Every frame is a semantic voxel grid over the SemanticKITTI extent (x forward 0..51.2 m, y left -25.6..25.6 m, z up
-2..4.4 m, in the LiDAR frame) built from a random street layout (:mod:`~occscene_pl.data.demo.streets`). Its image
is rendered from the grid through KITTI's sequence-00 rig and a simulated HDL-64E scan fills the voxel masks
(:mod:`~occscene_pl.data.demo.rendering`), so image and occupancy agree by construction. Frames are written as
``dataset/sequences/00`` (train) and ``08`` (val), seeded per frame and atomically
(:mod:`~occscene_pl.data.demo.writer`), and read back by
:class:`~occscene_pl.data.semantic_kitti.SemanticKittiDataset` through
:class:`~occscene_pl.data.demo.datamodule.DemoDataModule`, so the demo exercises the real reading path.
"""

from occscene_pl.data.demo.datamodule import DemoDataModule
from occscene_pl.data.demo.rendering import DEMO_COLORS, demo_calibration, render_demo_image
from occscene_pl.data.demo.streets import generate_street_scene
from occscene_pl.data.demo.writer import frame_rng, generate_demo_dataset, read_manifest

__all__ = [
    "DEMO_COLORS",
    "DemoDataModule",
    "demo_calibration",
    "frame_rng",
    "generate_demo_dataset",
    "generate_street_scene",
    "read_manifest",
    "render_demo_image",
]
