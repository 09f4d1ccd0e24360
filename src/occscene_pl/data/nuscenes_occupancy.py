"""nuScenes-Occupancy (OpenOccupancy v0.1): six surround cameras and a 512 x 512 x 40 semantic grid.

On-disk layout (``docs/design.md`` §8.3, the OpenOccupancy layout)::

    data/nuscenes/                                   <root>: nuScenes v1.0-trainval (samples/, sweeps/, ...)
    data/nuscenes/nuscenes_occ_infos_{train,val}.pkl mmdet3d-style info pickles released by OpenOccupancy
    data/nuScenes-Occupancy/scene_<scene_token>/occupancy/<lidar_token>.npy   <occupancy_root>: sparse ground truth

Ground truth (§3.2, §3.3): an integer ``(N, 4)`` array with one row ``[z, y, x, cls]`` per occupied voxel (a 7-column
``[z, y, x, vx, vy, vz, cls]`` variant exists; the label is always the last column). Free voxels are not stored and
read as 0; file label 0 ("noise") becomes 255 (ignore). The grid lives in the **LiDAR (LIDAR_TOP) frame** of the
keyframe, whose axes are x right, y forward, z up, over ``POINT_CLOUD_RANGE``. Because the voxel frame is the LiDAR
frame, a camera's ``voxel_to_camera`` is OpenOccupancy's ``lidar2cam`` (§3.5).

Camera order (``docs/design.md`` §8.3, Cameras): the info pickles list cameras in mmdet3d's dict order (FRONT,
FRONT_RIGHT, FRONT_LEFT, BACK, BACK_LEFT, BACK_RIGHT) while OpenOccupancy's image pipeline iterates
``data_config['cams']`` (FRONT_LEFT, FRONT, FRONT_RIGHT, BACK_LEFT, BACK, BACK_RIGHT). occscene-pl uses one order
everywhere, the pipeline's, :data:`CAMERA_NAMES`: view ``v`` of every sample, of its intrinsics and of its
``voxel_to_camera`` is ``CAMERA_NAMES[v]``.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from occscene_pl.data.base import OccupancyDataModule, OccupancyDataset, RawSample
from occscene_pl.data.transforms import CameraImage, crop_view
from occscene_pl.files import atomic_write

__all__ = [
    "CAMERA_NAMES",
    "NUSCENES_CLASS_FREQUENCIES",
    "NUSCENES_OCCUPANCY_CLASSES",
    "POINT_CLOUD_RANGE",
    "NuScenesOccupancyDataModule",
    "NuScenesOccupancyDataset",
    "class_weights",
    "load_infos",
    "read_sparse_occupancy",
    "resolve_data_path",
    "write_sparse_occupancy",
]

NUSCENES_OCCUPANCY_CLASSES: tuple[str, ...] = (
    "empty",
    "barrier",
    "bicycle",
    "bus",
    "car",
    "construction_vehicle",
    "motorcycle",
    "pedestrian",
    "traffic_cone",
    "trailer",
    "truck",
    "driveable_surface",
    "other_flat",
    "sidewalk",
    "terrain",
    "manmade",
    "vegetation",
)
"""Train ids 0-16 as printed by OpenOccupancy's evaluator (§3.4); 0 = free, 255 = ignore (file label 0, noise)."""

NUSCENES_CLASS_FREQUENCIES: np.ndarray = np.array(
    [
        2242961742295,
        25985376,
        1561108,
        28862014,
        196106643,
        15920504,
        2158753,
        26539491,
        4004729,
        34838681,
        75173306,
        2255027978,
        50959399,
        646022466,
        869055679,
        1446141335,
        1724391378,
    ],
    dtype=np.int64,
)
"""Voxel counts per train id, ``nusc_class_frequencies`` of OpenOccupancy's ``utils/nusc_param.py``."""
NUSCENES_CLASS_FREQUENCIES.setflags(write=False)

