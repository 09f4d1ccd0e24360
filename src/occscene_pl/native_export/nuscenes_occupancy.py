"""The OpenOccupancy (nuScenes-Occupancy) export of generated samples (``docs/design.md`` §9.2).

:class:`NuScenesOccupancyExporter` writes the OpenOccupancy layout; ``<root>`` plays the role of OpenOccupancy's
``data/`` folder (its configs read ``./data/nuscenes``, ``./data/nuScenes-Occupancy`` and ``./data/depth_gt``), and
:class:`~occscene_pl.data.nuscenes_occupancy.NuScenesOccupancyDataset` reads ``<root>/nuscenes``::

    <root>/nuscenes/samples/<CAM_*>/<token>__<CAM_*>.png                 the six views at ``image_size``
    <root>/nuscenes/samples/LIDAR_TOP/<lidar_token>.pcd.bin             placeholder: an empty point cloud
    <root>/nuscenes/lidarseg/v1.0-trainval/<lidar_token>_lidarseg.bin   placeholder: labels of no points
    <root>/depth_gt/<token>__<CAM_*>.png.bin                             placeholder: no depth points (float32 N x 3)
    <root>/nuScenes-Occupancy/scene_<scene_token>/occupancy/<lidar_token>.npy   sparse [z, y, x, cls] (255 -> 0)
    <root>/nuscenes/occscene_infos/<split>/<token>.pkl                  the frame's info (written last)
    <root>/nuscenes/nuscenes_occ_infos_<split>.pkl                      every frame's info, rebuilt by finalize()

Tokens are 32 hex digits derived from the frame_id (``sha256``), so re-runs overwrite the same files; every sample is
its own scene. ``nuscenes_occ_infos_<split>.pkl`` is rebuilt from the per-frame infos when predict ends (rank 0,
after all ranks), or by calling :meth:`NuScenesOccupancyExporter.finalize`; read it back with
``NuScenesOccupancyDataset("<root>/nuscenes", split=..., grid_size=..., crop_box=None)``. The reader puts voxel
``[0, 0, 0]`` at ``POINT_CLOUD_RANGE[:3]``; a sample whose ``voxel_origin`` differs is re-based as above.
Requirements: six views in ``CAMERA_NAMES`` order, a grid over the OpenOccupancy range with cubic voxels
(``102.4 / X == 102.4 / Y == 8 / Z == voxel_size``), train ids in ``0..16`` or 255.

**Placeholders for LiDAR-only data.** Every info holds every key that OpenOccupancy's ``NuscOCCDataset``, its
loading pipeline and mmdet3d's ``NuScenesDataset`` read (:data:`NUSCENES_INFO_KEYS`). Generated data has no LiDAR,
ego motion or boxes, so: the LiDAR frame is the ego frame (``lidar2ego`` identity), the ego sits at the global origin
(``ego2global`` identity), ``sweeps`` is empty, ``prev``/``next`` are ``""`` (no neighbouring frames), ``can_bus`` is
18 zeros, ``frame_idx`` is 0, the point cloud and lidarseg files hold no points, every ``depth_gt`` file holds no
points (OpenOccupancy's depth loss then has no foreground pixels and contributes 0 for these frames), and the box
arrays (``gt_boxes``, ``gt_names``, ``gt_velocity``, ``num_lidar_pts``, ``num_radar_pts``, ``valid_flag``) are
empty. The cameras' ``sensor2ego_*`` therefore equal their ``sensor2lidar_*``. Camera-only configs train on such
frames unchanged; LiDAR and multi-modal configs get no points.
"""

from __future__ import annotations

