"""NYUv2 semantic scene completion as MonoScene uses it: SSCNet "depthbin" ``.bin`` voxels + RGB.

Format notes: ``docs/design.md`` §8.2.

On-disk layout (MonoScene's ``nyu.zip``)::

    <root>/NYUtrain/NYU0003_0000.bin         SSCNet RLE voxels, 240 x 144 x 240 at 0.02 m (795 scenes)
    <root>/NYUtrain/NYU0003_0000_color.jpg   RGB 640 x 480
    <root>/NYUtest/...                        the same (654 scenes)
    <preprocess_root>/base/NYU{train,test}/NYU0003_0000.pkl   optional, MonoScene's preprocess.py output

**Axis order (the one thing to get right).** The ``.bin`` grid, once reshaped in C order, is ``[world X, world Z
(up), world Y]``, and so is MonoScene's target ``target_1_4`` of shape ``(60, 36, 60)``. Our schema is ``(X, Y, Z)``
with Z up for every dataset, so :class:`NYUv2Dataset` returns MonoScene's target **with its last two axes swapped**:
``occupancy[x, y, z] = target_1_4[x, z, y]``, shape ``(60, 60, 36)``. That is exactly the order in which MonoScene's
``vox2pix`` enumerates voxels (``scene_size = (4.8, 4.8, 2.88)`` -> dims ``(60, 60, 36)``), so the projection of
voxel ``(x, y, z)`` computed from the sample's camera (``voxel_to_camera = inv(cam_pose)``, ``voxel_origin`` from the
file, ``voxel_size = 0.08``) is MonoScene's ``projected_pix`` of the same voxel (``docs/design.md`` §8.2, Axes).

Targets come from MonoScene's ``.pkl`` files when ``preprocess_root`` is given, otherwise the ``.bin`` is decoded and
downsampled 1:4 with MonoScene's ``_downsample_label`` rule (:func:`downsample_labels`); decoded targets are cached as
``.npz`` files keyed by the source file's size and modification time so a cache is never silently stale.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from occscene_pl.data.base import OccupancyDataModule, OccupancyDataset, RawSample
from occscene_pl.files import atomic_write

__all__ = [
    "NYUV2_CLASSES",
    "NYUV2_CLASS_WEIGHTS",
    "NYU_INTRINSICS",
    "SEG_CLASS_MAP",
    "NYUv2DataModule",
    "NYUv2Dataset",
    "downsample_labels",
    "read_sscnet_bin",
    "write_sscnet_bin",
]

NYUV2_CLASSES: tuple[str, ...] = (
    "empty",
    "ceiling",
    "floor",
    "wall",
    "window",
    "chair",
    "bed",
    "sofa",
    "table",
    "tvs",
    "furniture",
    "objects",
)
# MonoScene `monoscene/data/NYU/params.py`: only "empty" is down-weighted.
NYUV2_CLASS_WEIGHTS: tuple[float, ...] = (0.05,) + (1.0,) * 11

# SSCNet 37-class id -> 12 NYUv2 SSC classes (MonoScene `preprocess.py::seg_class_map`); 255 (ignore) is kept.
_SEG_CLASS_TABLE: tuple[int, ...] = (
    *(0, 1, 2, 3, 4, 11, 5, 6, 7, 8, 8, 10, 10, 10, 11, 11, 9, 8, 11),  # ids 0..18
    *(11, 11, 11, 11, 11, 11, 11, 11, 10, 10, 11, 8, 10, 11, 9, 11, 11, 11),  # ids 19..36
)
SEG_CLASS_MAP: Mapping[int, int] = MappingProxyType({**dict(enumerate(_SEG_CLASS_TABLE)), 255: 255})

NYU_INTRINSICS = np.array([[518.8579, 0.0, 320.0], [0.0, 518.8579, 240.0], [0.0, 0.0, 1.0]])
NYU_INTRINSICS.flags.writeable = False

IGNORE_INDEX = 255
_NUM_SSCNET_CLASSES = 37
_HEADER_FLOATS = 3 + 16  # voxel origin + 4x4 camera pose
_HEADER_BYTES = 4 * _HEADER_FLOATS
_PKL_KEYS = ("cam_pose", "voxel_origin", "name", "target_1_4", "target_1_16")
_CACHE_VERSION = 1

# 256-entry lookup table of the class map; entries that are not SSCNet ids are flagged invalid.
_SEG_LUT = np.zeros(256, dtype=np.uint8)
_SEG_VALID = np.zeros(256, dtype=bool)
for _src, _dst in SEG_CLASS_MAP.items():
    _SEG_LUT[_src], _SEG_VALID[_src] = _dst, True


def read_sscnet_bin(
    path: str | Path,
    full_grid_size: Sequence[int] = (240, 144, 240),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode an SSCNet RLE voxel file and map its 37 class ids to the 12 NYUv2 SSC classes.

    The file is ``float32[3]`` voxel origin, ``float32[16]`` row-major camera-to-world pose, then little-endian
    ``uint32`` pairs ``(value, run_length)`` until EOF whose runs fill the grid in C order (``docs/design.md`` §8.2).

    Args:
        path: the ``.bin`` file.
        full_grid_size: shape of the decoded grid in file order ``[X, Z, Y]``; ``(240, 144, 240)`` for real data.

    Returns:
        ``voxel_origin`` ``(3,)`` float32, ``cam_pose`` ``(4, 4)`` float32 (camera -> world) and ``labels``
        uint8 of shape ``full_grid_size`` in FILE axis order ``[world X, world Z (up), world Y]``, values 0..11 or 255.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SSCNet voxel file {path} does not exist")
    data = path.read_bytes()
    if len(data) < _HEADER_BYTES:
        raise ValueError(
            f"SSCNet voxel file {path} has {len(data)} bytes, shorter than the {_HEADER_BYTES}-byte header "
            "(float32[3] voxel origin + float32[16] camera pose)"
        )
    body = len(data) - _HEADER_BYTES
    if body % 8:
        raise ValueError(
            f"SSCNet voxel file {path} has an RLE body of {body} bytes ({body / 4:g} uint32 values); "
            "expected an even number of uint32 values (value, run_length pairs)"
        )
    header = np.frombuffer(data, dtype="<f4", count=_HEADER_FLOATS)
    origin = header[:3].astype(np.float32)
    cam_pose = header[3:].reshape(4, 4).astype(np.float32)
    rle = np.frombuffer(data, dtype="<u4", offset=_HEADER_BYTES).reshape(-1, 2)
    values, runs = rle[:, 0], rle[:, 1].astype(np.int64)
    expected = int(np.prod(full_grid_size))
    total = int(runs.sum())
    if total != expected:
        shape = "x".join(str(int(s)) for s in full_grid_size)
        raise ValueError(
            f"SSCNet voxel file {path}: RLE run lengths sum to {total} voxels, expected {expected} (= {shape})"
        )
    invalid = (values >= 256) | ~_SEG_VALID[np.minimum(values, 255)]
    if invalid.any():
        pair = int(np.flatnonzero(invalid)[0])
        raise ValueError(
            f"SSCNet voxel file {path}: RLE pair {pair} has value {int(values[pair])}, "
            f"expected an SSCNet class id 0..{_NUM_SSCNET_CLASSES - 1} or 255"
        )
    labels = np.repeat(_SEG_LUT[values], runs)
    return origin, cam_pose, labels.reshape(tuple(int(s) for s in full_grid_size))


def write_sscnet_bin(path: str | Path, origin: np.ndarray, cam_pose: np.ndarray, labels37: np.ndarray) -> None:
    """Write an SSCNet RLE voxel file (runs of equal values, C order), atomically.

    Args:
        path: destination ``.bin`` (parent folders are created).
        origin: ``(3,)`` world coordinates of voxel ``[0, 0, 0]``.
        cam_pose: ``(4, 4)`` camera -> world pose.
        labels37: integer grid in FILE axis order ``[X, Z, Y]`` of raw SSCNet class ids (0..36) or 255.
    """
    path = Path(path)
    origin = np.asarray(origin)
    cam_pose = np.asarray(cam_pose)
    labels37 = np.asarray(labels37)
    if origin.shape != (3,) or cam_pose.shape != (4, 4):
        raise ValueError(f"origin must be (3,) and cam_pose (4, 4), got {origin.shape} and {cam_pose.shape}")
    if not np.issubdtype(labels37.dtype, np.integer) or labels37.size == 0:
        raise ValueError(
            f"labels37 must be a non-empty integer array, got dtype {labels37.dtype}, size {labels37.size}"
        )
    flat = labels37.reshape(-1)
    if flat.min() < 0 or flat.max() > 255 or not _SEG_VALID[flat.astype(np.uint8)].all():
        raise ValueError(f"labels37 must hold SSCNet class ids 0..{_NUM_SSCNET_CLASSES - 1} or 255")
    starts = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1])
    runs = np.diff(np.append(starts, flat.size))
    pairs = np.empty((len(starts), 2), dtype="<u4")
    pairs[:, 0] = flat[starts]
    pairs[:, 1] = runs
    header = np.concatenate([origin.reshape(-1), cam_pose.reshape(-1)]).astype("<f4")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, header.tobytes() + pairs.tobytes())


def downsample_labels(labels: np.ndarray, factor: int) -> np.ndarray:
    """Downsample a label grid by ``factor`` with MonoScene's ``_downsample_label`` rule (``docs/design.md`` §8.4).

    Per non-overlapping ``factor**3`` block of ``n`` voxels with ``n0`` zeros and ``n255`` ignores: if
    ``n0 + n255 > 0.95 * n`` the block is 0 when ``n0 > n255`` else 255 (a tie gives 255); otherwise it is the most
    frequent label ``l`` with ``0 < l < 255`` (a tie gives the smallest id). Vectorised: uniform blocks keep their
    value, mixed blocks go through one ``bincount`` over ``(block, label)`` pairs.

    Args:
        labels: ``(A, B, C)`` integer labels in 0..255, each side divisible by ``factor``.
        factor: block edge length (1 returns a uint8 copy).

    Returns:
        ``(A // factor, B // factor, C // factor)`` uint8.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be a 3D grid, got shape {labels.shape}")
    if factor < 1 or any(s % factor for s in labels.shape):
        raise ValueError(f"downsampling factor {factor} must be >= 1 and divide the grid shape {labels.shape}")
    if labels.dtype != np.uint8:
        if labels.size and (labels.min() < 0 or labels.max() > 255 or not np.array_equal(labels, np.round(labels))):
            raise ValueError(f"labels must be integers in 0..255, got dtype {labels.dtype} outside that range")
        labels = labels.astype(np.uint8)
    if factor == 1 or labels.size == 0:
        return labels[::factor, ::factor, ::factor].copy()
    a, b, c = (s // factor for s in labels.shape)
    n = factor**3
    blocks = labels.reshape(a, factor, b, factor, c, factor).transpose(0, 2, 4, 1, 3, 5).reshape(-1, n)
    # Most blocks of a room are uniform (free space, unobserved space, solid walls), and a uniform block of value v
    # downsamples to v under every branch of the rule; only mixed blocks need the per-class histogram.
    low, high = blocks.min(axis=1), blocks.max(axis=1)
    out = low.copy()
    mixed = np.flatnonzero(low != high)
    if mixed.size:
        out[mixed] = _downsample_mixed_blocks(blocks[mixed])
    return out.reshape(a, b, c)


def _downsample_mixed_blocks(blocks: np.ndarray) -> np.ndarray:
    """MonoScene's rule on ``(B, n)`` uint8 blocks, through one ``bincount`` over ``(block, label)`` pairs."""
    count, n = blocks.shape
    # Compact the label values present to slots 0..K-1 so the (block, slot) histogram stays small.
    present = np.flatnonzero(np.bincount(blocks.reshape(-1), minlength=256))
    slot = np.zeros(256, dtype=np.int64)
    slot[present] = np.arange(len(present))
    k = len(present)
    keys = slot[blocks] + (np.arange(count, dtype=np.int64) * k)[:, None]
    counts = np.bincount(keys.reshape(-1), minlength=count * k).reshape(count, k)
    n0 = counts[:, slot[0]] if present[0] == 0 else np.zeros(count, np.int64)
    n255 = counts[:, slot[255]] if present[-1] == 255 else np.zeros(count, np.int64)
    semantic = (present > 0) & (present < 255)
    if semantic.any():
        # argmax returns the first maximum and `present` is ascending: ties go to the smallest class id.
        mode = present[semantic][np.argmax(counts[:, semantic], axis=1)]
    else:
        mode = np.zeros(count, dtype=np.int64)
    mostly_empty = (n0 + n255) > 0.95 * n
    return np.where(mostly_empty, np.where(n0 > n255, 0, IGNORE_INDEX), mode).astype(np.uint8)


class NYUv2Dataset(OccupancyDataset):
    """NYUv2 SSC reader (MonoScene's release): one RGB view, a 60 x 60 x 36 target at 0.08 m.

    The occupancy is returned in our ``(X, Y, Z)`` order (Z up), i.e. MonoScene's ``(60, 36, 60)`` ``[X, Z, Y]``
    target with its last two axes swapped (see the module docstring). ``voxel_to_camera = inv(cam_pose)`` maps world
    points (the voxel frame is the SSCNet world frame) into the camera; ``intrinsics`` is :data:`NYU_INTRINSICS`.

    Args:
        root: folder holding ``NYUtrain/`` and ``NYUtest/`` (``*.bin`` + ``*_color.jpg``).
        split: ``"train"`` or ``"test"`` (MonoScene validates on ``"test"``).
        grid_size: ``(X, Y, Z)`` of the returned occupancy; ``None`` is the real ``(60, 60, 36)``. Fixtures shrink it:
            the ``.bin`` must then hold a ``(4X, 4Z, 4Y)`` grid, ``X == Y`` (the 4.8 m x 4.8 m footprint, so voxels
            stay cubic) and ``voxel_size = 0.08 * 60 / X``; the height then spans ``Z * voxel_size`` metres.
        preprocess_root: MonoScene's preprocess output; targets, poses and origins are then read from
            ``<preprocess_root>/base/NYU<split>/<name>.pkl`` instead of decoding the ``.bin`` (pickles execute code
            when loaded: use trusted files only).
        cache_dir: where decoded targets are cached as ``<cache_dir>/<split>/<name>.npz``; ``None`` uses
            ``<root>/.occscene_cache/nyuv2``. Caching is skipped (with a warning) when it cannot be written.
        image_size: ``(H, W)`` of the returned images; ``None`` keeps 480 x 640.
        color_jitter: training colour jitter strength (of ``perceiver_image`` only; ``image`` stays un-jittered).
        flip_prob: training horizontal-flip probability.
        captions: optional captions file ``{frame_id: caption}``.

    At the real grid the colour images must be 640 x 480; at reduced fixture grids any size is accepted and the
    intrinsics are those of the 640 x 480 camera resized to it (pixel-centre convention of
    :func:`~occscene_pl.data.transforms.resize_view`: ``f * W / 640``, ``(c + 0.5) * W / 640 - 0.5``).
    """

    class_names: ClassVar[tuple[str, ...]] = NYUV2_CLASSES
    default_grid_size: ClassVar[tuple[int, int, int]] = (60, 60, 36)
    class_weights: ClassVar[tuple[float, ...]] = NYUV2_CLASS_WEIGHTS
    """``(X, Y, Z)``: MonoScene's (60, 36, 60) ``[X, Z, Y]`` target with its last two axes swapped."""
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    scene_description: ClassVar[str] = "an indoor room"
    VOXEL_SIZE: ClassVar[float] = 0.08
    DOWNSAMPLE: ClassVar[int] = 4
    IMAGE_SIZE: ClassVar[tuple[int, int]] = (640, 480)
    """``(W, H)`` of the colour images."""
    SCENE_SIZE: ClassVar[tuple[float, float, float]] = (4.8, 4.8, 2.88)
    """Metric extent of the real grid along world ``(X, Y, Z)``."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        grid_size: Sequence[int] | None = None,
        preprocess_root: str | Path | None = None,
        cache_dir: str | Path | None = None,
        image_size: Sequence[int] | None = None,
        color_jitter: float = 0.0,
        flip_prob: float = 0.0,
        captions: str | Path | None = None,
    ) -> None:
        super().__init__(image_size=image_size, color_jitter=color_jitter, flip_prob=flip_prob, captions=captions)
        self.split = self.check_split(split)
        grid = tuple(int(s) for s in (grid_size if grid_size is not None else self.default_grid_size))
        if len(grid) != 3 or min(grid) < 1:
            raise ValueError(f"grid_size must be three positive integers (X, Y, Z), got {grid_size!r}")
        if grid[0] != grid[1]:
            raise ValueError(
                f"grid_size {grid} is not isotropic: NYUv2 grids span {self.SCENE_SIZE[0]} m x {self.SCENE_SIZE[1]} m "
                "horizontally, so X must equal Y"
            )
        self._grid_size: tuple[int, int, int] = grid
        self.voxel_size = self.VOXEL_SIZE * (self.default_grid_size[0] / grid[0])
        x, y, z = grid
        self.full_grid_size = (self.DOWNSAMPLE * x, self.DOWNSAMPLE * z, self.DOWNSAMPLE * y)
        """Shape of the ``.bin`` grid in file order ``[X, Z, Y]``."""

        self.root = Path(root)
        self.split_dir = self.root / f"NYU{split}"
        if not self.split_dir.is_dir():
            raise FileNotFoundError(
                f"NYUv2 split directory {self.split_dir} does not exist "
                f"(expected {self.root}/NYU{split}/NYUxxxx_0000.bin and NYUxxxx_0000_color.jpg, MonoScene's layout)"
            )
        self.files = sorted(self.split_dir.glob("*.bin"))
        if not self.files:
            raise FileNotFoundError(f"NYUv2 split directory {self.split_dir} contains no *.bin voxel files")
        missing = [p for p in self.files if not self._color_path(p).is_file()]
        if missing:
            raise FileNotFoundError(
                f"NYUv2 colour image {self._color_path(missing[0])} does not exist "
                f"({len(missing)} of {len(self.files)} scenes in {self.split_dir} lack their *_color.jpg)"
            )

        self.preprocess_dir: Path | None = None
        if preprocess_root is not None:
            self.preprocess_dir = Path(preprocess_root) / "base" / f"NYU{split}"
            absent = [p for p in self.files if not self._pkl_path(p.stem).is_file()]
            if absent:
                raise FileNotFoundError(
                    f"MonoScene preprocessed file {self._pkl_path(absent[0].stem)} does not exist "
                    f"({len(absent)} of {len(self.files)} scenes lack <preprocess_root>/base/NYU{split}/<name>.pkl)"
                )

        self.cache_dir: Path | None = None
        if self.preprocess_dir is None:
            base = Path(cache_dir) if cache_dir is not None else self.root / ".occscene_cache" / "nyuv2"
            self.cache_dir = self._usable_cache_dir(base / split)

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """``(X, Y, Z)`` of the returned occupancy."""
        return self._grid_size

    def __len__(self) -> int:
        return len(self.files)

    @staticmethod
    def _color_path(bin_path: Path) -> Path:
        return bin_path.with_name(f"{bin_path.stem}_color.jpg")

    def _pkl_path(self, name: str) -> Path:
        assert self.preprocess_dir is not None
        return self.preprocess_dir / f"{name}.pkl"

    @staticmethod
    def _usable_cache_dir(path: Path) -> Path | None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            warnings.warn(
                f"NYUv2: cannot create cache directory {path} ({err}); decoding without a cache", stacklevel=3
            )
            return None
        if not os.access(path, os.W_OK):
            warnings.warn(f"NYUv2: cache directory {path} is not writable; decoding without a cache", stacklevel=3)
            return None
        return path

    @property
    def target_shape(self) -> tuple[int, int, int]:
        """MonoScene's target shape ``[X, Z, Y]`` for this grid, ``(60, 36, 60)`` at the real grid."""
        x, y, z = self._grid_size
        return (x, z, y)

    def read_target(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """MonoScene's 1:4 target of sample ``index`` with its grid placement.

        Returns:
            ``target_1_4`` uint8 ``(X, Z, Y)`` in MonoScene's axis order, ``voxel_origin`` ``(3,)`` float32 and
            ``cam_pose`` ``(4, 4)`` float32 (camera -> world).
        """
        bin_path = self.files[index]
        if self.preprocess_dir is not None:
            return self._read_pkl(self._pkl_path(bin_path.stem), bin_path.stem)
        return self._decode_cached(bin_path)

    def _read_pkl(self, path: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with path.open("rb") as handle:
            try:
                data = pickle.load(handle)
            except Exception as err:
                raise ValueError(f"MonoScene preprocessed file {path} is not a readable pickle: {err}") from err
        if not isinstance(data, dict) or any(key not in data for key in _PKL_KEYS):
            found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
            raise ValueError(
                f"MonoScene preprocessed file {path} must be a dict with keys {list(_PKL_KEYS)}, got {found}"
            )
        if str(data["name"]) != name:
            raise ValueError(f"MonoScene preprocessed file {path} is for scene {data['name']!r}, expected {name!r}")
        target = np.asarray(data["target_1_4"])
        if target.shape != self.target_shape:
            raise ValueError(
                f"MonoScene preprocessed file {path}: target_1_4 has shape {target.shape}, expected "
                f"{self.target_shape} ([X, Z, Y] for grid_size {self._grid_size})"
            )
        # MonoScene writes uint8; accept any numeric dtype holding train ids (``docs/design.md`` §8.2, Targets).
        valid = ((target >= 0) & (target < len(NYUV2_CLASSES))) | (target == IGNORE_INDEX)
        if not valid.all():
            raise ValueError(f"MonoScene preprocessed file {path}: target_1_4 holds values outside 0..11 and 255")
        origin = np.asarray(data["voxel_origin"], dtype=np.float32).reshape(-1)
        cam_pose = np.asarray(data["cam_pose"], dtype=np.float32)
        if origin.shape != (3,) or cam_pose.shape != (4, 4):
            raise ValueError(
                f"MonoScene preprocessed file {path}: voxel_origin must be (3,) and cam_pose (4, 4), "
                f"got {origin.shape} and {cam_pose.shape}"
            )
        return target.astype(np.uint8), origin, cam_pose

    def _cache_key(self, stat: os.stat_result) -> np.ndarray:
        return np.array([_CACHE_VERSION, stat.st_size, stat.st_mtime_ns, *self._grid_size], dtype=np.int64)

    def _load_cache(self, path: Path, key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        try:
            with np.load(path, allow_pickle=False) as npz:
                if not np.array_equal(npz["key"], key):
                    return None
                target, origin, cam_pose = npz["target_1_4"], npz["voxel_origin"], npz["cam_pose"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None  # a foreign or damaged cache file is rebuilt, never trusted
        if target.shape != self.target_shape or target.dtype != np.uint8:
            return None
        return target, origin, cam_pose

    def _decode_cached(self, bin_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not bin_path.is_file():
            raise FileNotFoundError(f"SSCNet voxel file {bin_path} does not exist")
        # The key is taken before reading: if the file changes meanwhile, the next load sees a new key and re-decodes.
        key = self._cache_key(bin_path.stat())
        cache_path = self.cache_dir / f"{bin_path.stem}.npz" if self.cache_dir is not None else None
        if cache_path is not None:
            cached = self._load_cache(cache_path, key)
            if cached is not None:
                return cached
        origin, cam_pose, labels = read_sscnet_bin(bin_path, self.full_grid_size)
        target = downsample_labels(labels, self.DOWNSAMPLE)
        if cache_path is not None:
            self._write_cache(cache_path, key, target, origin, cam_pose)
        return target, origin, cam_pose

    def _write_cache(
        self, path: Path, key: np.ndarray, target: np.ndarray, origin: np.ndarray, cam_pose: np.ndarray
    ) -> None:
        try:
            atomic_write(
                path,
                lambda f: np.savez_compressed(f, key=key, target_1_4=target, voxel_origin=origin, cam_pose=cam_pose),
            )
        except OSError as err:
            warnings.warn(f"NYUv2: cannot write the cache file {path} ({err}); caching disabled", stacklevel=2)
            self.cache_dir = None

    def intrinsics_for(self, width: int, height: int, path: Path | None = None) -> np.ndarray:
        """The pinhole matrix of a ``width`` x ``height`` colour image (``(3, 3)`` float64)."""
        native_w, native_h = self.IMAGE_SIZE
        if (width, height) == (native_w, native_h):
            return NYU_INTRINSICS.astype(np.float64)
        if self._grid_size == self.default_grid_size:
            raise ValueError(
                f"NYUv2 colour image {path if path is not None else ''} is {width}x{height}, expected "
                f"{native_w}x{native_h} (MonoScene's images are never cropped or resized on disk)"
            )
        sx, sy = width / native_w, height / native_h
        k = NYU_INTRINSICS.astype(np.float64)
        k[0, 0] *= sx
        k[1, 1] *= sy
        k[0, 2] = (k[0, 2] + 0.5) * sx - 0.5
        k[1, 2] = (k[1, 2] + 0.5) * sy - 0.5
        return k

    def load(self, index: int) -> RawSample:
        """Decode sample ``index``: the colour image, ``inv(cam_pose)``, and the swapped ``(X, Y, Z)`` target."""
        bin_path = self.files[index]
        target, origin, cam_pose = self.read_target(index)
        color_path = self._color_path(bin_path)
        if not color_path.is_file():
            raise FileNotFoundError(f"NYUv2 colour image {color_path} does not exist")
        with Image.open(color_path) as handle:
            image = handle.convert("RGB")
        intrinsics = self.intrinsics_for(image.width, image.height, color_path)
        voxel_to_camera = np.linalg.inv(cam_pose.astype(np.float64))
        # MonoScene's target is [X, Z, Y]; our schema is (X, Y, Z) with Z up (module docstring).
        occupancy = np.ascontiguousarray(target.swapaxes(1, 2))
        return RawSample(
            views=[(image, intrinsics, voxel_to_camera)],
            occupancy=occupancy,
            voxel_origin=np.asarray(origin, dtype=np.float32),
            voxel_size=self.voxel_size,
            frame_id=bin_path.stem,
        )


class NYUv2DataModule(OccupancyDataModule):
    """NYUv2 SSC in MonoScene's setting: 795 train / 654 test scenes, the test set doubling as validation set.

    Args:
        root: folder holding ``NYUtrain/`` and ``NYUtest/``.
        preprocess_root: MonoScene's preprocess output (``base/NYU{train,test}/*.pkl``); ``None`` decodes the
            ``.bin`` files (cached, see :class:`NYUv2Dataset`).
        cache_dir: cache of decoded targets; ``None`` is ``<root>/.occscene_cache/nyuv2``.
        val_split: MonoScene validates on ``"test"`` (NYUv2 has no separate validation split).
        test_split: split used by ``test``.
        predict_split: split supplying the camera rig (and scenes) of ``predict``.
        train_split: split used by ``fit``.
        **kwargs: :class:`~occscene_pl.data.base.OccupancyDataModule` arguments (batch size, image size, ...).
    """

    dataset_class = NYUv2Dataset

    def __init__(
        self,
        root: str = "data/nyuv2",
        preprocess_root: str | None = None,
        cache_dir: str | None = None,
        val_split: str = "test",
        test_split: str = "test",
        predict_split: str = "test",
        train_split: str = "train",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            train_split=train_split, val_split=val_split, test_split=test_split, predict_split=predict_split, **kwargs
        )
        self.root = root
        self.preprocess_root = preprocess_root
        self.cache_dir = cache_dir

    def build_dataset(self, split: str, augment: bool) -> NYUv2Dataset:
        """The reader of ``split``; ``augment`` turns on colour jitter and flips."""
        return NYUv2Dataset(
            self.root,
            split,
            grid_size=self.grid_size,
            preprocess_root=self.preprocess_root,
            cache_dir=self.cache_dir,
            **self.augmentation(augment),
        )
