"""The sample schema shared by every dataset, the dataset base class and the DataModule base class.

Every dataset yields the same dictionary (``docs/design.md`` §4):

================== ======================== =========================================================================
key                shape / type             meaning
================== ======================== =========================================================================
``image``          ``(V, 3, H, W)`` float32 V camera views in ``[0, 1]`` (1 for KITTI/NYUv2, 6 for nuScenes)
``occupancy``      ``(X, Y, Z)`` uint8      train ids, 0 = empty, 255 = ignore (all 255 for splits without labels)
``intrinsics``     ``(V, 3, 3)`` float32    pinhole matrices at the returned image size
``voxel_to_camera````(V, 4, 4)`` float32    maps voxel-frame metric points into each camera
``voxel_origin``   ``(3,)`` float32         corner of voxel ``[0, 0, 0]`` in the voxel frame, metres
``voxel_size``     ``()`` float32           voxel edge length, metres
``prompt``         ``str``                  from a captions file if given, else templated from the scene's classes
``frame_id``       ``str``                  stable id used to name outputs (no path separators)
================== ======================== =========================================================================

``image`` carries geometric augmentation only (flips, mirrored in the cameras): it is the generator's diffusion target.
When colour jitter is on (training, ``color_jitter > 0``) a sample also has the optional key

===================== ======================== ======================================================================
``perceiver_image``   ``(V, 3, H, W)`` float32 ``image`` with one colour-jitter draw shared by all V views: the
                                               perceiver's real-image input (models fall back to ``image`` without it)
===================== ======================== ======================================================================
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data._utils.collate import default_collate

from occscene_pl.data.prompts import PromptDataset, describe_scene, load_captions
from occscene_pl.data.transforms import CameraImage, ImageTransform

__all__ = [
    "OPTIONAL_SAMPLE_KEYS",
    "OccupancyDataModule",
    "OccupancyDataset",
    "RawSample",
    "SAMPLE_KEYS",
    "collate_samples",
    "select_rows",
]

SAMPLE_KEYS = (
    "image",
    "occupancy",
    "intrinsics",
    "voxel_to_camera",
    "voxel_origin",
    "voxel_size",
    "prompt",
    "frame_id",
)
"""Keys every sample has."""
OPTIONAL_SAMPLE_KEYS = ("perceiver_image",)
"""Keys a sample may add: ``perceiver_image`` when colour jitter is on."""
IGNORE_INDEX = 255


@dataclass
class RawSample:
    """What a reader decodes from disk for one sample, before image transforms.

    Attributes:
        views: ``V`` tuples ``(image, intrinsics (3, 3), voxel_to_camera (4, 4))`` at the image's own size.
        occupancy: ``(X, Y, Z)`` uint8 train ids, or ``None`` when the split has no labels.
        voxel_origin: ``(3,)`` metres.
        voxel_size: metres.
        frame_id: stable id, no path separators.
    """

    views: list[CameraImage]
    occupancy: np.ndarray | None
    voxel_origin: np.ndarray
    voxel_size: float
    frame_id: str


class OccupancyDataset(Dataset[dict[str, Any]], abc.ABC):
    """Base class of the dataset readers: shared transforms, prompts and schema checks.

    Subclasses set the class constants and implement :meth:`__len__` and :meth:`load`.

    Args:
        image_size: ``(H, W)`` of the returned images; ``None`` keeps the dataset's native (cropped) size.
        color_jitter: colour jitter strength (training augmentation; 0 disables it). It is applied to the extra
            ``perceiver_image`` only, one draw per sample shared by its views; ``image`` stays un-jittered.
        flip_prob: probability of a horizontal flip of image and projection (training augmentation).
        captions: optional captions file (JSON ``{frame_id: caption}``); it must cover every frame it is used for.
    """

    class_names: ClassVar[tuple[str, ...]]
    default_grid_size: ClassVar[tuple[int, int, int]]
    splits: ClassVar[tuple[str, ...]]
    scene_description: ClassVar[str]
    """Leading noun phrase of templated prompts, e.g. ``"a driving scene"``."""
    class_weights: ClassVar[tuple[float, ...]]
    """Cross-entropy class weights of the reference implementation (MonoScene / OpenOccupancy), by train id."""

    def __init__(
        self,
        image_size: Sequence[int] | None = None,
        color_jitter: float = 0.0,
        flip_prob: float = 0.0,
        captions: str | Path | None = None,
    ) -> None:
        """Set up the shared image transform and, when given, read the captions file."""
        self.transform = ImageTransform(image_size, color_jitter, flip_prob)
        self.captions_path = Path(captions) if captions is not None else None
        self.captions = load_captions(captions) if captions is not None else None

    @classmethod
    def check_split(cls, split: str) -> str:
        """Return ``split`` if the dataset knows it, else raise a ``ValueError`` naming the valid ones."""
        if split not in cls.splits:
            raise ValueError(f"unknown split {split!r} for {cls.__name__}; expected one of {list(cls.splits)}")
        return split

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of samples (frames) of the split."""

    @abc.abstractmethod
    def load(self, index: int) -> RawSample:
        """Decode sample ``index`` from disk (no augmentation)."""

    def prompt_for(self, frame_id: str, occupancy: np.ndarray | None) -> str:
        """The prompt of a frame: its caption if a captions file is set, else a templated description."""
        if self.captions is not None:
            if frame_id not in self.captions:
                raise KeyError(f"captions file {self.captions_path} has no caption for frame {frame_id!r}")
            return self.captions[frame_id]
        if occupancy is None:
            return self.scene_description
        return describe_scene(occupancy, self.class_names, self.scene_description)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Sample ``index`` in the common schema (:data:`SAMPLE_KEYS`, plus ``perceiver_image`` when jittered).

        Loads the raw frame (:meth:`load`), applies the image transform to every view and its camera, fills a
        missing occupancy with the ignore label and attaches the prompt (:meth:`prompt_for`).

        Args:
            index: sample index in ``[0, len(self))``.

        Returns:
            The sample dictionary.

        Raises:
            IndexError: if ``index`` is out of range.
            ValueError: if the loaded occupancy does not have the dataset's ``grid_size``.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        raw = self.load(index)
        image, intrinsics, voxel_to_camera, perceiver_image = self.transform(raw.views)
        if raw.occupancy is None:
            occupancy = torch.full(self.grid_size, IGNORE_INDEX, dtype=torch.uint8)
        else:
            occupancy = torch.from_numpy(np.ascontiguousarray(raw.occupancy, dtype=np.uint8))
        if tuple(occupancy.shape) != tuple(self.grid_size):
            raise ValueError(
                f"{type(self).__name__}: frame {raw.frame_id} has occupancy of shape {tuple(occupancy.shape)}, "
                f"expected grid_size {tuple(self.grid_size)}"
            )
        sample: dict[str, Any] = {
            "image": image,
            "occupancy": occupancy,
            "intrinsics": intrinsics,
            "voxel_to_camera": voxel_to_camera,
            "voxel_origin": torch.as_tensor(raw.voxel_origin, dtype=torch.float32),
            "voxel_size": torch.tensor(raw.voxel_size, dtype=torch.float32),
            "prompt": self.prompt_for(raw.frame_id, raw.occupancy),
            "frame_id": raw.frame_id,
        }
        if perceiver_image is not None:
            sample["perceiver_image"] = perceiver_image
        return sample

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """``(X, Y, Z)`` of the occupancy this dataset returns; subclasses taking a ``grid_size`` override it."""
        return self.default_grid_size


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples of the schema: tensors are stacked, strings become lists, numbers become tensors."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    keys = samples[0].keys()
    for sample in samples[1:]:
        if sample.keys() != keys:
            raise ValueError(f"samples disagree on keys: {sorted(keys)} vs {sorted(sample.keys())}")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [sample[key] for sample in samples]
        batch[key] = list(values) if isinstance(values[0], str) else default_collate(values)
    return batch