import hashlib
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from occscene_pl.data.nuscenes_occupancy import (
    CAMERA_NAMES,
    NUSCENES_OCCUPANCY_CLASSES,
    POINT_CLOUD_RANGE,
    load_infos,
    write_sparse_occupancy,
)
from occscene_pl.files import atomic_write
from occscene_pl.native_export.common import (
    EXPORT_SPLITS,
    check_image_size,
    check_split,
    png_bytes,
    rebased_transform,
    record_size,
)
from occscene_pl.native_export.pickles import load_info_pickle
from occscene_pl.native_export.resample import fit_view
from occscene_pl.samples import GeneratedSample

__all__ = ["NUSCENES_CAMERA_KEYS", "NUSCENES_INFO_KEYS", "NuScenesOccupancyExporter", "quaternion_wxyz"]

# Every info key read by OpenOccupancy's NuscOCCDataset.get_data_info, its CustomNuScenesDataset and mmdet3d's
# NuScenesDataset (load_annotations, get_ann_info, get_cat_ids).
NUSCENES_INFO_KEYS: tuple[str, ...] = (
    "token",
    "lidar_path",
    "lidar_token",
    "sweeps",
    "cams",
    "lidar2ego_translation",
    "lidar2ego_rotation",
    "ego2global_translation",
    "ego2global_rotation",
    "timestamp",
    "prev",
    "next",
    "scene_token",
    "can_bus",
    "frame_idx",
    "lidarseg",
    "gt_boxes",
    "gt_names",
    "gt_velocity",
    "num_lidar_pts",
    "num_radar_pts",
    "valid_flag",
)
# Every camera key read by those and by OpenOccupancy's LoadMultiViewImageFromFiles_BEVDet (also in sequential mode)
# and tools/gen_data/gen_depth_gt.py.
NUSCENES_CAMERA_KEYS: tuple[str, ...] = (
    "data_path",
    "type",
    "sample_data_token",
    "sensor2ego_translation",
    "sensor2ego_rotation",
    "ego2global_translation",
    "ego2global_rotation",
    "timestamp",
    "sensor2lidar_rotation",
    "sensor2lidar_translation",
    "cam_intrinsic",
)
_CAN_BUS_LENGTH = 18  # nuScenes infos' can_bus: position (3), orientation (4), ..., patch angle (rad, deg)
_IDENTITY_QUATERNION = (1.0, 0.0, 0.0, 0.0)  # w, x, y, z


