"""The demo's sensors, ray cast from the voxel grid: KITTI sequence 00's camera and a simulated HDL-64E scan.

Images are rendered by :func:`occscene_pl.render.render_occupancy` with photo-like per-class colours, shading,
texture noise and random lighting, so image and occupancy agree by construction; the scan uses
:func:`occscene_pl.render.raycast`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from occscene_pl.data.demo.streets import EXTENT_M, VOXEL_ORIGIN
from occscene_pl.render import raycast, render_occupancy

__all__ = ["DEMO_COLORS", "demo_calibration", "lidar_scan", "render_demo_image"]

# Photo-like colours (RGB) of the rendered images: natural enough to read as a street, far enough apart that every
# class stays recognisable after shading, fog and noise. Pictures of occupancy use render.CLASS_COLORS_KITTI instead.
DEMO_COLORS = np.array(
    [
        [0, 0, 0],  # empty
        [40, 75, 170],  # car: blue paint
        [40, 190, 210],  # bicycle: cyan frame
        [60, 40, 90],  # motorcycle
        [210, 110, 30],  # truck: orange
        [235, 195, 50],  # other-vehicle: yellow bus
        [200, 60, 60],  # person: red jacket
        [200, 70, 170],  # bicyclist
        [120, 60, 150],  # motorcyclist
        [100, 85, 120],  # road: purple-grey asphalt
        [80, 110, 130],  # parking: blue-grey
        [215, 150, 175],  # sidewalk: pink paving
        [150, 140, 60],  # other-ground: khaki earth
        [185, 120, 95],  # building: terracotta
        [70, 150, 140],  # fence: teal paint
        [55, 135, 45],  # vegetation
        [100, 60, 25],  # trunk: bark
        [140, 190, 90],  # terrain: grass
        [210, 210, 215],  # pole: galvanised steel
        [230, 35, 35],  # traffic-sign: red
    ],
    dtype=np.uint8,
)
DEMO_COLORS.setflags(write=False)

# KITTI odometry sequence 00: left colour camera projection (image 1241 x 376) and velodyne -> camera-0 transform.
KITTI_00_P2 = np.array(
    [
        [7.188560000000e02, 0.0, 6.071928000000e02, 4.538225000000e01],
        [0.0, 7.188560000000e02, 1.852157000000e02, -1.130887000000e-01],
        [0.0, 0.0, 1.0, 3.779761000000e-03],
    ]
)
KITTI_00_IMAGE_SIZE = (376, 1241)  # (H, W)
KITTI_00_TR = np.array(
    [
        [4.276802385584e-04, -9.999672484946e-01, -8.084491683471e-03, -1.198459927713e-02],
        [-7.210626507497e-03, 8.081198471645e-03, -9.999413164504e-01, -5.403984729748e-02],
        [9.999738645903e-01, 4.859485810390e-04, -7.206933692422e-03, -2.921968648686e-01],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
# HDL-64E vertical field of view, for the simulated single scan that fills `voxels/*.bin`.
LIDAR_ELEVATION_DEG = (-24.8, 2.0)
LIDAR_BEAMS, LIDAR_AZIMUTHS = 64, 360


def demo_calibration(image_size: Sequence[int] = (128, 384)) -> tuple[np.ndarray, np.ndarray]:
    """KITTI sequence 00's rig for images of ``image_size``: ``P2`` (3, 4) and ``Tr`` (4, 4).

    ``P2`` keeps KITTI's horizontal field of view and square pixels (``fx = fy = 718.856 * W / 1241``) and the
    principal point's relative position in the image (pixel-centre convention); a taller aspect ratio than KITTI's
    therefore only widens the vertical field of view. ``Tr`` is sequence 00's velodyne -> camera transform.

    Args:
        image_size: ``(H, W)`` of the images.

    Returns:
        ``P2`` ``(3, 4)`` and ``Tr`` ``(4, 4)``, float64.

    Raises:
        ValueError: when ``image_size`` has a non-positive entry.
    """
    height, width = (int(s) for s in image_size)
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be (H, W) with positive entries, got {tuple(image_size)!r}")
    scale = width / KITTI_00_IMAGE_SIZE[1]
    cx = (KITTI_00_P2[0, 2] + 0.5) * scale - 0.5
    cy = (KITTI_00_P2[1, 2] + 0.5) * height / KITTI_00_IMAGE_SIZE[0] - 0.5
    # Pixel map KITTI -> demo image, applied to the whole 3x4 so the stereo column stays consistent.
    pixel_map = np.array([[scale, 0.0, cx - scale * KITTI_00_P2[0, 2]], [0.0, scale, cy - scale * KITTI_00_P2[1, 2]]])
    pixel_map = np.vstack([pixel_map, [0.0, 0.0, 1.0]])
    return pixel_map @ KITTI_00_P2, KITTI_00_TR.copy()


def render_demo_image(
    labels: np.ndarray, image_size: Sequence[int], rng: np.random.Generator, grid_size: Sequence[int] | None = None
) -> np.ndarray:
    """Render a demo frame through the demo camera with random lighting and texture noise.

    Args:
        labels: ``(X, Y, Z)`` train ids (full labels, before any invalid masking).
        image_size: ``(H, W)``.
        rng: generator of the lighting and the noise.
        grid_size: defaults to ``labels.shape``.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    grid = tuple(grid_size or labels.shape)
    p2, tr = demo_calibration(image_size)
    azimuth = float(rng.uniform(-0.8, 0.8))
    light = (np.cos(azimuth) * -0.45, np.sin(azimuth) * 0.45, 1.0)
    brightness = float(rng.uniform(0.88, 1.08))
    sky = np.clip(np.array([150.0, 185.0, 225.0]) * rng.uniform(0.9, 1.08, size=3), 0, 255)
    colors = np.clip(DEMO_COLORS.astype(np.float64) * brightness, 0, 255).astype(np.uint8)
    return render_occupancy(
        labels,
        VOXEL_ORIGIN,
        EXTENT_M[0] / grid[0],
        p2[:, :3],
        tr,
        image_size,
        colors=colors,
        sky_color=tuple(sky),
        light_direction=light,
        ambient=float(rng.uniform(0.4, 0.52)),
        texture_noise=0.05,
        rng=rng,
    )


