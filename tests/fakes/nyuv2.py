"""Fake NYUv2 scenes (MonoScene's release of the SSCNet data) in the real on-disk format, written at test time.

Each scene is ``NYU<split>/NYUxxxx_0000.bin`` (SSCNet RLE: float32[3] origin, float32[16] camera-to-world pose,
uint32 ``(value, run)`` pairs) and ``NYUxxxx_0000_color.jpg``. The RLE encoder here is written independently of
:func:`occscene_pl.data.nyuv2.write_sscnet_bin`, and :data:`RAW_TO_NYU12` is a hand-copied excerpt of the class map of
``docs/design.md`` §8.2, so the tests do not check the reader against its own code.

Scenes are small rooms in file axis order ``[world X, world Z (up), world Y]``: a floor, a ceiling, walls with a
window, furniture boxes at arbitrary (not block-aligned) positions and an unobserved (255) strip, seen by a camera
standing near the ``y = 0`` side, looking along world +Y and slightly down.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

NYU_K = np.array([[518.8579, 0.0, 320.0], [0.0, 518.8579, 240.0], [0.0, 0.0, 1.0]])

# SSCNet raw id -> NYUv2 12-class id for the ids the fakes use (``docs/design.md`` §8.2).
RAW_TO_NYU12: dict[int, int] = {
    0: 0,
    1: 1,
    2: 2,
    3: 3,
    4: 4,
    5: 11,
    6: 5,
    7: 6,
    8: 7,
    9: 8,
    11: 10,
    16: 9,
    30: 8,
    33: 9,
    36: 11,
    255: 255,
}
FURNITURE_IDS = (5, 6, 7, 8, 9, 11, 16, 30, 33, 36)


def expected_nyu12(raw: np.ndarray) -> np.ndarray:
    """Map raw SSCNet ids through :data:`RAW_TO_NYU12` (raises on ids outside it)."""
    table = np.full(256, 254, dtype=np.uint8)  # 254 flags ids the table does not cover
    for raw_id, nyu_id in RAW_TO_NYU12.items():
        table[raw_id] = nyu_id
    out = table[raw]
    if (out == 254).any():
        raise ValueError("raw ids outside RAW_TO_NYU12")
    return out


def encode_rle(origin: np.ndarray, cam_pose: np.ndarray, labels37: np.ndarray) -> bytes:
    """SSCNet ``.bin`` bytes of a grid in file order: header, then ``(value, run)`` uint32 pairs of C-order runs."""
    flat = np.asarray(labels37).reshape(-1).astype(np.int64)
    boundaries = np.flatnonzero(np.diff(flat)) + 1
    starts = np.r_[0, boundaries]
    ends = np.r_[boundaries, flat.size]
    pairs = np.stack([flat[starts], ends - starts], axis=1).astype("<u4")
    header = np.r_[np.asarray(origin, np.float64).reshape(3), np.asarray(cam_pose, np.float64).reshape(16)]
    return header.astype("<f4").tobytes() + pairs.tobytes()


def fake_camera_pose(origin: np.ndarray, extent: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Camera -> world ``(4, 4)``: near the ``y = 0`` side of the grid, looking along +Y, pitched ~10 degrees down.

    Camera axes are x right, y down, z forward; with no rotation, camera x = world +X, y = world -Z, z = world +Y.
    """
    base = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # columns: camera axes in world
    pitch = -np.deg2rad(10.0 + rng.uniform(-3.0, 3.0))  # negative: forward tilts towards world -Z (down)
    yaw = np.deg2rad(rng.uniform(-8.0, 8.0))
    rot_x = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(pitch), -np.sin(pitch)], [0.0, np.sin(pitch), np.cos(pitch)]])
    rot_z = np.array([[np.cos(yaw), -np.sin(yaw), 0.0], [np.sin(yaw), np.cos(yaw), 0.0], [0.0, 0.0, 1.0]])
    pose = np.eye(4)
    pose[:3, :3] = rot_z @ base @ rot_x
    pose[:3, 3] = np.asarray(origin) + np.array([0.5 * extent[0], -0.3 * extent[1], 0.55 * extent[2]])
    return pose.astype(np.float32)