def quaternion_wxyz(rotation: np.ndarray) -> list[float]:
    """The unit quaternion ``[w, x, y, z]`` (nuScenes / pyquaternion order, ``w >= 0``) of a ``(3, 3)`` rotation.

    Shepperd's method on the nearest rotation (SVD), so float32 round-off in the input does not matter.
    """
    u, _, vt = np.linalg.svd(np.asarray(rotation, dtype=np.float64))
    r = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
    trace = np.trace(r)
    if trace > 0:
        s = 2.0 * np.sqrt(1.0 + trace)
        q = np.array([s / 4, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s])
    else:
        i = int(np.argmax(np.diag(r)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + r[i, i] - r[j, j] - r[k, k])
        q = np.zeros(4)
        q[0] = (r[k, j] - r[j, k]) / s
        q[1 + i] = s / 4
        q[1 + j] = (r[j, i] + r[i, j]) / s
        q[1 + k] = (r[k, i] + r[i, k]) / s
    q /= np.linalg.norm(q)
    return [float(v) for v in (q if q[0] >= 0 else -q)]


@dataclass
class _NuScenesFrame:
    frame_id: str
    token: str
    labels: np.ndarray  # (X, Y, Z) uint8 train ids, 255 = unknown
    images: list[np.ndarray]  # 6 x (H, W, 3) uint8 in CAMERA_NAMES order
    intrinsics: np.ndarray  # (6, 3, 3)
    sensor_to_lidar: np.ndarray  # (6, 4, 4)


class NuScenesOccupancyExporter:
    """Writes generated six-camera samples into an OpenOccupancy tree (layout and placeholders in the module docstring).

    Use :meth:`prepare` (validates and converts; writes nothing), :meth:`write` per frame, then :meth:`finalize`
    once all frames are written (it builds ``nuscenes_occ_infos_<split>.pkl``).

    Args:
        root: the export root, e.g. ``<output_dir>/nuscenes_occupancy``; use it as OpenOccupancy's ``data/`` folder.
        split: ``"train"`` (``nuscenes_occ_infos_train.pkl``, to augment a training set) or ``"val"``.
        image_size: ``(W, H)`` to resample the views to (:func:`fit_view`), e.g. ``(1600, 900)`` for nuScenes'
            camera size; ``None`` keeps the generated size (OpenOccupancy resizes any size to its input size).

    Raises:
        ValueError: a bad ``split`` or ``image_size`` (naming the option).
    """

    name = "nuscenes_occupancy"
    DATA_VERSION = "v1.0-trainval"  # where nuScenes keeps lidarseg files; the infos' metadata says occscene-generated
    FORMAT = 2  # layout version in the export record; older records (no peer keys) are re-written

    def __init__(self, root: str | Path, split: str = "val", image_size: Sequence[int] | None = None) -> None:
        """Check the options (see the class docstring); nothing is written yet."""
        self.root = Path(root)
        self.split = check_split(split, "nuscenes_occupancy split")
        self.image_size = check_image_size(image_size, "nuscenes_occupancy image_size")
        self.data_root = self.root / "nuscenes"
        self.occupancy_root = self.root / "nuScenes-Occupancy"
        self.depth_root = self.root / "depth_gt"
        self.info_root = self.data_root / "occscene_infos"
        self.info_dir = self.info_root / self.split
        self.info_file = self.info_path(self.split)

    def info_path(self, split: str) -> Path:
        """``<root>/nuscenes/nuscenes_occ_infos_<split>.pkl``."""
        return self.data_root / f"nuscenes_occ_infos_{split}.pkl"

    @staticmethod
    def token(frame_id: str, kind: str = "sample") -> str:
        """A 32-hex-digit nuScenes-style token of ``frame_id`` for ``kind`` (sample, scene, lidar, a camera)."""
        return hashlib.sha256(f"{kind}/{frame_id}".encode()).hexdigest()[:32]

    def prepare(self, sample: GeneratedSample) -> _NuScenesFrame:
        """Check that a sample fits the OpenOccupancy layout and convert it; nothing is written.

        Args:
            sample: the generated sample, with ``V == 6`` views in ``CAMERA_NAMES`` order (its ``frame_id`` derives
                the tokens).

        Raises:
            ValueError: naming the frame and the requirement it breaks.
        """
        frame_id, labels, image, voxel_size = sample.frame_id, sample.labels, sample.pixels, sample.voxel_size
        intrinsics, voxel_to_camera, voxel_origin = sample.intrinsics, sample.voxel_to_camera, sample.voxel_origin
        what = f"nuscenes_occupancy export of frame {frame_id!r}"
        if image.shape[0] != len(CAMERA_NAMES):
            raise ValueError(
                f"{what}: nuScenes frames have {len(CAMERA_NAMES)} cameras {list(CAMERA_NAMES)}, "
                f"the sample has {image.shape[0]} view(s)"
            )
        extent = np.subtract(POINT_CLOUD_RANGE[3:], POINT_CLOUD_RANGE[:3])
        sizes = extent / np.asarray(labels.shape, dtype=np.float64)
        if not np.allclose(sizes, voxel_size, rtol=1e-4, atol=0.0):
            raise ValueError(
                f"{what}: grid {labels.shape} with voxel_size {voxel_size} m does not cover the OpenOccupancy range "
                f"{POINT_CLOUD_RANGE} with cubic voxels (need 102.4 / X == 102.4 / Y == 8 / Z == voxel_size)"
            )
        known = labels[labels != 255]
        if known.size and int(known.max()) >= len(NUSCENES_OCCUPANCY_CLASSES):
            raise ValueError(
                f"{what}: label {int(known.max())} is not a nuScenes-Occupancy train id "
                f"(0..{len(NUSCENES_OCCUPANCY_CLASSES) - 1} or 255)"
            )
        to_lidar = np.stack(
            [
                np.linalg.inv(rebased_transform(transform, voxel_origin, POINT_CLOUD_RANGE[:3], what))
                for transform in voxel_to_camera
            ]
        )
        views, ks = list(image), [np.asarray(k, dtype=np.float64) for k in intrinsics]
        if self.image_size is not None:
            fitted = [fit_view(view, k, self.image_size) for view, k in zip(views, ks, strict=True)]
            views, ks = [view for view, _ in fitted], [k for _, k in fitted]
        return _NuScenesFrame(frame_id, self.token(frame_id), labels, views, np.stack(ks), to_lidar)

    def write(self, frame: _NuScenesFrame) -> dict[str, Any]:
        """Write one prepared frame: images, placeholders, occupancy, and its info last, every file atomically.

        Returns:
            the frame's ``token`` (the reader's ``frame_id``), ``split``, ``image_size`` (the option), ``format``
            (:attr:`FORMAT`), and ``files``:
            six images, six ``depth_gt`` files, the point-cloud and lidarseg placeholders, the occupancy ``.npy`` and
            the frame's info pickle.

        Raises:
            ValueError: another frame_id already owns this token (a SHA-256 collision).
        """
        info_path = self.info_dir / f"{frame.token}.pkl"
        for split in EXPORT_SPLITS:
            other = self.info_root / split / info_path.name
            if other.is_file():
                owner = self._read_info(other).get("occscene_frame_id")
                if owner != frame.frame_id:
                    raise ValueError(
                        f"nuscenes_occupancy export: token {frame.token} of frame {frame.frame_id!r} is owned by "
                        f"{owner!r}"
                    )
        scene_token, lidar_token = self.token(frame.frame_id, "scene"), self.token(frame.frame_id, "lidar")
        timestamp = time.time_ns() // 1000  # microseconds, as nuScenes; infos are read in this order
        files: list[Path] = []
        cams: dict[str, dict[str, Any]] = {}
        self.depth_root.mkdir(parents=True, exist_ok=True)
        for view, camera in enumerate(CAMERA_NAMES):
            image_name = f"{frame.token}__{camera}.png"
            path = self.data_root / "samples" / camera / image_name
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, png_bytes(frame.images[view]))
            depth = self.depth_root / f"{image_name}.bin"  # gen_depth_gt.py's name: <image file name>.bin
            atomic_write(depth, np.zeros((0, 3), dtype=np.float32).tobytes())
            files += [path, depth]
            rotation = frame.sensor_to_lidar[view, :3, :3].copy()
            translation = frame.sensor_to_lidar[view, :3, 3].copy()
            cams[camera] = {
                "data_path": f"./data/nuscenes/samples/{camera}/{image_name}",
                "type": camera,
                "sample_data_token": self.token(frame.frame_id, camera),
                # Placeholders: the LiDAR frame is the ego frame and the ego sits at the global origin.
                "sensor2ego_translation": translation.tolist(),
                "sensor2ego_rotation": quaternion_wxyz(rotation),
                "ego2global_translation": [0.0, 0.0, 0.0],
                "ego2global_rotation": list(_IDENTITY_QUATERNION),
                "timestamp": timestamp,
                "sensor2lidar_rotation": rotation,
                "sensor2lidar_translation": translation,
                "cam_intrinsic": frame.intrinsics[view].copy(),
            }
        lidar_name = f"{lidar_token}.pcd.bin"
        lidar = self.data_root / "samples" / "LIDAR_TOP" / lidar_name
        lidarseg_rel = f"lidarseg/{self.DATA_VERSION}/{lidar_token}_lidarseg.bin"
        lidarseg = self.data_root / lidarseg_rel
        for path in (lidar, lidarseg):  # placeholders: no points (x, y, z, intensity, ring float32 / uint8 labels)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, b"")
        files += [lidar, lidarseg]
        occupancy = self.occupancy_root / f"scene_{scene_token}" / "occupancy" / f"{lidar_token}.npy"
        write_sparse_occupancy(occupancy, frame.labels)
        files.append(occupancy)
        info = {
            "token": frame.token,
            "lidar_path": f"./data/nuscenes/samples/LIDAR_TOP/{lidar_name}",
            "lidar_token": lidar_token,
            "sweeps": [],
            "cams": cams,
            "lidar2ego_translation": [0.0, 0.0, 0.0],
            "lidar2ego_rotation": list(_IDENTITY_QUATERNION),
            "ego2global_translation": [0.0, 0.0, 0.0],
            "ego2global_rotation": list(_IDENTITY_QUATERNION),
            "timestamp": timestamp,
            "prev": "",
            "next": "",
            "scene_token": scene_token,
            "can_bus": np.zeros(_CAN_BUS_LENGTH),
            "frame_idx": 0,
            "lidarseg": lidarseg_rel,
            "gt_boxes": np.zeros((0, 7)),
            "gt_names": np.zeros(0, dtype="<U20"),
            "gt_velocity": np.zeros((0, 2)),
            "num_lidar_pts": np.zeros(0, dtype=np.int64),
            "num_radar_pts": np.zeros(0, dtype=np.int64),
            "valid_flag": np.zeros(0, dtype=bool),
            "occscene_frame_id": frame.frame_id,
        }
        self.info_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(info_path, pickle.dumps(info, protocol=pickle.HIGHEST_PROTOCOL))
        for split in EXPORT_SPLITS:  # a frame re-written into another split leaves the old one
            if split != self.split:
                (self.info_root / split / info_path.name).unlink(missing_ok=True)
        files.append(info_path)
        return {
            "token": frame.token,
            "split": self.split,
            "image_size": record_size(self.image_size),
            "format": self.FORMAT,
            "files": files,
        }

    def matches(self, record: Any) -> bool:
        """Whether a frame's export ``record`` (as :meth:`write` returned it) was written with these options."""
        return (
            isinstance(record, dict)
            and record.get("format") == self.FORMAT
            and record.get("split") == self.split
            and record.get("image_size") == record_size(self.image_size)
        )

    def finalize(self) -> Path | None:
        """Rebuild ``nuscenes_occ_infos_<split>.pkl`` of every split from its frames' infos (atomically).

        A split left without frames (all moved to the other split) loses its pickle. Call it once all ranks have
        written (the prediction writer does, on rank 0, when predict ends). Each result is checked by loading it
        back with the reader's :func:`~occscene_pl.data.nuscenes_occupancy.load_infos`.

        Returns:
            this exporter's split's pickle, or ``None`` if that split has no frames.
        """
        built: dict[str, Path] = {}
        for split in EXPORT_SPLITS:
            info_dir, info_file = self.info_root / split, self.info_path(split)
            paths = sorted(info_dir.glob("*.pkl")) if info_dir.is_dir() else []
            if not paths:
                if info_dir.is_dir():
                    info_file.unlink(missing_ok=True)
                continue
            infos = [self._read_info(path) for path in paths]
            data = {"infos": infos, "metadata": {"version": "occscene-generated", "generator": "occscene-pl"}}
            atomic_write(info_file, pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
            load_infos(info_file, CAMERA_NAMES)
            built[split] = info_file
        return built.get(self.split)

    @staticmethod
    def _read_info(path: Path) -> dict[str, Any]:
        try:
            info = load_info_pickle(path)
        except ValueError as err:
            raise ValueError(f"nuscenes_occupancy export: frame info {path} is not readable ({err})") from err
        if not isinstance(info, dict):
            raise ValueError(f"nuscenes_occupancy export: frame info {path} holds a {type(info).__name__}, not a dict")
        return info
