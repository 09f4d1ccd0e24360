"""The demo's DataModule: the dataset is generated on first use and read by the SemanticKITTI reader."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from occscene_pl.data.demo.streets import check_grid_size
from occscene_pl.data.demo.writer import generate_demo_dataset
from occscene_pl.data.semantic_kitti import SemanticKittiDataModule, SemanticKittiDataset

__all__ = ["DemoDataModule"]


class DemoDataModule(SemanticKittiDataModule):
    """The embedded demo: procedural street scenes generated on first use, read by the SemanticKITTI reader.

    Args:
        root: where the dataset is generated (``root/dataset/sequences/{00,08}`` and ``root/manifest.json``).
        num_train: training frames (sequence 00).
        num_val: validation frames (sequence 08), also used by ``test`` and ``predict``.
        seed: generation seed.
        grid_size: ``(X, Y, Z)`` of the voxel grid over the KITTI extent, ``X == Y == 8 * Z``.
        render_size: ``(H, W)`` the images are rendered at; the model's input size is ``image_size``.
        **kwargs: :class:`~occscene_pl.data.base.OccupancyDataModule` arguments (``batch_size``, ``image_size``, ...).
    """

    def __init__(
        self,
        root: str = "data/demo",
        num_train: int = 320,
        num_val: int = 64,
        seed: int = 0,
        grid_size: Sequence[int] = (64, 64, 8),
        render_size: Sequence[int] = (128, 384),
        **kwargs: Any,
    ) -> None:
        if len(render_size) != 2 or min(int(s) for s in render_size) < 1:
            raise ValueError(f"render_size must be (H, W) with positive entries, got {tuple(render_size)!r}")
        super().__init__(
            root=root,
            crop_size=(int(render_size[1]), int(render_size[0])),
            grid_size=check_grid_size(grid_size),
            **kwargs,
        )
        self.num_train = num_train
        self.num_val = num_val
        self.seed = seed
        self.render_size = (int(render_size[0]), int(render_size[1]))

    def prepare_data(self) -> None:
        """Generate the dataset when ``root`` has no manifest or one that does not match these arguments."""
        generate_demo_dataset(self.root, self.num_train, self.num_val, self.grid_size, self.render_size, self.seed)

    def build_dataset(self, split: str, augment: bool) -> SemanticKittiDataset:
        """The reader of ``split`` (``train``: sequence 00, any other: sequence 08); ``augment`` as in the base."""
        # The demo's "test" split is its labelled val sequence, so `occscene-pl test` works on it.
        reader_split, sequence = ("train", "00") if split == "train" else ("val", "08")
        SemanticKittiDataset.check_split(split)
        return SemanticKittiDataset(
            self.root,
            reader_split,
            grid_size=self.grid_size,
            crop_size=self.crop_size,
            sequences=(sequence,),
            **self.augmentation(augment),
        )