CAMERA_NAMES: tuple[str, ...] = (
    "CAM_FRONT_LEFT",
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_BACK_LEFT",
    "CAM_BACK",
    "CAM_BACK_RIGHT",
)
"""The one camera order of every nuScenes sample: OpenOccupancy's pipeline order ``data_config['cams']``."""

POINT_CLOUD_RANGE: tuple[float, ...] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
"""``(x_min, y_min, z_min, x_max, y_max, z_max)`` of the grid in the LiDAR frame, metres."""

NOISE_LABEL = 0
IGNORE_INDEX = 255
INFO_KEYS = ("token", "scene_token", "lidar_token", "timestamp", "cams")
CAMERA_KEYS = ("data_path", "cam_intrinsic", "sensor2lidar_rotation", "sensor2lidar_translation")
# Components of a released `data_path` below which the path is relative to the nuScenes root.
_DATA_DIRS = ("samples", "sweeps")


def class_weights() -> np.ndarray:
    """Cross-entropy class weights of OpenOccupancy's ``occ_head.py``: ``1 / ln(frequency + 0.001)``.

    Returns:
        ``(17,)`` float64, indexed by train id.
    """
    return 1.0 / np.log(NUSCENES_CLASS_FREQUENCIES + 0.001)


def _check_grid_size(grid_size: Sequence[int]) -> tuple[int, int, int]:
    if len(grid_size) != 3 or any(int(n) != n or n < 1 for n in grid_size):
        raise ValueError(f"grid_size must be three positive integers (X, Y, Z), got {tuple(grid_size)!r}")
    return int(grid_size[0]), int(grid_size[1]), int(grid_size[2])


def read_sparse_occupancy(path: str | Path, grid_size: Sequence[int] = (512, 512, 40)) -> np.ndarray:
    """Read one nuScenes-Occupancy ground-truth file into a dense grid, as OpenOccupancy's ``LoadOccupancy``.

    Each row's voxel index goes through the original's voxel-centre -> metres -> clip -> index round trip, which for
    integer indices is the identity in range and clips out-of-range indices onto the grid border. Several
    rows naming the same voxel are resolved by majority vote after the noise remap, ties going to the smaller label
    (``np.argmax`` over label counts in the original ``nb_process_label``).

    Args:
        path: ``.npy`` file holding an integer ``(N, 4)`` array of rows ``[z, y, x, cls]`` (or ``(N, 7)``
            ``[z, y, x, vx, vy, vz, cls]``; the label is the last column). Integral float arrays are accepted.
        grid_size: ``(X, Y, Z)`` of the grid the indices refer to; the grid spans :data:`POINT_CLOUD_RANGE`.

    Returns:
        ``(X, Y, Z)`` uint8 indexed ``[x, y, z]``: 0 = free, 1-16 = classes, 255 = noise (ignore).
    """
    path = Path(path)
    grid = _check_grid_size(grid_size)
    if not path.is_file():
        raise FileNotFoundError(f"nuScenes-Occupancy ground truth {path} does not exist (expected an (N, 4) .npy)")
    try:
        rows = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise ValueError(f"{path} is not a readable .npy array ({err})") from err
    if rows.ndim != 2 or rows.shape[1] < 4:
        raise ValueError(f"{path} holds an array of shape {rows.shape}; expected (N, 4) rows [z, y, x, cls]")
    if np.issubdtype(rows.dtype, np.floating):
        if not (np.isfinite(rows).all() and (rows == np.round(rows)).all()):
            raise ValueError(
                f"{path} holds non-integral {rows.dtype} values; expected integer voxel indices and labels"
            )
    elif not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"{path} holds {rows.dtype} values; expected an integer array of [z, y, x, cls] rows")
    labels = rows[:, -1].astype(np.int64)
    bad = (labels < 0) | (labels >= len(NUSCENES_OCCUPANCY_CLASSES))
    if bad.any():
        found = sorted(set(labels[bad].tolist()))[:5]
        raise ValueError(f"{path} has labels {found} outside 0..{len(NUSCENES_OCCUPANCY_CLASSES) - 1}")
    labels[labels == NOISE_LABEL] = IGNORE_INDEX

    # The original maps indices to voxel centres in metres, applies the BEV augmentation (identity here), maps back
    # and clips: for integer indices, floor(((i + 0.5) * size + low - low) / size) = i, so the round trip reduces
    # exactly to clipping each axis onto the grid (out-of-range rows land on the border voxel, as in OpenOccupancy).
    x = np.clip(rows[:, 2], 0, grid[0] - 1).astype(np.int64)
    y = np.clip(rows[:, 1], 0, grid[1] - 1).astype(np.int64)
    z = np.clip(rows[:, 0], 0, grid[2] - 1).astype(np.int64)

    dense = np.zeros(grid, dtype=np.uint8)
    if len(rows) == 0:
        return dense
    # One sorted key per row, (voxel, label); runs of equal keys are every voxel's label histogram, no Python loop.
    keys = np.sort(np.ravel_multi_index((x, y, z), grid) * 256 + labels)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    counts = np.diff(np.r_[starts, len(keys)])
    keys = keys[starts]
    voxels, voted = keys >> 8, keys & 255
    if len(voxels) > 1 and (voxels[1:] == voxels[:-1]).any():
        order = np.lexsort((voted, -counts, voxels))  # by voxel, then most votes, then smallest label
        first = np.r_[True, voxels[order[1:]] != voxels[order[:-1]]]
        voxels, voted = voxels[order[first]], voted[order[first]]
    dense.reshape(-1)[voxels] = voted
    return dense


