"""SemanticKITTI semantic scene completion in MonoScene's monocular setting (``docs/design.md`` §8.1).

On-disk layout read (and, for the demo and native export, written) here::

    <root>/dataset/sequences/<SS>/calib.txt                KITTI odometry calibration (P0..P3, Tr)
    <root>/dataset/sequences/<SS>/image_2/NNNNNN.png       left colour camera
    <root>/dataset/sequences/<SS>/voxels/NNNNNN.bin        packed occupancy of the input scan (enumerates frames)
    <root>/dataset/sequences/<SS>/voxels/NNNNNN.label      uint16 raw label ids, (X, Y, Z) C order (train/val only)
    <root>/dataset/sequences/<SS>/voxels/NNNNNN.invalid    packed mask of never-observed voxels (train/val only)
    <root>/dataset/sequences/<SS>/voxels/NNNNNN.occluded   packed mask of voxels occluded from the scan (unused)
    <preprocess_root>/labels/<SS>/NNNNNN_1_1.npy           optional MonoScene targets (float32 train ids)

``root`` may also point at the ``dataset`` folder itself (``<root>/sequences/<SS>``).

Decoding follows the voxelizer that wrote the files: the flat index of voxel ``[x, y, z]`` is ``x*Y*Z + y*Z + z``
(so a C-order reshape gives ``[x, y, z]``), bit-packed masks hold the first voxel in the most significant bit, raw
ids become train ids through the SSC lookup table (raw 0 -> 0 "empty"; raw ids that ``learning_map`` sends to 0 or
does not list -> 255 "ignore") and invalid voxels become 255. Those formats (label maps, class weights, voxel files,
calibration) are read and written by ``data/semantic_kitti_format.py``, whose public names are re-exported here; this
module holds the Dataset and the DataModule.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from occscene_pl.data.base import IGNORE_INDEX, OccupancyDataModule, OccupancyDataset, RawSample
from occscene_pl.data.semantic_kitti_format import (
    IGNORE_RAW_ID,
    LEARNING_MAP,
    LEARNING_MAP_INV,
    LUT_SIZE,
    SEMANTIC_KITTI_CLASS_FREQUENCIES,
    SEMANTIC_KITTI_CLASSES,
    check_grid,
    class_weights,
    pack_bits,
    read_calib,
    read_packed_mask,
    read_voxel_labels,
    ssc_label_lut,
    train_to_raw,
    unpack_bits,
    write_calib,
    write_voxel_frame,
)
from occscene_pl.data.transforms import crop_view

__all__ = [
    "IGNORE_RAW_ID",
    "LEARNING_MAP",
    "LEARNING_MAP_INV",
    "LUT_SIZE",
    "SEMANTIC_KITTI_CLASSES",
    "SEMANTIC_KITTI_CLASS_FREQUENCIES",
    "SemanticKittiDataModule",
    "SemanticKittiDataset",
    "class_weights",
    "pack_bits",
    "read_calib",
    "read_packed_mask",
    "read_voxel_labels",
    "ssc_label_lut",
    "train_to_raw",
    "unpack_bits",
    "write_calib",
    "write_voxel_frame",
]


class SemanticKittiDataset(OccupancyDataset):
    """SemanticKITTI SSC frames: the cropped left colour image, its camera, and the completed semantic grid.

    Frames are the sorted ``voxels/*.bin`` of every sequence of the split (one every 5th scan). Camera, as MonoScene:
    ``intrinsics = P2[:3, :3]`` and ``voxel_to_camera = Tr``. P2's 4th column (cam2's ~6 cm offset from cam0, which
    ``Tr`` targets) is ignored on purpose: it shifts projections by about ``45 / depth`` pixels, and replicating the
    omission keeps our projections and numbers identical to MonoScene's. Calibrations are read once per sequence at
    construction; a missing ``calib.txt`` fails there (MonoScene behaviour).

    Args:
        root: folder holding ``dataset/sequences`` (or ``sequences``).
        split: ``"train"``, ``"val"`` or ``"test"`` (hidden labels: ``occupancy`` is all 255).
        grid_size: ``(X, Y, Z)`` of the label files; the grid always spans the 51.2 x 51.2 x 6.4 m KITTI extent, so
            the voxel size is ``51.2 / X`` and ``X == Y == 8 * Z`` is required. Defaults to 256 x 256 x 32.
        crop_size: ``(W, H)`` of MonoScene's top-left crop (intrinsics unchanged); images must be at least this big.
        sequences: sequence folders to read instead of the split's (e.g. ``["00"]``).
        preprocess_root: read labels from MonoScene's ``<preprocess_root>/labels/SS/NNNNNN_1_1.npy`` instead of
            ``voxels/*.label`` + ``.invalid``.
        image_size: ``(H, W)`` of the returned images; ``None`` keeps the crop.
        color_jitter: colour jitter strength (of ``perceiver_image`` only; ``image`` stays un-jittered).
        flip_prob: horizontal flip probability.
        captions: optional captions file.
    """

    class_names: ClassVar[tuple[str, ...]] = SEMANTIC_KITTI_CLASSES
    default_grid_size: ClassVar[tuple[int, int, int]] = (256, 256, 32)
    class_weights: ClassVar[tuple[float, ...]] = tuple(float(w) for w in class_weights())
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    scene_description: ClassVar[str] = "a driving scene"
    SPLIT_SEQUENCES: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": ("00", "01", "02", "03", "04", "05", "06", "07", "09", "10"),
        "val": ("08",),
        "test": tuple(f"{s:02d}" for s in range(11, 22)),
    }
    SCENE_EXTENT_M: ClassVar[tuple[float, float, float]] = (51.2, 51.2, 6.4)
    VOXEL_ORIGIN: ClassVar[tuple[float, float, float]] = (0.0, -25.6, -2.0)
    LABELLED_SPLITS: ClassVar[tuple[str, ...]] = ("train", "val")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        grid_size: Sequence[int] | None = None,
        crop_size: Sequence[int] = (1220, 370),
        sequences: Sequence[str] | None = None,
        preprocess_root: str | Path | None = None,
        image_size: Sequence[int] | None = None,
        color_jitter: float = 0.0,
        flip_prob: float = 0.0,
        captions: str | Path | None = None,
    ) -> None:
        """Index the frames of the split's sequences and read each sequence's calibration.

        Raises:
            ValueError: if ``grid_size`` is not ``X == Y == 8 * Z``, ``crop_size`` is not two positive sizes or
                ``sequences`` is empty.
            FileNotFoundError: if the root has no ``sequences`` folder, or a sequence lacks ``calib.txt`` or
                ``voxels``.
        """
        super().__init__(image_size=image_size, color_jitter=color_jitter, flip_prob=flip_prob, captions=captions)
        self.split = self.check_split(split)
        grid = check_grid(grid_size if grid_size is not None else self.default_grid_size)
        if not grid[0] == grid[1] == 8 * grid[2]:
            raise ValueError(
                f"grid_size {grid} does not give isotropic voxels over the {self.SCENE_EXTENT_M} m SemanticKITTI "
                "extent; expected X == Y == 8 * Z, e.g. (256, 256, 32) or (64, 64, 8)"
            )
        self._grid_size = grid
        self.voxel_size = self.SCENE_EXTENT_M[0] / grid[0]
        if len(crop_size) != 2 or min(int(s) for s in crop_size) < 1:
            raise ValueError(f"crop_size must be (W, H) with positive entries, got {tuple(crop_size)!r}")
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.root = Path(root)
        self.sequences_root = self._find_sequences_root(self.root)
        self.preprocess_root = Path(preprocess_root) if preprocess_root is not None else None
        names = self.SPLIT_SEQUENCES[self.split] if sequences is None else sequences
        self.sequences: tuple[str, ...] = tuple(f"{int(s):02d}" if str(s).isdigit() else str(s) for s in names)
        if not self.sequences:
            raise ValueError("sequences must name at least one sequence")
        self.has_labels = self.split in self.LABELLED_SPLITS
        self.calibs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.frames: list[tuple[str, str]] = []
        for sequence in self.sequences:
            calib = read_calib(self.sequences_root / sequence / "calib.txt")
            self.calibs[sequence] = (calib["P2"][:3, :3].copy(), calib["Tr"])
            voxels = self.sequences_root / sequence / "voxels"
            if not voxels.is_dir():
                raise FileNotFoundError(f"SemanticKITTI sequence {sequence}: voxel folder {voxels} does not exist")
            self.frames.extend((sequence, path.stem) for path in sorted(voxels.glob("*.bin")))

    @staticmethod
    def _find_sequences_root(root: Path) -> Path:
        """The ``sequences`` folder under ``root``: ``root/dataset/sequences`` or ``root/sequences``.

        Raises:
            FileNotFoundError: if neither exists.
        """
        for candidate in (root / "dataset" / "sequences", root / "sequences"):
            if candidate.is_dir():
                return candidate
        raise FileNotFoundError(
            f"SemanticKITTI root {root} has neither dataset/sequences nor sequences "
            "(expected <root>/dataset/sequences/<SS>/{calib.txt,image_2,voxels})"
        )

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """``(X, Y, Z)`` of the label files."""
        return self._grid_size

    def __len__(self) -> int:
        """Number of frames over the dataset's sequences."""
        return len(self.frames)

    def frame_id(self, index: int) -> str:
        """Stable id of frame ``index``, ``"<sequence>_<frame>"``, e.g. ``"08_000005"``."""
        sequence, frame = self.frames[index]
        return f"{sequence}_{frame}"

    def load_image(self, index: int) -> Image.Image:
        """Frame ``index``'s ``image_2`` PNG as RGB, uncropped (:meth:`load` takes the top-left ``crop_size`` crop).

        Raises:
            FileNotFoundError: if the PNG does not exist.
            ValueError: if the image is smaller than ``crop_size``.
        """
        sequence, frame = self.frames[index]
        path = self.sequences_root / sequence / "image_2" / f"{frame}.png"
        if not path.is_file():
            raise FileNotFoundError(f"SemanticKITTI image {path} does not exist")
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        width, height = self.crop_size
        if rgb.width < width or rgb.height < height:
            raise ValueError(
                f"SemanticKITTI image {path} is {rgb.width}x{rgb.height}, smaller than the {width}x{height} crop "
                "(crop_size is (W, H))"
            )
        return rgb

    def load_occupancy(self, index: int) -> np.ndarray | None:
        """Train ids ``(X, Y, Z)`` uint8 of frame ``index``, or ``None`` for the test split (hidden labels)."""
        if not self.has_labels:
            return None
        sequence, frame = self.frames[index]
        if self.preprocess_root is not None:
            return self._load_preprocessed(self.preprocess_root / "labels" / sequence / f"{frame}_1_1.npy")
        voxels = self.sequences_root / sequence / "voxels"
        return read_voxel_labels(voxels / f"{frame}.label", voxels / f"{frame}.invalid", self.grid_size)

    def _load_preprocessed(self, path: Path) -> np.ndarray:
        """Read and check one of MonoScene's preprocessed ``NNNNNN_1_1.npy`` targets.

        Args:
            path: the ``.npy`` file (float32 or integer train ids).

        Returns:
            ``(X, Y, Z)`` uint8 train ids.

        Raises:
            FileNotFoundError: if the file does not exist.
            ValueError: if its shape is not the grid's, its dtype is not numeric or it holds a value other than a
                train id or 255.
        """
        if not path.is_file():
            raise FileNotFoundError(f"MonoScene preprocessed label {path} does not exist")
        labels = np.load(path, allow_pickle=False)
        if labels.shape != self.grid_size:
            raise ValueError(f"preprocessed label {path} has shape {labels.shape}, expected {self.grid_size}")
        if labels.dtype.kind not in "fiu":
            raise ValueError(f"preprocessed label {path} has dtype {labels.dtype}, expected float32 or uint8")
        valid = ((labels >= 0) & (labels < len(self.class_names))) | (labels == IGNORE_INDEX)
        if labels.dtype.kind == "f":
            valid &= labels == np.floor(labels)
        if not valid.all():
            raise ValueError(
                f"preprocessed label {path} holds values other than the train ids 0..{len(self.class_names) - 1} "
                f"and {IGNORE_INDEX}, e.g. {labels[~valid].reshape(-1)[:5].tolist()}"
            )
        return labels.astype(np.uint8)

    def load(self, index: int) -> RawSample:
        """Frame ``index`` before the shared transforms: the cropped image, its camera and the labels.

        Args:
            index: frame index.

        Returns:
            One view (``crop_size`` crop with its intrinsics, ``Tr`` as ``voxel_to_camera``), the train ids (``None``
            on the test split), the KITTI voxel origin and size, and the frame id.
        """
        sequence, _ = self.frames[index]
        intrinsics, voxel_to_camera = self.calibs[sequence]
        image, intrinsics = crop_view(self.load_image(index), intrinsics, (0, 0, *self.crop_size))
        return RawSample(
            views=[(image, intrinsics, voxel_to_camera.copy())],
            occupancy=self.load_occupancy(index),
            voxel_origin=np.asarray(self.VOXEL_ORIGIN, dtype=np.float32),
            voxel_size=self.voxel_size,
            frame_id=self.frame_id(index),
        )


class SemanticKittiDataModule(OccupancyDataModule):
    """SemanticKITTI SSC with MonoScene's protocol.

    ``val_split``, ``test_split`` and ``predict_split`` default to ``"val"`` (sequence 08): the test sequences'
    labels are hidden, so ``test`` evaluates on val like MonoScene; test-set scores come from the online benchmark
    (write predictions with :func:`train_to_raw`).

    Args:
        root: folder holding ``dataset/sequences``.
        crop_size: ``(W, H)`` top-left crop of every image.
        preprocess_root: optional MonoScene preprocess folder (``labels/SS/NNNNNN_1_1.npy``).
        **kwargs: :class:`~occscene_pl.data.base.OccupancyDataModule` arguments (``batch_size``, ``image_size``,
            ``grid_size``, splits, ...).
    """

    dataset_class = SemanticKittiDataset

    def __init__(
        self,
        root: str = "data/semantic_kitti",
        crop_size: Sequence[int] = (1220, 370),
        preprocess_root: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Store the reader options after the shared DataModule's.

        Raises:
            ValueError: if ``val_split`` or ``test_split`` is the unlabelled ``"test"``.
        """
        super().__init__(**kwargs)
        for name in ("val_split", "test_split"):
            if getattr(self, name) not in SemanticKittiDataset.LABELLED_SPLITS:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} has no labels (SemanticKITTI test labels are hidden); "
                    f"use one of {list(SemanticKittiDataset.LABELLED_SPLITS)}"
                )
        self.root = root
        self.crop_size = tuple(int(s) for s in crop_size)
        self.preprocess_root = preprocess_root

    def build_dataset(self, split: str, augment: bool) -> SemanticKittiDataset:
        """A :class:`SemanticKittiDataset` of ``split`` with the module's reader options.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            augment: whether to apply the training augmentations (colour jitter, flips).

        Returns:
            The dataset.
        """
        return SemanticKittiDataset(
            self.root,
            split,
            grid_size=self.grid_size,
            crop_size=self.crop_size,
            preprocess_root=self.preprocess_root,
            **self.augmentation(augment),
        )
