"""Write a fake nuScenes-Occupancy (OpenOccupancy v0.1) dataset in the real on-disk format.

What is written (``docs/design.md`` §8.3)::

    <root>/nuscenes_occ_infos_<split>.pkl           {'infos': [...], 'metadata': {'version': 'v1.0-trainval'}}
    <root>/samples/CAM_*/<log>__CAM_*__<timestamp>.jpg    one JPEG per camera and frame (data_path in the pickle is
                                                          the released form ./data/nuscenes/samples/CAM_*/...)
    <occupancy_root>/scene_<scene_token>/occupancy/<lidar_token>.npy   int64 (N, 4) rows [z, y, x, cls]

The rig is nuScenes-like: LIDAR_TOP with x right, y forward, z up (``lidar2ego`` is a -90 degree yaw), six cameras
looking out at yaw 0, +-55, +-110 and 180 degrees of the ego frame, with nuScenes' approximate mounting positions and
intrinsics (scaled to the image size). ``sensor2lidar_*`` follow mmdet3d's ``obtain_sensor2top`` (camera pose at the
camera's own timestamp, so the ego moves a few centimetres between LiDAR and camera). Every camera's image is filled
with its own colour (:data:`CAMERA_COLORS`) so tests can check the view order. Infos are written in shuffled order.

The ground truth is a small street (road along the LiDAR y axis, sidewalks, terrain, buildings, vegetation, cars) at
any grid size, with a sprinkling of noise voxels (file label 0). Its dense form is computed here without the reader.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["CAMERA_COLORS", "CAMERA_RIG", "LIDAR_TO_EGO_TRANSLATION", "write_fake_nuscenes_occupancy"]

LOG_NAME = "n015-2018-07-18-11-07-57+0800"
LIDAR_TO_EGO_TRANSLATION = (0.943713, 0.0, 1.84023)
# Yaw of -90 degrees about z: LiDAR x = ego right, LiDAR y = ego forward (nuScenes LIDAR_TOP).
LIDAR_TO_EGO_ROTATION = (np.sqrt(0.5), 0.0, 0.0, -np.sqrt(0.5))

# name: (translation in ego (x forward, y left, z up), yaw in degrees, fx=fy, cx, cy at 1600 x 900).
# In mmdet3d's info-dict order (FRONT, FRONT_RIGHT, FRONT_LEFT, BACK, BACK_LEFT, BACK_RIGHT), as released pickles.
CAMERA_RIG: dict[str, tuple[tuple[float, float, float], float, float, float, float]] = {
    "CAM_FRONT": ((1.70079, 0.01594, 1.51095), 0.0, 1266.42, 816.27, 491.51),
    "CAM_FRONT_RIGHT": ((1.55085, -0.49340, 1.49575), -55.0, 1260.85, 807.97, 495.33),
    "CAM_FRONT_LEFT": ((1.52150, 0.49471, 1.50952), 55.0, 1272.60, 826.62, 479.75),
    "CAM_BACK": ((0.02832, 0.00345, 1.57910), 180.0, 809.22, 829.22, 481.77),
    "CAM_BACK_LEFT": ((1.03570, 0.48480, 1.59097), 110.0, 1256.75, 817.79, 451.95),
    "CAM_BACK_RIGHT": ((1.01487, -0.48081, 1.56239), -110.0, 1259.51, 807.25, 501.20),
}
CAMERA_COLORS: dict[str, tuple[int, int, int]] = {
    "CAM_FRONT_LEFT": (220, 40, 40),
    "CAM_FRONT": (40, 220, 40),
    "CAM_FRONT_RIGHT": (40, 40, 220),
    "CAM_BACK_LEFT": (220, 220, 40),
    "CAM_BACK": (220, 40, 220),
    "CAM_BACK_RIGHT": (40, 220, 220),
}
FULL_SIZE = (1600, 900)
RANGE_LOW = np.array([-51.2, -51.2, -5.0])
RANGE_HIGH = np.array([51.2, 51.2, 3.0])
FRAMES_PER_SCENE = 3
EGO_SPEED = 5.0  # m/s along the ego heading


def _yaw(degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _quaternion_to_matrix(q: Sequence[float]) -> np.ndarray:
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _matrix_to_quaternion(m: np.ndarray) -> list[float]:
    """(w, x, y, z) of a rotation matrix (Shepperd's method, robust for 180 degree turns)."""
    trace = np.trace(m)
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    return [float(v) for v in q]


def _transform(rotation: np.ndarray, translation: Sequence[float]) -> np.ndarray:
    t = np.eye(4)
    t[:3, :3] = rotation
    t[:3, 3] = translation
    return t


def _camera_to_ego(yaw_degrees: float) -> np.ndarray:
    # Camera axes (x right, y down, z forward) in the ego frame of a camera looking along ego +x, then yawed.
    base = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    return _yaw(yaw_degrees) @ base


def _ego_pose(timestamp: int, start: int, heading: float, origin: np.ndarray) -> tuple[list[float], list[float]]:
    """ego2global (translation, quaternion) of an ego driving straight at EGO_SPEED from ``origin``."""
    distance = EGO_SPEED * (timestamp - start) * 1e-6
    rotation = _yaw(heading)
    translation = origin + rotation @ np.array([distance, 0.0, 0.0])
    return [float(v) for v in translation], _matrix_to_quaternion(rotation)


def _dense_scene(rng: np.random.Generator, grid_size: Sequence[int]) -> np.ndarray:
    """A street in the LiDAR frame (y forward): road, sidewalks, terrain, walls, trees, cars and noise."""
    grid = tuple(int(n) for n in grid_size)
    voxel = (RANGE_HIGH - RANGE_LOW) / np.asarray(grid)
    centres = [RANGE_LOW[a] + voxel[a] * (np.arange(grid[a]) + 0.5) for a in range(3)]
    x = centres[0][:, None]  # across the street
    y = centres[1][None, :]  # along the street
    dense = np.zeros(grid, dtype=np.uint8)
    ground = min(max(int((-1.84 - RANGE_LOW[2]) / voxel[2]), 0), grid[2] - 1)
    lateral = np.abs(x) + 0.0 * y
    ground_labels = np.where(lateral < 8.0, 11, np.where(lateral < 11.0, 13, 14))  # driveable, sidewalk, terrain
    dense[:, :, ground] = ground_labels
    above = slice(ground + 1, min(ground + 1 + max(1, int(round(6.0 / voxel[2]))), grid[2]))
    walls = (lateral >= 14.0) & (lateral < 17.0) & (np.sin(y / 7.0) > -0.3)
    dense[:, :, above][walls] = 15  # manmade
    trees = (lateral >= 11.5) & (lateral < 13.0) & (np.cos(y / 3.0) > 0.6)
    dense[:, :, above][trees] = 16  # vegetation
    for _ in range(4):
        cx, cy = rng.uniform(-6.0, 6.0), rng.uniform(-40.0, 40.0)
        car = (np.abs(x - cx) < 1.0) & (np.abs(y - cy) < 2.2)
        top = min(ground + 1 + max(1, int(round(1.6 / voxel[2]))), grid[2])
        dense[:, :, ground + 1 : top][car] = 4
    noise = rng.random(grid) < 0.002
    dense[noise] = 255
    return dense


def _sparse_rows(dense: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows ``[z, y, x, cls]`` (int64, label 0 = noise) of every non-free voxel, in random order."""
    index = np.argwhere(dense)  # (N, 3) [x, y, z]
    labels = dense[tuple(index.T)].astype(np.int64)
    labels[labels == 255] = 0
    rows = np.concatenate([index[:, ::-1], labels[:, None]], axis=1).astype(np.int64)
    return rows[rng.permutation(len(rows))]


def _token(rng: np.random.Generator) -> str:
    return rng.bytes(16).hex()


def _write_image(path: Path, size: Sequence[int], color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (int(size[0]), int(size[1])), color).save(path, format="JPEG", quality=95)


def write_fake_nuscenes_occupancy(
    root: str | Path,
    occupancy_root: str | Path,
    split_counts: Mapping[str, int] | None = None,
    grid_size: Sequence[int] = (64, 64, 5),
    image_size: Sequence[int] = (160, 90),
    seed: int = 0,
) -> dict[str, Any]:
    """Write a fake nuScenes-Occupancy dataset (info pickles, JPEGs, sparse ground truth).

    Args:
        root: nuScenes root (pickles and ``samples/``).
        occupancy_root: nuScenes-Occupancy root (``scene_<token>/occupancy/<lidar_token>.npy``).
        split_counts: frames per split; default ``{"train": 2, "val": 2}``.
        grid_size: ``(X, Y, Z)`` of the ground truth; cubic voxels over the range need ``X : Z = 102.4 : 8``.
        image_size: ``(W, H)`` of every JPEG; intrinsics are nuScenes' scaled from 1600 x 900.
        seed: seed of tokens, timestamps, shuffling and scene content.

    Returns:
        ``{"info_paths": {split: Path}, "infos": {split: [info, ...]}, "occupancy": {split: [(X, Y, Z) uint8]},
        "occupancy_paths": {split: [Path]}}``, lists in timestamp order; ``occupancy`` is the expected dense grid
        (0 free, 1-16 classes, 255 noise).
    """
    root, occupancy_root = Path(root), Path(occupancy_root)
    counts = dict(split_counts) if split_counts is not None else {"train": 2, "val": 2}
    rng = np.random.default_rng(seed)
    width, height = int(image_size[0]), int(image_size[1])
    sx, sy = width / FULL_SIZE[0], height / FULL_SIZE[1]
    lidar_to_ego = _transform(_quaternion_to_matrix(LIDAR_TO_EGO_ROTATION), LIDAR_TO_EGO_TRANSLATION)
    result: dict[str, Any] = {"info_paths": {}, "infos": {}, "occupancy": {}, "occupancy_paths": {}}
    clock = 1531883530449377 + int(rng.integers(0, 10**9))
    for split, count in sorted(counts.items()):
        infos: list[dict[str, Any]] = []
        dense_grids: list[np.ndarray] = []
        paths: list[Path] = []
        scene_token = ""
        for frame in range(count):
            if frame % FRAMES_PER_SCENE == 0:
                scene_token, scene_start = _token(rng), clock
                heading = float(rng.uniform(-180, 180))
                origin = np.array([rng.uniform(300, 1900), rng.uniform(600, 1700), 0.0])
            clock += 500_000  # keyframes at 2 Hz
            timestamp = clock
            lidar_token = _token(rng)
            ego_t, ego_q = _ego_pose(timestamp, scene_start, heading, origin)
            lidar_to_global = _transform(_quaternion_to_matrix(ego_q), ego_t) @ lidar_to_ego
            cams: dict[str, dict[str, Any]] = {}
            for name, (position, yaw, focal, cx, cy) in CAMERA_RIG.items():
                cam_time = timestamp + int(rng.integers(-20_000, 20_000))  # cameras fire around the LiDAR sweep
                cam_ego_t, cam_ego_q = _ego_pose(cam_time, scene_start, heading, origin)
                cam_to_ego = _transform(_camera_to_ego(yaw), position)
                cam_to_global = _transform(_quaternion_to_matrix(cam_ego_q), cam_ego_t) @ cam_to_ego
                cam_to_lidar = np.linalg.inv(lidar_to_global) @ cam_to_global
                file_name = f"{LOG_NAME}__{name}__{cam_time}.jpg"
                _write_image(root / "samples" / name / file_name, (width, height), CAMERA_COLORS[name])
                cams[name] = {
                    "data_path": f"./data/nuscenes/samples/{name}/{file_name}",
                    "type": name,
                    "sample_data_token": _token(rng),
                    "sensor2ego_translation": list(position),
                    "sensor2ego_rotation": _matrix_to_quaternion(cam_to_ego[:3, :3]),
                    "ego2global_translation": cam_ego_t,
                    "ego2global_rotation": cam_ego_q,
                    "timestamp": cam_time,
                    "sensor2lidar_rotation": cam_to_lidar[:3, :3].copy(),  # p_lidar = p_cam @ R.T + t
                    "sensor2lidar_translation": cam_to_lidar[:3, 3].copy(),
                    "cam_intrinsic": np.array([[focal * sx, 0, cx * sx], [0, focal * sy, cy * sy], [0, 0, 1.0]]),
                }
            sweeps = []
            for back in (1, 2):
                sweep_time = timestamp - back * 50_000
                sweep_t, sweep_q = _ego_pose(sweep_time, scene_start, heading, origin)
                sweep_to_global = _transform(_quaternion_to_matrix(sweep_q), sweep_t) @ lidar_to_ego
                sweep_to_lidar = np.linalg.inv(lidar_to_global) @ sweep_to_global
                sweeps.append(
                    {
                        "data_path": f"./data/nuscenes/sweeps/LIDAR_TOP/{LOG_NAME}__LIDAR_TOP__{sweep_time}.pcd.bin",
                        "type": "lidar",
                        "sample_data_token": _token(rng),
                        "sensor2ego_translation": list(LIDAR_TO_EGO_TRANSLATION),
                        "sensor2ego_rotation": list(LIDAR_TO_EGO_ROTATION),
                        "ego2global_translation": sweep_t,
                        "ego2global_rotation": sweep_q,
                        "timestamp": sweep_time,
                        "sensor2lidar_rotation": sweep_to_lidar[:3, :3].copy(),
                        "sensor2lidar_translation": sweep_to_lidar[:3, 3].copy(),
                    }
                )
            infos.append(
                {
                    "token": _token(rng),
                    "lidar_path": f"./data/nuscenes/samples/LIDAR_TOP/{LOG_NAME}__LIDAR_TOP__{timestamp}.pcd.bin",
                    "sweeps": sweeps,
                    "lidar2ego_translation": list(LIDAR_TO_EGO_TRANSLATION),
                    "lidar2ego_rotation": list(LIDAR_TO_EGO_ROTATION),
                    "ego2global_translation": ego_t,
                    "ego2global_rotation": ego_q,
                    "prev": "",
                    "next": "",
                    "scene_token": scene_token,
                    "can_bus": np.concatenate([ego_t, ego_q, rng.normal(size=9), [0.0, 0.0]]),  # 18 values
                    "timestamp": timestamp,
                    "lidar_token": lidar_token,
                    "lidarseg": f"lidarseg/v1.0-trainval/{lidar_token}_lidarseg.bin",
                    "cams": cams,
                }
            )
            dense = _dense_scene(rng, grid_size)
            path = occupancy_root / f"scene_{scene_token}" / "occupancy" / f"{lidar_token}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, _sparse_rows(dense, rng))
            dense_grids.append(dense)
            paths.append(path)
        for previous, current in zip(infos[:-1], infos[1:], strict=True):
            if previous["scene_token"] == current["scene_token"]:
                previous["next"], current["prev"] = current["token"], previous["token"]
        order = rng.permutation(count)
        if count > 1 and np.array_equal(order, np.arange(count)):
            order = order[::-1]  # the pickle must not already be sorted, or sorting goes untested
        info_path = root / f"nuscenes_occ_infos_{split}.pkl"
        info_path.parent.mkdir(parents=True, exist_ok=True)
        with info_path.open("wb") as handle:
            pickle.dump({"infos": [infos[i] for i in order], "metadata": {"version": "v1.0-trainval"}}, handle)
        result["info_paths"][split] = info_path
        result["infos"][split] = infos
        result["occupancy"][split] = dense_grids
        result["occupancy_paths"][split] = paths
    return result