def write_sparse_occupancy(path: str | Path, dense: np.ndarray) -> None:
    """Write a dense grid in the nuScenes-Occupancy sparse format (inverse of :func:`read_sparse_occupancy`).

    Args:
        path: destination ``.npy`` (written atomically: temporary file + rename; parent folders are created).
        dense: ``(X, Y, Z)`` train ids; every non-zero voxel becomes one int64 row ``[z, y, x, cls]``, and 255 is
            written back as the file's noise label 0.
    """
    path = Path(path)
    dense = np.asarray(dense)
    if dense.ndim != 3 or not np.issubdtype(dense.dtype, np.integer):
        raise ValueError(f"dense occupancy must be an integer (X, Y, Z) array, got {dense.dtype} {dense.shape}")
    valid = ((dense >= 0) & (dense < len(NUSCENES_OCCUPANCY_CLASSES))) | (dense == IGNORE_INDEX)
    if not valid.all():
        raise ValueError(f"dense occupancy for {path} has values outside 0..16 and 255: {np.unique(dense[~valid])[:5]}")
    x, y, z = np.nonzero(dense)
    labels = dense[x, y, z].astype(np.int64)
    labels[labels == IGNORE_INDEX] = NOISE_LABEL
    rows = np.stack([z, y, x, labels], axis=1).astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.save(f, rows))