def fake_room(full_grid_size: Sequence[int], rng: np.random.Generator, boxes: int = 5) -> np.ndarray:
    """Raw SSCNet ids ``(A, H, B)`` in file order ``[world X, world Z, world Y]``."""
    a, h, b = (int(s) for s in full_grid_size)
    room = np.zeros((a, h, b), dtype=np.uint8)
    thick_h, thick_a, thick_b = max(1, h // 12), max(1, a // 16), max(1, b // 16)
    room[:, :thick_h, :] = 2  # floor
    room[:, h - thick_h :, :] = 1  # ceiling
    room[:, :, b - thick_b :] = 3  # far wall (world +Y)
    room[a - thick_a :, :, :] = 3  # right wall (world +X)
    room[a // 3 : a // 2, h // 3 : 2 * h // 3, b - thick_b :] = 4  # window in the far wall
    room[:thick_a, :, :] = 255  # unobserved strip beyond the left side
    for _ in range(boxes):
        size = rng.integers(
            [max(1, a // 10), max(1, h // 8), max(1, b // 10)], [max(2, a // 4), h // 2, max(2, b // 4)]
        )
        start = rng.integers([thick_a, thick_h, 0], [a - thick_a - size[0], h // 3, b - thick_b - size[2]])
        room[start[0] : start[0] + size[0], start[1] : start[1] + size[1], start[2] : start[2] + size[2]] = rng.choice(
            FURNITURE_IDS
        )
    return room


def fake_image(image_hw: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """``(H, W, 3)`` uint8: a smooth gradient plus noise (JPEG-friendly)."""
    height, width = image_hw
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / max(1, width - 1), yy / max(1, height - 1), 0.5 + 0 * xx], axis=-1) * 200
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def write_fake_scene(
    split_dir: str | Path,
    name: str,
    labels37: np.ndarray,
    origin: np.ndarray,
    cam_pose: np.ndarray,
    image: np.ndarray,
) -> None:
    """Write ``<split_dir>/<name>.bin`` and ``<split_dir>/<name>_color.jpg``."""
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / f"{name}.bin").write_bytes(encode_rle(origin, cam_pose, labels37))
    Image.fromarray(image).save(split_dir / f"{name}_color.jpg", quality=90)


def write_monoscene_pkl(
    preprocess_root: str | Path,
    split: str,
    name: str,
    data: Mapping[str, Any],
) -> Path:
    """Write MonoScene's ``<preprocess_root>/base/NYU<split>/<name>.pkl`` (a plain pickled dict)."""
    base = Path(preprocess_root) / "base" / f"NYU{split}"
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"{name}.pkl"
    with path.open("wb") as handle:
        pickle.dump(dict(data), handle)
    return path


def write_fake_nyuv2(
    root: str | Path,
    split_counts: Mapping[str, int] | None = None,
    grid_size: Sequence[int] = (8, 8, 4),
    seed: int = 0,
    image_size: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Write ``<root>/NYU<split>/NYUxxxx_0000.{bin,_color.jpg}`` scenes.

    Args:
        root: destination folder.
        split_counts: ``{split: number of scenes}``; defaults to ``{"train": 2, "test": 1}``.
        grid_size: ``(X, Y, Z)`` of the 1:4 target; the ``.bin`` holds ``(4X, 4Z, 4Y)`` voxels.
        seed: RNG seed.
        image_size: ``(H, W)`` of the JPEGs; ``None`` is 480 x 640 at the real grid ``(60, 60, 36)``, else 48 x 64.

    Returns:
        ``{"root", "grid_size", "image_size", "scenes": {split: [{"name", "bin", "color", "origin", "cam_pose",
        "labels37", "labels12"}]}}``; ``labels37`` / ``labels12`` are the full-resolution raw and mapped grids in file
        order, ``origin`` ``(3,)`` and ``cam_pose`` ``(4, 4)`` float32 as stored.
    """
    rng = np.random.default_rng(seed)
    split_counts = {"train": 2, "test": 1} if split_counts is None else split_counts
    x, y, z = (int(s) for s in grid_size)
    full = (4 * x, 4 * z, 4 * y)
    voxel_size = 0.08 * 60 / x
    extent = (x * voxel_size, y * voxel_size, z * voxel_size)
    if image_size is None:
        image_size = (480, 640) if (x, y, z) == (60, 60, 36) else (48, 64)
    scenes: dict[str, list[dict[str, Any]]] = {}
    index = 1
    for split, count in sorted(split_counts.items()):
        scenes[split] = []
        for _ in range(count):
            name = f"NYU{index:04d}_0000"
            index += 1
            origin = np.array([-1.5, 0.3, -0.05], np.float32) + rng.uniform(-0.5, 0.5, 3).astype(np.float32)
            pose = fake_camera_pose(origin, extent, rng)
            labels37 = fake_room(full, rng)
            split_dir = Path(root) / f"NYU{split}"
            write_fake_scene(split_dir, name, labels37, origin, pose, fake_image(image_size, rng))
            scenes[split].append(
                {
                    "name": name,
                    "bin": split_dir / f"{name}.bin",
                    "color": split_dir / f"{name}_color.jpg",
                    "origin": origin,
                    "cam_pose": pose,
                    "labels37": labels37,
                    "labels12": expected_nyu12(labels37),
                }
            )
    return {"root": Path(root), "grid_size": (x, y, z), "image_size": tuple(image_size), "scenes": scenes}
