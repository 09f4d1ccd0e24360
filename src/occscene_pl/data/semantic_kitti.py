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
does not list -> 255 "ignore") and invalid voxels become 255.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from occscene_pl.data.base import IGNORE_INDEX, OccupancyDataModule, OccupancyDataset, RawSample
from occscene_pl.data.transforms import crop_view
from occscene_pl.files import atomic_write

__all__ = [
    "LEARNING_MAP",
    "LEARNING_MAP_INV",
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

SEMANTIC_KITTI_CLASSES: tuple[str, ...] = (
    "empty",
    "car",
    "bicycle",
    "motorcycle",
    "truck",
    "other-vehicle",
    "person",
    "bicyclist",
    "motorcyclist",
    "road",
    "parking",
    "sidewalk",
    "other-ground",
    "building",
    "fence",
    "vegetation",
    "trunk",
    "terrain",
    "pole",
    "traffic-sign",
)

# Voxel counts per train id over the training set, as in MonoScene's `semantic_kitti/params.py`.
SEMANTIC_KITTI_CLASS_FREQUENCIES: np.ndarray = np.array(
    [
        5.41773033e09,
        1.57835390e07,
        1.25136000e05,
        1.18809000e05,
        6.46799000e05,
        8.21951000e05,
        2.62978000e05,
        2.83696000e05,
        2.04750000e05,
        6.16887030e07,
        4.50296100e06,
        4.48836500e07,
        2.26992300e06,
        5.68402180e07,
        1.57196520e07,
        1.58442623e08,
        2.06162300e06,
        3.69705220e07,
        1.15198800e06,
        3.34146000e05,
    ],
    dtype=np.float64,
)
SEMANTIC_KITTI_CLASS_FREQUENCIES.setflags(write=False)

# `learning_map` of semantic-kitti-api's config/semantic-kitti.yaml (raw id -> train id, 0 = "unlabeled").
LEARNING_MAP: dict[int, int] = {
    0: 0,  # unlabeled
    1: 0,  # outlier
    10: 1,  # car
    11: 2,  # bicycle
    13: 5,  # bus -> other-vehicle
    15: 3,  # motorcycle
    16: 5,  # on-rails -> other-vehicle
    18: 4,  # truck
    20: 5,  # other-vehicle
    30: 6,  # person
    31: 7,  # bicyclist
    32: 8,  # motorcyclist
    40: 9,  # road
    44: 10,  # parking
    48: 11,  # sidewalk
    49: 12,  # other-ground
    50: 13,  # building
    51: 14,  # fence
    52: 0,  # other-structure
    60: 9,  # lane-marking -> road
    70: 15,  # vegetation
    71: 16,  # trunk
    72: 17,  # terrain
    80: 18,  # pole
    81: 19,  # traffic-sign
    99: 0,  # other-object
    252: 1,  # moving-car -> car
    253: 7,  # moving-bicyclist -> bicyclist
    254: 6,  # moving-person -> person
    255: 8,  # moving-motorcyclist -> motorcyclist (a real class, not "ignore")
    256: 5,  # moving-on-rails -> other-vehicle
    257: 5,  # moving-bus -> other-vehicle
    258: 4,  # moving-truck -> truck
    259: 5,  # moving-other-vehicle -> other-vehicle
}

# `learning_map_inv`: train id -> the raw id written in benchmark submissions.
LEARNING_MAP_INV: dict[int, int] = {
    0: 0,
    1: 10,
    2: 11,
    3: 15,
    4: 18,
    5: 20,
    6: 30,
    7: 31,
    8: 32,
    9: 40,
    10: 44,
    11: 48,
    12: 49,
    13: 50,
    14: 51,
    15: 70,
    16: 71,
    17: 72,
    18: 80,
    19: 81,
}

# Raw id written for the ignore label: "outlier" maps back to 255 through the SSC LUT.
IGNORE_RAW_ID = 1
# semantic-kitti-api sizes its LUT as max(raw id) + 100.
LUT_SIZE = max(LEARNING_MAP) + 100


def class_weights() -> np.ndarray:
    """MonoScene's cross-entropy class weights ``1 / ln(f + 0.001)`` from the class frequencies.

    Returns:
        ``(20,)`` float64, e.g. 0.044617 for ``empty`` and 0.078620 for ``traffic-sign``.
    """
    return 1.0 / np.log(SEMANTIC_KITTI_CLASS_FREQUENCIES + 0.001)


def ssc_label_lut() -> np.ndarray:
    """The SSC lookup table raw id -> train id of the official evaluator and MonoScene.

    Raw 0 (no points, i.e. empty space) stays 0; every other raw id that ``learning_map`` sends to 0 (outlier,
    other-structure, other-object) or does not list becomes 255 (ignore).

    Returns:
        ``(359,)`` uint8.
    """
    lut = np.full(LUT_SIZE, IGNORE_INDEX, dtype=np.uint8)
    for raw, train in LEARNING_MAP.items():
        lut[raw] = train if train != 0 else IGNORE_INDEX
    lut[0] = 0
    return lut


@functools.lru_cache(maxsize=1)
def _full_uint16_lut() -> np.ndarray:
    # Covers every uint16 value, so decoding a .label file never indexes out of range; ids >= 359 are unknown -> 255.
    lut = np.full(1 << 16, IGNORE_INDEX, dtype=np.uint8)
    lut[:LUT_SIZE] = ssc_label_lut()
    lut.setflags(write=False)
    return lut


@functools.lru_cache(maxsize=1)
def _train_to_raw_lut() -> np.ndarray:
    # Entries left at 0xFFFF mark train ids that do not exist.
    lut = np.full(256, 0xFFFF, dtype=np.uint16)
    for train, raw in LEARNING_MAP_INV.items():
        lut[train] = raw
    lut[IGNORE_INDEX] = IGNORE_RAW_ID
    lut.setflags(write=False)
    return lut


def train_to_raw(train_ids: np.ndarray) -> np.ndarray:
    """Map train ids to raw SemanticKITTI ids through ``learning_map_inv`` (benchmark submissions, native export).

    The ignore label 255 has no raw counterpart; it is written as raw id 1 ("outlier"), which the SSC LUT sends back
    to 255, so ``ssc_label_lut()[train_to_raw(y)] == y`` for every valid ``y``. Writing it as raw 0 would turn ignored
    voxels into "empty" ones.

    Args:
        train_ids: integer array of any shape with values in ``0..19`` or 255.

    Returns:
        uint16 array of the same shape.
    """
    ids = np.asarray(train_ids)
    if ids.dtype.kind not in "iub":
        raise ValueError(f"train_to_raw expects integer train ids, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids > 255)
    if not bad.any():
        bad = _train_to_raw_lut()[ids.astype(np.int64)] == 0xFFFF
    if bad.any():
        raise ValueError(
            f"train_to_raw: invalid train ids {np.unique(ids[bad])[:10].tolist()}; "
            f"expected 0..{len(SEMANTIC_KITTI_CLASSES) - 1} or {IGNORE_INDEX}"
        )
    return _train_to_raw_lut()[ids.astype(np.int64)]


# ---------------------------------------------------------------------------------------------------------------
# Voxel files
# ---------------------------------------------------------------------------------------------------------------


def unpack_bits(data: np.ndarray) -> np.ndarray:
    """Unpack a SemanticKITTI bit-packed mask, most significant bit first (the voxelizer's ``pack()`` order).

    Args:
        data: ``(N,)`` uint8.

    Returns:
        ``(8 * N,)`` uint8 of 0/1; element ``8 * b + i`` is bit ``7 - i`` of byte ``b``.
    """
    data = np.asarray(data)
    if data.dtype != np.uint8:
        raise ValueError(f"unpack_bits expects uint8 bytes, got dtype {data.dtype}")
    return np.unpackbits(data.reshape(-1), bitorder="big")


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack booleans eight to a byte, first one in the most significant bit; the inverse of :func:`unpack_bits`.

    Args:
        bits: array of any shape of 0/1 or bool, flattened in C order; a length not divisible by 8 is zero-padded.

    Returns:
        ``(ceil(N / 8),)`` uint8.
    """
    return np.packbits(np.asarray(bits).reshape(-1) != 0, bitorder="big")


def _check_grid(grid_size: Sequence[int]) -> tuple[int, int, int]:
    if len(grid_size) != 3 or any(int(n) < 1 for n in grid_size):
        raise ValueError(f"grid_size must be three positive integers (X, Y, Z), got {tuple(grid_size)!r}")
    return int(grid_size[0]), int(grid_size[1]), int(grid_size[2])


def _check_file_size(path: Path, expected: int, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    actual = path.stat().st_size
    if actual != expected:
        raise ValueError(f"{what} file {path} has {actual} bytes, expected exactly {expected} bytes")


def _read_packed_bits(path: str | Path, grid: tuple[int, int, int]) -> np.ndarray:
    count = int(np.prod(grid))
    path = Path(path)
    _check_file_size(path, (count + 7) // 8, f"packed voxel mask (grid {grid})")
    return unpack_bits(np.fromfile(path, dtype=np.uint8))[:count].reshape(grid)


def read_packed_mask(path: str | Path, grid_size: Sequence[int]) -> np.ndarray:
    """Read a bit-packed voxel mask (``.bin``, ``.invalid`` or ``.occluded``).

    Args:
        path: the file; it must hold exactly ``ceil(X * Y * Z / 8)`` bytes.
        grid_size: ``(X, Y, Z)``.

    Returns:
        ``(X, Y, Z)`` bool.
    """
    return _read_packed_bits(path, _check_grid(grid_size)).view(bool)


def read_voxel_labels(
    label_path: str | Path,
    invalid_path: str | Path | None,
    grid_size: Sequence[int],
) -> np.ndarray:
    """Read a completed voxel grid as train ids, with invalid voxels set to 255.

    Args:
        label_path: ``NNNNNN.label``, exactly ``X * Y * Z`` little-endian uint16 raw label ids.
        invalid_path: ``NNNNNN.invalid`` (bit-packed); ``None`` skips the invalid mask.
        grid_size: ``(X, Y, Z)``.

    Returns:
        ``(X, Y, Z)`` uint8 train ids (0 = empty, 255 = ignore).
    """
    grid = _check_grid(grid_size)
    label_path = Path(label_path)
    _check_file_size(label_path, 2 * int(np.prod(grid)), f"voxel label (uint16, grid {grid})")
    raw = np.fromfile(label_path, dtype="<u2").reshape(grid)
    labels = np.take(_full_uint16_lut(), raw)
    if invalid_path is not None:
        # 255 | label == 255 for every uint8 label: OR-ing 0/255 sets invalid voxels to ignore ~30x faster than a
        # boolean-mask assignment on the 2M-voxel grid.
        np.bitwise_or(labels, _read_packed_bits(invalid_path, grid) * np.uint8(IGNORE_INDEX), out=labels)
    return labels


def _frame_name(frame: int | str) -> str:
    text = str(frame)
    if not text.isdigit():
        raise ValueError(f"frame must be a non-negative integer or a string of digits, got {frame!r}")
    return f"{int(text):06d}"


def write_voxel_frame(
    voxels_dir: str | Path,
    frame: int | str,
    raw_labels: np.ndarray,
    invalid: np.ndarray | None = None,
    occluded: np.ndarray | None = None,
    scan: np.ndarray | None = None,
) -> None:
    """Write one frame's voxel files exactly as the SemanticKITTI voxelizer does.

    Writes ``NNNNNN.label`` (little-endian uint16 raw ids, ``[x, y, z]`` C order), then ``.invalid`` and
    ``.occluded`` (bit-packed, all zero when not given), and ``.bin`` last (bit-packed, ``raw_labels != 0`` when not
    given) because the ``.bin`` files enumerate frames. Every file is written atomically.

    Args:
        voxels_dir: the sequence's ``voxels`` folder (created if missing).
        frame: frame number, e.g. ``5`` or ``"000005"``.
        raw_labels: ``(X, Y, Z)`` raw SemanticKITTI ids (0..65535); see :func:`train_to_raw` for train ids.
        invalid: ``(X, Y, Z)`` bool, voxels never observed.
        occluded: ``(X, Y, Z)`` bool, voxels occluded from the current scan.
        scan: ``(X, Y, Z)`` bool, occupancy of the single input scan.
    """
    raw = np.asarray(raw_labels)
    if raw.ndim != 3:
        raise ValueError(f"raw_labels must be a (X, Y, Z) array, got shape {raw.shape}")
    if raw.dtype.kind not in "iu" or (raw.size > 0 and (raw.min() < 0 or raw.max() > 0xFFFF)):
        raise ValueError(f"raw_labels must hold integer raw ids in 0..65535, got dtype {raw.dtype}")
    masks = {"invalid": invalid, "occluded": occluded, "bin": raw != 0 if scan is None else scan}
    for name, mask in masks.items():
        if mask is not None and np.shape(mask) != raw.shape:
            raise ValueError(f"{name} mask has shape {np.shape(mask)}, expected raw_labels' shape {raw.shape}")
    directory = Path(voxels_dir)
    directory.mkdir(parents=True, exist_ok=True)
    stem = _frame_name(frame)
    atomic_write(directory / f"{stem}.label", np.ascontiguousarray(raw, dtype="<u2").tobytes())
    for name in ("invalid", "occluded", "bin"):
        mask = masks[name]
        bits = np.zeros(raw.shape, dtype=bool) if mask is None else np.asarray(mask)
        atomic_write(directory / f"{stem}.{name}", pack_bits(bits).tobytes())


# ---------------------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------------------

_CALIB_KEYS = ("P0", "P1", "P2", "P3", "Tr")


def read_calib(path: str | Path) -> dict[str, np.ndarray]:
    """Read a KITTI odometry ``calib.txt`` the way MonoScene does.

    Lines are ``KEY: v1 ... v12``; reading stops at the first empty line. Keys other than ``P0``..``P3`` and ``Tr``
    are skipped.

    Args:
        path: the ``calib.txt``.

    Returns:
        ``P0``..``P3`` (those present) as ``(3, 4)`` float64 projection matrices of the rectified cameras and ``Tr``
        as a ``(4, 4)`` float64 velodyne -> camera transform (the file's 3x4 in the top rows, ``[0, 0, 0, 1]`` below).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"KITTI calibration file {path} does not exist")
    values: dict[str, np.ndarray] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            break
        key, sep, rest = line.partition(":")
        key = key.strip()
        if not sep or key not in _CALIB_KEYS:
            continue
        try:
            numbers = np.array([float(x) for x in rest.split()], dtype=np.float64)
        except ValueError as err:
            raise ValueError(f"calibration file {path}: line {key!r} is not a list of numbers ({err})") from err
        if numbers.size != 12:
            raise ValueError(f"calibration file {path}: {key} has {numbers.size} values, expected 12 (a 3x4 matrix)")
        values[key] = numbers.reshape(3, 4)
    missing = [key for key in ("P2", "Tr") if key not in values]
    if missing:
        raise ValueError(f"calibration file {path} lacks {' and '.join(missing)} (expected 'P2:' and 'Tr:' lines)")
    tr = np.eye(4)
    tr[:3, :4] = values.pop("Tr")
    return {**values, "Tr": tr}


# KITTI's stereo baseline: cam0 -> cam1 and cam2 -> cam3 are ~0.54 m apart along x.
_STEREO_BASELINE_M = 0.54


def write_calib(path: str | Path, P2: np.ndarray, Tr: np.ndarray) -> None:
    """Write a KITTI odometry ``calib.txt`` (``P0:``..``P3:`` and ``Tr:`` lines of 12 ``%.12e`` floats).

    Only ``P2`` and ``Tr`` are used by the readers. ``P0`` is ``[K | 0]`` with ``K = P2[:, :3]`` (the reference
    camera), ``P1`` and ``P3`` are ``P0`` and ``P2`` shifted by a 0.54 m stereo baseline, close to the real files.

    Args:
        path: destination file (written atomically; parent folders are created).
        P2: ``(3, 4)`` projection matrix of the left colour camera.
        Tr: ``(4, 4)`` or ``(3, 4)`` velodyne -> camera transform.
    """
    p2 = np.asarray(P2, dtype=np.float64)
    tr = np.asarray(Tr, dtype=np.float64)
    if p2.shape != (3, 4):
        raise ValueError(f"P2 must be a (3, 4) projection matrix, got shape {p2.shape}")
    if tr.shape not in ((3, 4), (4, 4)):
        raise ValueError(f"Tr must be a (4, 4) or (3, 4) transform, got shape {tr.shape}")
    if tr.shape == (4, 4) and not np.allclose(tr[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"Tr's last row must be [0, 0, 0, 1], got {tr[3].tolist()}")
    p0 = np.concatenate([p2[:, :3], np.zeros((3, 1))], axis=1)
    shift = np.zeros((3, 4))
    shift[0, 3] = -p2[0, 0] * _STEREO_BASELINE_M
    matrices = {"P0": p0, "P1": p0 + shift, "P2": p2, "P3": p2 + shift, "Tr": tr[:3]}
    text = "".join(f"{key}: " + " ".join(f"{v:.12e}" for v in m.reshape(-1)) + "\n" for key, m in matrices.items())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------------
# Dataset and DataModule
# ---------------------------------------------------------------------------------------------------------------


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
        super().__init__(image_size=image_size, color_jitter=color_jitter, flip_prob=flip_prob, captions=captions)
        self.split = self.check_split(split)
        grid = _check_grid(grid_size if grid_size is not None else self.default_grid_size)
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
        for candidate in (root / "dataset" / "sequences", root / "sequences"):
            if candidate.is_dir():
                return candidate
        raise FileNotFoundError(
            f"SemanticKITTI root {root} has neither dataset/sequences nor sequences "
            "(expected <root>/dataset/sequences/<SS>/{calib.txt,image_2,voxels})"
        )

    @property
    def grid_size(self) -> tuple[int, int, int]:
        return self._grid_size

    def __len__(self) -> int:
        return len(self.frames)

    def frame_id(self, index: int) -> str:
        """Stable id of frame ``index``, ``"<sequence>_<frame>"``, e.g. ``"08_000005"``."""
        sequence, frame = self.frames[index]
        return f"{sequence}_{frame}"

    def load_image(self, index: int) -> Image.Image:
        """The top-left ``crop_size`` crop of frame ``index``'s ``image_2`` PNG, as RGB."""
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
        return SemanticKittiDataset(
            self.root,
            split,
            grid_size=self.grid_size,
            crop_size=self.crop_size,
            preprocess_root=self.preprocess_root,
            **self.augmentation(augment),
        )