def load_infos(path: str | Path, cameras: Sequence[str] = CAMERA_NAMES) -> list[dict[str, Any]]:
    """Load an OpenOccupancy info pickle and sort its frames by timestamp, as ``NuscOCCDataset`` does.

    Args:
        path: ``nuscenes_occ_infos_{split}.pkl``, a pickle of ``{'infos': [info, ...], 'metadata': {...}}``.
        cameras: cameras every info must describe.

    Returns:
        The infos sorted by ``timestamp`` (stable).

    Raises:
        FileNotFoundError: the pickle does not exist.
        ValueError: the pickle is not of that form, or an info lacks one of ``token``, ``scene_token``,
            ``lidar_token``, ``timestamp``, ``cams``, or a camera lacks one of ``data_path``, ``cam_intrinsic``,
            ``sensor2lidar_rotation``, ``sensor2lidar_translation``. The message names the file, the info's
            position in the file, its token and the missing key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"nuScenes-Occupancy info file {path} does not exist (expected OpenOccupancy's nuscenes_occ_infos_*.pkl)"
        )
    try:
        with path.open("rb") as handle:
            data = pickle.load(handle)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as err:
        raise ValueError(f"{path} is not a readable info pickle ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("infos"), list):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} must hold a dict {{'infos': [...], 'metadata': {{...}}}}; found {found}")
    infos: list[dict[str, Any]] = data["infos"]
    for index, info in enumerate(infos):
        if not isinstance(info, dict):
            raise ValueError(f"{path}: info {index} is a {type(info).__name__}, expected a dict")
        where = f"{path}: info {index} (token {info.get('token', '?')!r})"
        for key in INFO_KEYS:
            if key not in info:
                raise ValueError(f"{where} has no key {key!r}; every info needs {list(INFO_KEYS)}")
        if not isinstance(info["cams"], dict):
            raise ValueError(f"{where}: 'cams' is a {type(info['cams']).__name__}, expected a dict of cameras")
        for camera in cameras:
            if camera not in info["cams"]:
                raise ValueError(f"{where}: 'cams' has no camera {camera!r}; found {sorted(info['cams'])}")
            for key in CAMERA_KEYS:
                if key not in info["cams"][camera]:
                    raise ValueError(
                        f"{where}: camera {camera} has no key {key!r}; every camera needs {list(CAMERA_KEYS)}"
                    )
    return sorted(infos, key=lambda info: info["timestamp"])


def resolve_data_path(root: str | Path, data_path: str) -> Path:
    """Locate an image named by an info pickle's ``data_path`` under the nuScenes ``root``.

    Released pickles hold paths such as ``./data/nuscenes/samples/CAM_FRONT/<name>.jpg`` relative to the directory
    OpenOccupancy ran in. An absolute path that exists is used as is; otherwise the part from the last ``samples/``
    or ``sweeps/`` component on is taken under ``root``; a path with neither is taken relative to ``root``.

    Raises:
        FileNotFoundError: naming both the ``data_path`` of the pickle and the path tried.
    """
    root = Path(root)
    original = PurePosixPath(str(data_path).replace("\\", "/"))
    if original.is_absolute() and Path(original).is_file():
        return Path(original)
    parts = original.parts
    anchors = [i for i, part in enumerate(parts[:-1]) if part in _DATA_DIRS]
    if anchors:
        candidate = root.joinpath(*parts[anchors[-1] :])
    elif original.is_absolute():
        candidate = Path(original)
    else:
        candidate = root.joinpath(*parts)
    if not candidate.is_file():
        raise FileNotFoundError(f"image {data_path!r} of the info file not found: tried {candidate}")
    return candidate


def _matrix(value: Any, shape: tuple[int, ...], where: str, key: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.shape != shape:
        raise ValueError(f"{where}: {key} has shape {array.shape}, expected {shape}")
    return array


class NuScenesOccupancyDataset(OccupancyDataset):
    """nuScenes-Occupancy keyframes: six camera images, their rig and the dense semantic occupancy.

    Args:
        root: nuScenes root holding ``nuscenes_occ_infos_{split}.pkl`` and the ``samples/`` images.
        occupancy_root: folder of ``scene_<scene_token>/occupancy/<lidar_token>.npy``; defaults to
            ``<root>/../nuScenes-Occupancy`` (OpenOccupancy's ``data/nuscenes`` + ``data/nuScenes-Occupancy``).
        split: ``"train"`` or ``"val"`` (v0.1 ships ground truth for both; there is no test split).
        grid_size: ``(X, Y, Z)``; the grid always spans :data:`POINT_CLOUD_RANGE`, so the voxels must be cubes
            (``102.4 / X == 102.4 / Y == 8 / Z``). Defaults to 512 x 512 x 40 (0.2 m).
        crop_box: ``(left, top, right, bottom)`` crop of every image; OpenOccupancy's test crop of 1600 x 900 drops
            the top 4 rows. ``None`` keeps the whole image.
        image_size: ``(H, W)`` of the returned images; ``None`` keeps the cropped size (896 x 1600).
        color_jitter: colour jitter strength (training augmentation of ``perceiver_image`` only: one draw per
            sample, shared by the six views).
        flip_prob: probability of a horizontal flip of all views (training augmentation).
        captions: optional captions file ``{frame_id: caption}``.
    """

    class_names: ClassVar[tuple[str, ...]] = NUSCENES_OCCUPANCY_CLASSES
    default_grid_size: ClassVar[tuple[int, int, int]] = (512, 512, 40)
    class_weights: ClassVar[tuple[float, ...]] = tuple(float(w) for w in class_weights())
    splits: ClassVar[tuple[str, ...]] = ("train", "val")
    scene_description: ClassVar[str] = "a driving scene in a city"

    def __init__(
        self,
        root: str | Path,
        occupancy_root: str | Path | None = None,
        split: str = "train",
        grid_size: Sequence[int] | None = None,
        crop_box: Sequence[int] | None = (0, 4, 1600, 900),
        image_size: Sequence[int] | None = None,
        color_jitter: float = 0.0,
        flip_prob: float = 0.0,
        captions: str | Path | None = None,
    ) -> None:
        super().__init__(image_size=image_size, color_jitter=color_jitter, flip_prob=flip_prob, captions=captions)
        self.split = self.check_split(split)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"nuScenes root {self.root} does not exist (expected the nuScenes v1.0 folder)")
        self.occupancy_root = (
            Path(occupancy_root) if occupancy_root is not None else self.root / ".." / "nuScenes-Occupancy"
        )
        self._grid_size = _check_grid_size(grid_size if grid_size is not None else self.default_grid_size)
        extent = np.subtract(POINT_CLOUD_RANGE[3:], POINT_CLOUD_RANGE[:3])
        sizes = extent / np.asarray(self._grid_size, dtype=np.float64)
        if not np.allclose(sizes, sizes[0], rtol=1e-9, atol=0.0):
            raise ValueError(
                f"grid_size {self._grid_size} gives non-cubic voxels {tuple(sizes.round(6))} m over the range "
                f"{POINT_CLOUD_RANGE}; X : Y : Z must be 102.4 : 102.4 : 8 (e.g. (512, 512, 40) or (64, 64, 5))"
            )
        self.voxel_size = float(sizes[0])
        self.voxel_origin = np.asarray(POINT_CLOUD_RANGE[:3], dtype=np.float32)
        if crop_box is not None and (
            len(crop_box) != 4 or min(crop_box[:2]) < 0 or crop_box[2] <= crop_box[0] or crop_box[3] <= crop_box[1]
        ):
            raise ValueError(
                f"crop_box must be (left, top, right, bottom) with 0 <= left < right, 0 <= top < bottom: {crop_box}"
            )
        self.crop_box = tuple(int(c) for c in crop_box) if crop_box is not None else None
        self.info_path = self.root / f"nuscenes_occ_infos_{split}.pkl"
        self.infos = load_infos(self.info_path, CAMERA_NAMES)

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """``(X, Y, Z)`` of the returned occupancy."""
        return self._grid_size

    def __len__(self) -> int:
        return len(self.infos)

    def occupancy_path(self, index: int) -> Path:
        """``occupancy_root/scene_<scene_token>/occupancy/<lidar_token>.npy`` of frame ``index``."""
        info = self.infos[index]
        return self.occupancy_root / f"scene_{info['scene_token']}" / "occupancy" / f"{info['lidar_token']}.npy"

    def _view(self, index: int, camera: str) -> CameraImage:
        info = self.infos[index]
        cam = info["cams"][camera]
        where = f"{self.info_path}: frame {info['token']!r} camera {camera}"
        intrinsics = _matrix(cam["cam_intrinsic"], (3, 3), where, "cam_intrinsic")
        rotation = _matrix(cam["sensor2lidar_rotation"], (3, 3), where, "sensor2lidar_rotation")
        translation = _matrix(cam["sensor2lidar_translation"], (3,), where, "sensor2lidar_translation")
        # p_lidar = R p_cam + t, so p_cam = R^-1 (p_lidar - t): OpenOccupancy's lidar2cam (inv, not transpose).
        lidar_to_camera = np.eye(4)
        lidar_to_camera[:3, :3] = np.linalg.inv(rotation)
        lidar_to_camera[:3, 3] = -lidar_to_camera[:3, :3] @ translation
        try:
            image_path = resolve_data_path(self.root, cam["data_path"])
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{where}: {err}") from None
        try:
            image: Image.Image = Image.open(image_path)
            image.load()
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{image_path} ({where}) is not a readable image: {err}") from err
        if self.crop_box is not None:
            left, top, right, bottom = self.crop_box
            if right > image.width or bottom > image.height:
                raise ValueError(
                    f"crop_box {self.crop_box} does not fit {image_path} of size {image.width}x{image.height}"
                )
            image, intrinsics = crop_view(image, intrinsics, self.crop_box)
        return image, intrinsics, lidar_to_camera

    def load(self, index: int) -> RawSample:
        """Decode frame ``index`` (in timestamp order): images in :data:`CAMERA_NAMES` order and the dense grid."""
        info = self.infos[index]
        views = [self._view(index, camera) for camera in CAMERA_NAMES]
        path = self.occupancy_path(index)
        if not path.is_file():
            raise FileNotFoundError(
                f"ground truth of frame {info['token']!r} ({self.split}) not found: expected {path} "
                f"(occupancy_root={self.occupancy_root})"
            )
        occupancy = read_sparse_occupancy(path, self._grid_size)
        return RawSample(
            views=views,
            occupancy=occupancy,
            voxel_origin=self.voxel_origin.copy(),
            voxel_size=self.voxel_size,
            frame_id=str(info["token"]),
        )


class NuScenesOccupancyDataModule(OccupancyDataModule):
    """DataModule of nuScenes-Occupancy; ``test`` and ``predict`` use ``val`` (v0.1 has no test ground truth).

    Args:
        root: nuScenes root with ``nuscenes_occ_infos_{train,val}.pkl`` and the images.
        occupancy_root: nuScenes-Occupancy folder; ``None`` means ``<root>/../nuScenes-Occupancy``.
        crop_box: ``(left, top, right, bottom)`` crop of every 1600 x 900 image (OpenOccupancy drops the top 4 rows);
            ``None`` keeps the whole image.
        val_split: split of validation.
        test_split: split of ``test``.
        predict_split: split of ``predict``.
        **kwargs: the arguments of :class:`~occscene_pl.data.base.OccupancyDataModule`.
    """

    dataset_class = NuScenesOccupancyDataset

    def __init__(
        self,
        root: str = "data/nuscenes",
        occupancy_root: str | None = None,
        crop_box: Sequence[int] | None = (0, 4, 1600, 900),
        val_split: str = "val",
        test_split: str = "val",
        predict_split: str = "val",
        **kwargs: Any,
    ) -> None:
        super().__init__(val_split=val_split, test_split=test_split, predict_split=predict_split, **kwargs)
        self.root = root
        self.occupancy_root = occupancy_root
        self.crop_box = tuple(crop_box) if crop_box is not None else None

    def build_dataset(self, split: str, augment: bool) -> NuScenesOccupancyDataset:
        """The reader of ``split``; ``augment`` turns on colour jitter and flips."""
        return NuScenesOccupancyDataset(
            self.root,
            occupancy_root=self.occupancy_root,
            split=split,
            grid_size=self.grid_size,
            crop_box=self.crop_box,
            **self.augmentation(augment),
        )