def lidar_scan(labels: np.ndarray, voxel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Simulated HDL-64E scan from the LiDAR origin: voxels it hits (``.bin``) and voxels behind its first returns.

    Args:
        labels: ``(X, Y, Z)`` train ids over the KITTI extent; 0 is empty.
        voxel_size: voxel edge in metres.

    Returns:
        ``scan`` and ``occluded``, both ``(X, Y, Z)`` bool.
    """
    low, high = np.deg2rad(LIDAR_ELEVATION_DEG)
    elevation = np.linspace(low, high, LIDAR_BEAMS)
    azimuth = np.arange(LIDAR_AZIMUTHS) * (2 * np.pi / LIDAR_AZIMUTHS)
    el, az = np.meshgrid(elevation, azimuth, indexing="ij")
    directions = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=-1).reshape(-1, 3)
    hits = raycast(labels, VOXEL_ORIGIN, voxel_size, np.zeros(3), directions)
    scan = np.zeros(labels.shape, dtype=bool)
    voxels = hits.voxel[hits.hit]
    scan[voxels[:, 0], voxels[:, 1], voxels[:, 2]] = True

    # Depth test of every voxel centre against the range image of its nearest beam.
    ranges = hits.distance.reshape(LIDAR_BEAMS, LIDAR_AZIMUTHS)
    index = np.stack(np.meshgrid(*(np.arange(n) for n in labels.shape), indexing="ij"), axis=-1).reshape(-1, 3)
    centres = VOXEL_ORIGIN + (index + 0.5) * voxel_size
    distance = np.linalg.norm(centres, axis=1)
    voxel_el = np.arcsin(centres[:, 2] / distance)
    voxel_az = np.mod(np.arctan2(centres[:, 1], centres[:, 0]), 2 * np.pi)
    beam = np.round((voxel_el - low) / (high - low) * (LIDAR_BEAMS - 1)).astype(np.int64)
    column = np.round(voxel_az / (2 * np.pi) * LIDAR_AZIMUTHS).astype(np.int64) % LIDAR_AZIMUTHS
    in_view = (beam >= 0) & (beam < LIDAR_BEAMS)
    occluded = np.zeros(len(centres), dtype=bool)
    first_return = ranges[beam[in_view], column[in_view]]
    occluded[in_view] = distance[in_view] > first_return + voxel_size * np.sqrt(3) / 2
    return scan, occluded.reshape(labels.shape)