def select_rows(batch: Mapping[str, Any], rows: Sequence[int]) -> dict[str, Any]:
    """Rows ``rows`` of a collated batch.

    Every tensor with a batch dimension and every list is indexed; other values (0-d tensors, scalars) are kept.

    Args:
        batch: a batch from :func:`collate_samples`.
        rows: indices to keep, in order; may be empty (tensors and lists of length 0).

    Returns:
        A new batch dictionary with the same keys.
    """
    index = [int(r) for r in rows]
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.ndim > 0:
            out[key] = value[torch.as_tensor(index, dtype=torch.long, device=value.device)]
        elif isinstance(value, list):
            out[key] = [value[i] for i in index]
        else:
            out[key] = value
    return out


class OccupancyDataModule(pl.LightningDataModule):
    """Base DataModule: loaders, collate, splits per stage and the ``predict`` prompt loader.

    Subclasses expose ``num_classes``, ``class_names`` and ``grid_size`` (linked into the model by the CLI) and
    implement :meth:`build_dataset`.

    Args:
        batch_size: samples per batch, per device.
        num_workers: data-loading worker processes.
        pin_memory: pin host memory for faster transfer to GPUs.
        image_size: ``(H, W)`` of the images fed to the model; ``None`` keeps the native size.
        color_jitter: training colour jitter strength, applied to the perceiver's ``perceiver_image`` only (one draw
            per sample); the generator's ``image`` is never jittered.
        flip_prob: training horizontal-flip probability.
        captions: optional captions file for training/evaluation prompts.
        train_split: split used by ``fit``.
        val_split: split used by ``fit``'s validation and by ``validate``.
        test_split: split used by ``test`` (it must have labels).
        prompts: text file with one prompt per line for ``predict``; ``None`` predicts over ``predict_split``
            (layout-controlled generation from the dataset's occupancy).
        predict_split: split whose first sample supplies the camera rig for text-only ``predict``, and whose samples
            are used when ``prompts`` is ``None``.
        predict_seed: base seed of text-only generation (sample ``i`` uses ``predict_seed + i``).
        samples_per_prompt: samples drawn per prompt in ``predict``.
        grid_size: ``(X, Y, Z)`` of the occupancy; ``None`` uses the dataset's default.
        predict_limit: predict only the first this many samples (prompts x samples or dataset samples); None = all.
    """

    dataset_class: ClassVar[type[OccupancyDataset]]

    def __init__(
        self,
        batch_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        image_size: Sequence[int] | None = None,
        color_jitter: float = 0.4,
        flip_prob: float = 0.5,
        captions: str | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "val",
        prompts: str | None = None,
        predict_split: str = "val",
        predict_seed: int = 0,
        samples_per_prompt: int = 1,
        grid_size: Sequence[int] | None = None,
        predict_limit: int | None = None,
    ) -> None:
        """Check and store the loader, split and predict options.

        Raises:
            ValueError: if ``batch_size < 1``, ``num_workers < 0``, a split is not one of the dataset's,
                ``predict_limit < 1`` or ``grid_size`` is not three positive integers.
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        for name, split in [("train_split", train_split), ("val_split", val_split), ("test_split", test_split)]:
            if split not in self.dataset_class.splits:
                raise ValueError(f"{name}={split!r} is not a split of {self.dataset_class.__name__}")
        self.dataset_class.check_split(predict_split)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.image_size = tuple(image_size) if image_size is not None else None
        self.color_jitter = color_jitter
        self.flip_prob = flip_prob
        self.captions = captions
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.prompts = prompts
        self.predict_split = predict_split
        self.predict_seed = predict_seed
        self.samples_per_prompt = samples_per_prompt
        if predict_limit is not None and predict_limit < 1:
            raise ValueError(f"predict_limit must be >= 1 or null, got {predict_limit}")
        self.predict_limit = predict_limit
        self.class_names: list[str] = list(self.dataset_class.class_names)
        self.num_classes: int = len(self.class_names)
        self.class_weights: list[float] = [float(w) for w in self.dataset_class.class_weights]
        if grid_size is not None and (len(grid_size) != 3 or min(grid_size) < 1):
            raise ValueError(f"grid_size must be three positive integers (X, Y, Z), got {grid_size!r}")
        self.grid_size: tuple[int, int, int] = tuple(grid_size or self.dataset_class.default_grid_size)  # type: ignore[assignment]
        self.datasets: dict[str, Dataset[dict[str, Any]]] = {}

    @abc.abstractmethod
    def build_dataset(self, split: str, augment: bool) -> OccupancyDataset:
        """Construct the reader of ``split``; ``augment`` turns on colour jitter and flips."""

    def augmentation(self, augment: bool) -> dict[str, Any]:
        """Transform and prompt arguments for a dataset constructor."""
        return {
            "image_size": self.image_size,
            "color_jitter": self.color_jitter if augment else 0.0,
            "flip_prob": self.flip_prob if augment else 0.0,
            "captions": self.captions,
        }

    def setup(self, stage: str) -> None:
        """Build the datasets the stage needs (``fit``, ``validate``, ``test`` or ``predict``)."""
        if stage == "fit":
            self.datasets["train"] = self.build_dataset(self.train_split, augment=True)
            self.datasets["val"] = self.build_dataset(self.val_split, augment=False)
        elif stage == "validate":
            self.datasets["val"] = self.build_dataset(self.val_split, augment=False)
        elif stage == "test":
            self.datasets["test"] = self.build_dataset(self.test_split, augment=False)
        elif stage == "predict":
            self.datasets["predict"] = self.predict_dataset()
        else:
            raise ValueError(f"unknown stage {stage!r}")

    def predict_dataset(self) -> Dataset[dict[str, Any]]:
        """The dataset ``predict`` iterates over.

        Returns:
            A :class:`~occscene_pl.data.prompts.PromptDataset` of the prompts with the camera rig of the first
            ``predict_split`` sample, or that split itself when there are no prompts; only its first
            ``predict_limit`` samples when a limit is set.
        """
        dataset = self._predict_dataset()
        if self.predict_limit is not None and self.predict_limit < len(dataset):  # type: ignore[arg-type]
            return Subset(dataset, range(self.predict_limit))
        return dataset

    def _predict_dataset(self) -> Dataset[dict[str, Any]]:
        reference = self.build_dataset(self.predict_split, augment=False)
        if self.prompts is None:
            return reference
        if len(reference) == 0:
            raise ValueError(f"split {self.predict_split!r} is empty: no camera rig to generate through")
        sample = reference[0]
        camera = {key: sample[key] for key in ("intrinsics", "voxel_to_camera", "voxel_origin", "voxel_size")}
        camera["image_size"] = tuple(sample["image"].shape[-2:])
        return PromptDataset(self.prompts, camera, self.predict_seed, self.samples_per_prompt)

    def _loader(self, name: str, shuffle: bool) -> DataLoader[dict[str, Any]]:
        if name not in self.datasets:
            raise RuntimeError(f"{type(self).__name__}.setup() has not built the {name!r} dataset")
        return DataLoader(
            self.datasets[name],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate_samples,
            drop_last=False,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Loader of the training dataset from :meth:`setup`, shuffled, collated by :func:`collate_samples`."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Loader of the validation dataset from :meth:`setup`, in order, collated by :func:`collate_samples`."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Loader of the test dataset from :meth:`setup`, in order, collated by :func:`collate_samples`."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Loader of the predict dataset from :meth:`setup`, in order, collated by :func:`collate_samples`."""
        return self._loader("predict", shuffle=False)
