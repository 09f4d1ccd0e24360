"""SemanticKITTI's on-disk formats (``docs/design.md`` §8.1): label maps, class weights, voxel files, calibration.

Files read (and, for the demo and native export, written) here::

    <SS>/calib.txt                KITTI odometry calibration (P0..P3, Tr)
    <SS>/voxels/NNNNNN.bin        packed occupancy of the input scan (enumerates frames)
    <SS>/voxels/NNNNNN.label      uint16 raw label ids, (X, Y, Z) C order (train/val only)
    <SS>/voxels/NNNNNN.invalid    packed mask of never-observed voxels (train/val only)
    <SS>/voxels/NNNNNN.occluded   packed mask of voxels occluded from the scan (unused)

Decoding follows the voxelizer that wrote the files: the flat index of voxel ``[x, y, z]`` is ``x*Y*Z + y*Z + z``
(so a C-order reshape gives ``[x, y, z]``), bit-packed masks hold the first voxel in the most significant bit, raw
ids become train ids through the SSC lookup table (raw 0 -> 0 "empty"; raw ids that ``learning_map`` sends to 0 or
does not list -> 255 "ignore") and invalid voxels become 255. The Dataset and DataModule reading whole sequences are
in ``data/semantic_kitti.py``, which re-exports every public name of this module.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from occscene_pl.data.base import IGNORE_INDEX
from occscene_pl.files import atomic_write

__all__ = [
    "IGNORE_RAW_ID",
    "LEARNING_MAP",
    "LEARNING_MAP_INV",
    "LUT_SIZE",
    "SEMANTIC_KITTI_CLASSES",
    "SEMANTIC_KITTI_CLASS_FREQUENCIES",
    "check_grid",
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

    Raises:
        ValueError: if ``train_ids`` is not an integer array or holds a value that is no train id.
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

    Raises:
        ValueError: if ``data`` is not uint8.
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


def check_grid(grid_size: Sequence[int]) -> tuple[int, int, int]:
    """Validate a voxel grid size.

    Args:
        grid_size: ``(X, Y, Z)``.

    Returns:
        ``(X, Y, Z)`` as Python ints.

    Raises:
        ValueError: unless ``grid_size`` is three positive integers.
    """
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

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if ``grid_size`` is invalid or the file has the wrong size.
    """
    return _read_packed_bits(path, check_grid(grid_size)).view(bool)


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

    Raises:
        FileNotFoundError: if a file does not exist.
        ValueError: if ``grid_size`` is invalid or a file has the wrong size.
    """
    grid = check_grid(grid_size)
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

    Raises:
        ValueError: if ``raw_labels`` is not a 3-D array of ids in ``0..65535`` or a mask has another shape.
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

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if a ``P0``..``P3``/``Tr`` line is not 12 numbers or ``P2`` or ``Tr`` is missing.
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

    Raises:
        ValueError: if ``P2`` is not ``(3, 4)`` or ``Tr`` is neither ``(3, 4)`` nor a ``(4, 4)`` with last row
            ``[0, 0, 0, 1]``.
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
