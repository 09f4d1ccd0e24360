"""The embedded demo dataset: procedural street scenes in the real SemanticKITTI layout (``docs/design.md`` §8.5).

Every frame is a semantic voxel grid over the SemanticKITTI extent (x forward 0..51.2 m, y left -25.6..25.6 m, z up
-2..4.4 m, in the LiDAR frame) built from a random street layout: a straight or gently curved road, sometimes a cross
street, a median or a parking lot, sidewalks, building rows with gaps, green strips with trees and bushes, fences,
poles and traffic signs, parked and driving cars and the odd truck or pedestrian. Its image is rendered from the grid
through KITTI's sequence-00 rig (ray casting, per-class colours, shading, texture noise, random lighting), so image
and occupancy agree by construction. Frames are written as ``dataset/sequences/00`` (train) and ``08`` (val) and read
back by :class:`~occscene_pl.data.semantic_kitti.SemanticKittiDataset`, so the demo exercises the real reading path.

Generation is seeded per frame (the same seed gives byte-identical files on any number of workers) and atomic: it
writes into a temporary folder next to ``root`` that is renamed into place only when complete, with a
``manifest.json`` describing what was generated; a mismatched manifest triggers regeneration.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import occscene_pl
from occscene_pl.data.semantic_kitti import (
    SEMANTIC_KITTI_CLASSES,
    SemanticKittiDataModule,
    SemanticKittiDataset,
    train_to_raw,
    write_calib,
    write_voxel_frame,
)
from occscene_pl.render import raycast, render_occupancy

__all__ = [
    "DEMO_COLORS",
    "DemoDataModule",
    "demo_calibration",
    "generate_demo_dataset",
    "generate_street_scene",
    "render_demo_image",
]

C = {name: index for index, name in enumerate(SEMANTIC_KITTI_CLASSES)}
EMPTY, IGNORE = 0, 255

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
VOXEL_ORIGIN = np.array(SemanticKittiDataset.VOXEL_ORIGIN)
EXTENT_M = SemanticKittiDataset.SCENE_EXTENT_M
# The Velodyne HDL-64E sits 1.73 m above the road (KITTI setup); the ground layer is the one containing the road.
GROUND_Z_M = -1.73
# HDL-64E vertical field of view, for the simulated single scan that fills `voxels/*.bin`.
LIDAR_ELEVATION_DEG = (-24.8, 2.0)
LIDAR_BEAMS, LIDAR_AZIMUTHS = 64, 360

SPLIT_SEQUENCES = {"train": "00", "val": "08"}
MANIFEST = "manifest.json"
FRAME_STRIDE = 5  # SemanticKITTI labels every 5th scan: 000000, 000005, ...
FORMAT_NAME = "occscene-pl demo (SemanticKITTI layout)"


# ---------------------------------------------------------------------------------------------------------------
# Scene generation
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Grid:
    """Voxel-centre coordinates of a KITTI-extent grid and helpers to draw metric shapes into it."""

    labels: np.ndarray  # (X, Y, Z) uint8 train ids
    size: float  # voxel edge, metres
    x: np.ndarray  # (X, 1) centre x
    y: np.ndarray  # (1, Y) centre y
    ground: int  # index of the ground layer

    def layers(self, height: float) -> int:
        """Number of voxel layers an object of ``height`` metres stands above the ground layer (at least one)."""
        return max(1, int(round(height / self.size)))

    def extrude(self, footprint: np.ndarray, label: int, height: float, base: int | None = None) -> None:
        """Fill ``footprint`` (X, Y) from the layer above the ground (or ``base``) up by ``height`` metres."""
        start = self.ground + 1 if base is None else base
        stop = min(start + self.layers(height), self.labels.shape[2])
        if stop > start:
            self.labels[footprint, start:stop] = label


def _check_grid_size(grid_size: Sequence[int]) -> tuple[int, int, int]:
    if len(grid_size) != 3 or min(int(n) for n in grid_size) < 1:
        raise ValueError(f"grid_size must be three positive integers (X, Y, Z), got {tuple(grid_size)!r}")
    grid = (int(grid_size[0]), int(grid_size[1]), int(grid_size[2]))
    if not grid[0] == grid[1] == 8 * grid[2] or grid[2] < 2:
        raise ValueError(
            f"grid_size {grid} does not give isotropic voxels over the {EXTENT_M} m SemanticKITTI extent with room "
            "above the ground; expected X == Y == 8 * Z with Z >= 2, e.g. (64, 64, 8) or (256, 256, 32)"
        )
    return grid


def generate_street_scene(rng: np.random.Generator, grid_size: Sequence[int] = (64, 64, 8)) -> np.ndarray:
    """A random street scene as a semantic voxel grid over the SemanticKITTI extent.

    The ego car drives on the road at the origin, looking along ``+x``; the road surface is the ground layer (the
    layer containing z = -1.73 m, the road height below KITTI's LiDAR). Nothing floats: every object stands on the
    ground layer (tree canopies are carried by their trunks, signs by their poles).

    Args:
        rng: the random generator; the same state gives the same scene.
        grid_size: ``(X, Y, Z)`` with ``X == Y == 8 * Z`` (isotropic voxels of ``51.2 / X`` m).

    Returns:
        ``(X, Y, Z)`` uint8 train ids of :data:`~occscene_pl.data.semantic_kitti.SEMANTIC_KITTI_CLASSES`.
    """
    return _generate(rng, _check_grid_size(grid_size))[0]


def _generate(rng: np.random.Generator, grid_size: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The scene and its mask of never-observable voxels (building interiors and the space behind buildings)."""
    size = EXTENT_M[0] / grid_size[0]
    x = (np.arange(grid_size[0]) + 0.5)[:, None] * size + VOXEL_ORIGIN[0]
    y = (np.arange(grid_size[1]) + 0.5)[None, :] * size + VOXEL_ORIGIN[1]
    ground = int(np.floor((GROUND_Z_M - VOXEL_ORIGIN[2]) / size))
    g = _Grid(np.zeros(grid_size, dtype=np.uint8), size, x, y, ground)
    hidden = np.zeros(grid_size[:2], dtype=bool)  # (X, Y) columns never observed (behind buildings)

    # Road: centre line y_c(x) = offset + curvature * x^2 / 2; `e` is the lateral offset from it (left positive).
    road_width = float(rng.choice([7.0, 8.0, 10.0, 12.0, 14.0]))
    lanes = max(2, int(round(road_width / 3.5)))
    lane_width = road_width / lanes
    ego_lane = int(rng.integers(0, lanes))
    # The ego car (at y = 0) drives in the centre of one lane.
    offset = road_width / 2 - (ego_lane + 0.5) * lane_width
    curvature = float(rng.uniform(-0.005, 0.005)) if rng.random() < 0.4 else 0.0
    centre = offset + 0.5 * curvature * x**2  # (X, 1)
    e = y - centre  # (X, Y)
    along = np.broadcast_to(x, e.shape)
    half = road_width / 2

    ground_label = np.full(grid_size[:2], C["terrain"], dtype=np.uint8)
    road = np.abs(e) <= half
    ground_label[road] = C["road"]

    median = None
    # A median between the carriageways, only where the ego lane does not border it.
    if road_width >= 12.0 and lanes % 2 == 0 and abs(offset) > lane_width and rng.random() < 0.5:
        width = float(rng.uniform(1.2, 2.0))
        median = np.abs(e) <= width / 2
        ground_label[median] = C["other-ground"] if rng.random() < 0.5 else C["terrain"]

    cross = None
    if rng.random() < 0.3:
        cross_x, cross_width = float(rng.uniform(16.0, 38.0)), float(rng.uniform(7.0, 11.0))
        cross = np.abs(along - cross_x) <= cross_width / 2
        ground_label[cross] = C["road"]
        if median is not None:
            median &= ~cross
    reserved = road | (cross if cross is not None else False)  # (X, Y) ground no side zone may build on

    # Sidewalks: per side, from the road edge outwards; `side_e` is the outward offset from the road edge.
    sides = {}
    for sign in (1.0, -1.0):
        side_e = sign * e - half  # > 0 beyond this side's road edge
        has_walk = rng.random() < 0.85
        walk = float(rng.uniform(1.6, 4.0)) if has_walk else 0.0
        walk_mask = (side_e > 0) & (side_e <= walk) & ~reserved
        if cross is not None and has_walk:
            # Sidewalks also flank the cross street.
            walk_mask |= (side_e > 0) & (np.abs(along - cross_x) <= cross_width / 2 + walk) & ~cross
        ground_label[walk_mask] = C["sidewalk"]
        reserved = reserved | walk_mask
        sides[sign] = (side_e, walk, has_walk)

    g.labels[:, :, ground] = ground_label
    occupied = np.zeros(grid_size[:2], dtype=bool)  # footprints taken by objects above the ground
    if median is not None:
        occupied |= median  # no vehicle straddles it
    if median is not None and rng.random() < 0.6:
        # Scattered bushes on the median.
        bush = median & (rng.random(grid_size[:2]) < 0.5)
        g.extrude(bush, C["vegetation"], 0.8)
        occupied |= bush

    for side_e, walk, has_walk in sides.values():
        _side_zone(g, rng, (side_e > walk) & ~reserved, side_e, walk, has_walk, along, occupied, hidden)

    _vehicles(g, rng, e, along, half, lanes, lane_width, -offset, cross, occupied)
    _street_furniture(g, rng, sides, along, cross, occupied)

    invalid = _invalid_mask(g.labels, hidden, ground)
    return g.labels, invalid


def _side_zone(
    g: _Grid,
    rng: np.random.Generator,
    zone: np.ndarray,
    side_e: np.ndarray,
    walk: float,
    has_walk: bool,
    along: np.ndarray,
    occupied: np.ndarray,
    hidden: np.ndarray,
) -> None:
    """Fill ``zone``, one side of the road beyond its sidewalk: buildings, green, a fenced lot or a parking lot."""
    kind = rng.choice(["buildings", "green", "fenced", "parking"], p=[0.5, 0.25, 0.13, 0.12])
    ground = g.ground
    if kind == "buildings":
        setback = float(rng.uniform(0.0, 2.5))
        if setback > 0:
            g.labels[zone & (side_e <= walk + setback), ground] = C["sidewalk"] if has_walk else C["other-ground"]
        gap_class = C["terrain"] if rng.random() < 0.6 else C["other-ground"]
        g.labels[zone & (side_e > walk + setback), ground] = gap_class
        start = float(rng.uniform(-10.0, 6.0))
        while start < EXTENT_M[0]:
            length = float(rng.uniform(7.0, 22.0))
            depth = float(rng.uniform(7.0, 14.0))
            height = float(rng.uniform(3.0, 7.5))
            front = walk + setback + (float(rng.uniform(0.0, 2.0)) if rng.random() < 0.3 else 0.0)
            span = (along >= start) & (along < start + length)
            footprint = zone & span & (side_e > front) & (side_e <= front + depth)
            g.labels[footprint, ground] = C["building"]
            g.extrude(footprint, C["building"], height)
            occupied |= footprint
            hidden |= zone & span & (side_e > front + depth)
            gap = float(rng.uniform(2.0, 8.0)) if rng.random() < 0.55 else 0.0
            if gap > 0 and rng.random() < 0.4:
                gap_zone = zone & (along >= start + length) & (along < start + length + gap) & (side_e > front)
                _trees(g, rng, gap_zone & ~occupied, occupied, density=0.02)
            start += length + gap
    elif kind == "green":
        if rng.random() < 0.5:
            hedge = zone & (side_e <= walk + float(rng.uniform(0.8, 1.6)))
            g.extrude(hedge, C["vegetation"], float(rng.uniform(0.8, 1.8)))
            occupied |= hedge
        bushes = zone & ~occupied & (side_e > walk + 2.0) & _blobs(rng, g, 0.01, 2.5)
        g.extrude(bushes, C["vegetation"], float(rng.uniform(0.8, 2.0)))
        occupied |= bushes
        _trees(g, rng, zone & ~occupied & (side_e > walk + 1.0), occupied, density=0.012)
    elif kind == "fenced":
        fence_e = walk + float(rng.uniform(0.3, 1.5))
        fence = zone & (np.abs(side_e - fence_e) <= g.size / 2)
        g.extrude(fence, C["fence"], float(rng.uniform(1.0, 2.0)))
        occupied |= fence
        behind = zone & (side_e > fence_e + g.size)
        g.labels[behind, ground] = C["other-ground"] if rng.random() < 0.5 else C["terrain"]
        _trees(g, rng, behind & ~occupied, occupied, density=0.01)
        if rng.random() < 0.5:
            far = behind & (side_e > fence_e + float(rng.uniform(6.0, 12.0)))
            g.labels[far, ground] = C["building"]
            g.extrude(far, C["building"], float(rng.uniform(3.0, 7.5)))
            occupied |= far
    else:  # parking lot with rows of parked cars, perpendicular to the road
        depth = float(rng.uniform(10.0, 16.0))
        lot = zone & (side_e <= walk + depth)
        g.labels[lot, ground] = C["parking"]
        g.labels[zone & (side_e > walk + depth), ground] = C["terrain"]
        row_e = walk + 0.5 + 2.4  # cars 4.5 m long, perpendicular to the road
        for slot in np.arange(float(rng.uniform(0.0, 3.0)), EXTENT_M[0], 2.7):
            if rng.random() < 0.6:
                car = lot & (np.abs(along - slot - 1.0) <= 0.9) & (np.abs(side_e - row_e) <= 2.2) & ~occupied
                g.extrude(car, C["car"], float(rng.uniform(1.3, 1.6)))
                occupied |= car
        _trees(g, rng, zone & (side_e > walk + depth + 1.0) & ~occupied, occupied, density=0.01)


def _blobs(rng: np.random.Generator, g: _Grid, density: float, radius: float) -> np.ndarray:
    """(X, Y) mask of random discs (bushes), ``density`` centres per square metre, radii up to ``radius`` metres."""
    shape = g.labels.shape[:2]
    centres = np.argwhere(rng.random(shape) < density * g.size**2)
    mask = np.zeros(shape, dtype=bool)
    for i, j in centres:
        r = radius * float(rng.uniform(0.4, 1.0))
        mask |= (g.x - g.x[i, 0]) ** 2 + (g.y - g.y[0, j]) ** 2 <= r**2
    return mask


def _trees(g: _Grid, rng: np.random.Generator, area: np.ndarray, occupied: np.ndarray, density: float) -> None:
    """Trees (a trunk column and a round canopy) at random cells of ``area``, ``density`` per square metre."""
    cells = np.argwhere(area & (rng.random(area.shape) < density * g.size**2))
    depth = g.labels.shape[2]
    z = (np.arange(depth) - g.ground - 0.5) * g.size  # height of layer centres above the ground surface
    for i, j in cells:
        if occupied[i, j]:
            continue
        trunk_height = float(rng.uniform(1.6, 3.0))
        radius = float(rng.uniform(1.4, 2.8))
        centre_z = trunk_height + radius * 0.7
        distance = (g.x - g.x[i, 0]) ** 2 + (g.y - g.y[0, j]) ** 2  # (X, Y)
        canopy = distance[:, :, None] + ((z[None, None, :] - centre_z) * 1.2) ** 2 <= radius**2
        canopy[:, :, : g.ground + 1] = False
        # Branches overhanging the carriageway stay above truck height.
        canopy &= ~((g.labels[:, :, g.ground] == C["road"])[:, :, None] & (z < 3.6)[None, None, :])
        free = g.labels == EMPTY
        g.labels[canopy & free] = C["vegetation"]
        trunk_top = min(g.ground + 1 + g.layers(trunk_height), depth)
        g.labels[i, j, g.ground + 1 : trunk_top] = C["trunk"]
        # Keep the next trunk at least one cell away.
        occupied[max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2] = True


def _vehicles(
    g: _Grid,
    rng: np.random.Generator,
    e: np.ndarray,
    along: np.ndarray,
    half: float,
    lanes: int,
    lane_width: float,
    ego_e: float,
    cross: np.ndarray | None,
    occupied: np.ndarray,
) -> None:
    """Parked cars along both kerbs and cars or trucks driving in the lanes, aligned with the road.

    ``ego_e`` is the lateral offset of the ego car (at the origin); its lane stays free next to it.
    """
    blocked = occupied | (cross if cross is not None else False)

    def place(centre_x: float, centre_e: float, length: float, width: float, height: float, label: int) -> None:
        footprint = (np.abs(along - centre_x) <= length / 2) & (np.abs(e - centre_e) <= width / 2)
        if footprint.any() and not (footprint & (occupied | blocked)).any():
            g.extrude(footprint, label, height)
            occupied[footprint] = True

    for sign in (1.0, -1.0):
        kerb_e = sign * (half - 1.1)
        # Kerb-side parking only where it leaves the ego lane free.
        if abs(kerb_e - ego_e) >= 2.6 and rng.random() < 0.65:
            position = float(rng.uniform(-2.0, 6.0))
            while position < EXTENT_M[0] + 3:
                length = float(rng.uniform(3.8, 4.8))
                if rng.random() < 0.75:
                    place(position + length / 2, kerb_e, length, 1.8, float(rng.uniform(1.4, 1.6)), C["car"])
                position += length + float(rng.uniform(1.2, 8.0))
    blocked = occupied.copy()  # driving cars may cross the intersection
    for _ in range(int(rng.integers(0, 5))):
        lane_e = -half + (int(rng.integers(0, lanes)) + 0.5) * lane_width
        if rng.random() < 0.15:
            place(float(rng.uniform(10.0, 45.0)), lane_e, float(rng.uniform(7.0, 10.0)), 2.5, 3.2, C["truck"])
        else:
            place(float(rng.uniform(7.0, 48.0)), lane_e, float(rng.uniform(3.8, 4.8)), 1.8, 1.5, C["car"])


def _street_furniture(
    g: _Grid,
    rng: np.random.Generator,
    sides: dict[float, tuple[np.ndarray, float, bool]],
    along: np.ndarray,
    cross: np.ndarray | None,
    occupied: np.ndarray,
) -> None:
    """Street lights and sign posts on the sidewalks, street trees, and the odd pedestrian or cyclist."""
    depth = g.labels.shape[2]
    for side_e, walk, has_walk in sides.values():
        strip_e = 0.5 if walk == 0 else min(0.6, walk / 2)  # near the kerb
        # Thin things right next to the camera would fill the picture: start a few metres ahead.
        position = float(rng.uniform(5.0, 18.0))
        while position < EXTENT_M[0]:
            cell = (np.abs(along - position) <= g.size / 2) & (np.abs(side_e - strip_e) <= g.size / 2)
            cell &= ~occupied
            if cross is not None:
                cell &= ~cross
            rows, cols = np.nonzero(cell)
            if rows.size:
                i, j = int(rows[0]), int(cols[0])
                is_sign = rng.random() < 0.4
                height = float(rng.uniform(2.4, 3.4)) if is_sign else float(rng.uniform(4.0, 6.5))
                top = min(g.ground + 1 + g.layers(height), depth)
                g.labels[i, j, g.ground + 1 : top] = C["pole"]
                if is_sign:
                    g.labels[i, j, max(top - 1, g.ground + 2) : top] = C["traffic-sign"]
                    if top < depth:
                        g.labels[i, j, top] = C["traffic-sign"]
                occupied[i, j] = True
            position += float(rng.uniform(10.0, 25.0))
        if has_walk and walk >= 2.4 and rng.random() < 0.5:
            trees = (np.abs(side_e - (walk - 0.8)) <= g.size / 2) & ~occupied
            spacing = float(rng.uniform(6.0, 12.0))
            trees &= (np.mod(along, spacing) < g.size) & (along > 5.0)
            if cross is not None:
                trees &= ~cross
            _trees(g, rng, trees, occupied, density=10.0)
        if has_walk:
            for _ in range(int(rng.poisson(1.0))):
                position = float(rng.uniform(3.0, 45.0))
                cell = (np.abs(along - position) <= g.size / 2) & (np.abs(side_e - walk / 2) <= g.size / 2)
                cell &= ~occupied & (g.labels[:, :, g.ground] == C["sidewalk"])
                rows, cols = np.nonzero(cell)
                if rows.size:
                    i, j = int(rows[0]), int(cols[0])
                    label = C["person"] if rng.random() < 0.75 else C["bicyclist"]
                    g.labels[i, j, g.ground + 1 : g.ground + 1 + g.layers(1.7)] = label
                    occupied[i, j] = True


def _invalid_mask(labels: np.ndarray, hidden: np.ndarray, ground: int) -> np.ndarray:
    """KITTI-like "never observed" voxels: building interiors, columns behind buildings and space under the road."""
    building = labels == C["building"]
    padded = np.pad(building, 1, mode="edge")
    interior = building.copy()
    for axis in range(3):
        for shift in (-1, 1):
            interior &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    invalid = interior
    invalid[hidden] = True
    invalid[:, :, :ground] = True
    return invalid


# ---------------------------------------------------------------------------------------------------------------
# Camera, rendering and the simulated scan
# ---------------------------------------------------------------------------------------------------------------


def demo_calibration(image_size: Sequence[int] = (128, 384)) -> tuple[np.ndarray, np.ndarray]:
    """KITTI sequence 00's rig for images of ``image_size``: ``P2`` (3, 4) and ``Tr`` (4, 4).

    ``P2`` keeps KITTI's horizontal field of view and square pixels (``fx = fy = 718.856 * W / 1241``) and the
    principal point's relative position in the image (pixel-centre convention); a taller aspect ratio than KITTI's
    therefore only widens the vertical field of view. ``Tr`` is sequence 00's velodyne -> camera transform.
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


def _lidar_scan(labels: np.ndarray, voxel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Simulated HDL-64E scan from the LiDAR origin: voxels it hits (``.bin``) and voxels behind its first returns.

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


# ---------------------------------------------------------------------------------------------------------------
# Writing the dataset
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FrameJob:
    sequence_dir: str
    split_code: int
    index: int
    seed: int
    grid_size: tuple[int, int, int]
    image_size: tuple[int, int]


def _frame_rng(seed: int, split_code: int, index: int) -> np.random.Generator:
    # Independent of worker count and order: each frame's stream is a pure function of (seed, split, index).
    return np.random.default_rng(np.random.SeedSequence([seed, split_code, index]))


def _write_frame(job: _FrameJob) -> None:
    rng = _frame_rng(job.seed, job.split_code, job.index)
    labels, invalid = _generate(rng, job.grid_size)
    image = render_demo_image(labels, job.image_size, rng, job.grid_size)
    scan, occluded = _lidar_scan(labels, EXTENT_M[0] / job.grid_size[0])
    frame = f"{job.index * FRAME_STRIDE:06d}"
    sequence = Path(job.sequence_dir)
    Image.fromarray(image).save(sequence / "image_2" / f"{frame}.png", format="PNG", compress_level=3)
    write_voxel_frame(sequence / "voxels", frame, train_to_raw(labels), invalid=invalid, occluded=occluded, scan=scan)


def _manifest(
    seed: int, num_train: int, num_val: int, grid_size: tuple[int, int, int], image_size: tuple[int, int]
) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "version": occscene_pl.__version__,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "grid_size": list(grid_size),
        "image_size": list(image_size),
        "sequences": {SPLIT_SEQUENCES["train"]: num_train, SPLIT_SEQUENCES["val"]: num_val},
    }


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    """The manifest of a generated demo dataset, or ``None`` when ``root`` holds none (or an unreadable one)."""
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def generate_demo_dataset(
    root: str | Path,
    num_train: int = 320,
    num_val: int = 64,
    grid_size: Sequence[int] = (64, 64, 8),
    image_size: Sequence[int] = (128, 384),
    seed: int = 0,
    overwrite: bool = False,
    num_workers: int | None = None,
) -> Path:
    """Generate the demo dataset at ``root`` in the SemanticKITTI layout, unless an identical one is already there.

    Writes ``root/dataset/sequences/00`` (``num_train`` frames) and ``08`` (``num_val``), each with ``calib.txt``,
    ``image_2/NNNNNN.png`` and ``voxels/NNNNNN.{bin,label,invalid,occluded}`` for frames 000000, 000005, ..., and
    ``root/manifest.json`` with the generation parameters. An existing dataset is reused only when its manifest
    matches exactly; otherwise (or with ``overwrite``) it is regenerated. Generation happens in a temporary folder
    next to ``root`` that replaces it only once complete, so an interrupted run never leaves a partial dataset.

    Args:
        root: destination folder.
        num_train: frames of the train sequence 00.
        num_val: frames of the val sequence 08.
        grid_size: ``(X, Y, Z)`` with ``X == Y == 8 * Z``.
        image_size: ``(H, W)`` of the rendered images.
        seed: base seed; the same seed gives byte-identical files.
        overwrite: regenerate even when a matching dataset exists.
        num_workers: worker processes (default: up to 2, the cores a laptop demo can count on); 1 runs in-process.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    grid = _check_grid_size(grid_size)
    if len(image_size) != 2 or min(int(s) for s in image_size) < 1:
        raise ValueError(f"image_size must be (H, W) with positive entries, got {tuple(image_size)!r}")
    size = (int(image_size[0]), int(image_size[1]))
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train} and {num_val}")
    root = Path(root)
    manifest = _manifest(seed, num_train, num_val, grid, size)
    if root.exists():
        existing = read_manifest(root)
        if existing is None and root.is_dir() and any(root.iterdir()):
            raise FileExistsError(
                f"demo dataset root {root} exists but has no {MANIFEST}; it is not a generated demo dataset, so it "
                "is left untouched. Remove it or choose another root."
            )
        if existing == manifest and not overwrite:
            return root

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        jobs = []
        p2, tr = demo_calibration(size)
        for split_code, (split, count) in enumerate((("train", num_train), ("val", num_val))):
            sequence = staging / "dataset" / "sequences" / SPLIT_SEQUENCES[split]
            (sequence / "image_2").mkdir(parents=True)
            (sequence / "voxels").mkdir()
            write_calib(sequence / "calib.txt", p2, tr)
            jobs += [_FrameJob(str(sequence), split_code, i, seed, grid, size) for i in range(count)]
        _run_jobs(jobs, num_workers)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _swap_into_place(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def _run_jobs(jobs: list[_FrameJob], num_workers: int | None) -> None:
    workers = min(2, os.cpu_count() or 1) if num_workers is None else int(num_workers)
    if workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    workers = min(workers, len(jobs))
    if workers <= 1:
        for job in jobs:
            _write_frame(job)
        return
    # Workers only run NumPy and PIL; fork avoids re-importing torch in every worker where it is available.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        for _ in pool.map(_write_frame, jobs, chunksize=4):
            pass


def _swap_into_place(staging: Path, root: Path) -> None:
    """Replace ``root`` by ``staging`` with renames, so ``root`` is at every moment absent, old or complete."""
    if not root.exists():
        os.replace(staging, root)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
    os.replace(root, trash / root.name)
    os.replace(staging, root)
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# DataModule
# ---------------------------------------------------------------------------------------------------------------


class DemoDataModule(SemanticKittiDataModule):
    """The embedded demo: procedural street scenes generated on first use, read by the SemanticKITTI reader.

    Args:
        root: where the dataset is generated (``root/dataset/sequences/{00,08}`` and ``root/manifest.json``).
        num_train: training frames (sequence 00).
        num_val: validation frames (sequence 08), also used by ``test`` and ``predict``.
        seed: generation seed.
        grid_size: ``(X, Y, Z)`` of the voxel grid over the KITTI extent, ``X == Y == 8 * Z``.
        render_size: ``(H, W)`` the images are rendered at; the model's input size is ``image_size``.
        **kwargs: :class:`~occscene_pl.data.base.OccupancyDataModule` arguments (``batch_size``, ``image_size``, ...).
    """

    def __init__(
        self,
        root: str = "data/demo",
        num_train: int = 320,
        num_val: int = 64,
        seed: int = 0,
        grid_size: Sequence[int] = (64, 64, 8),
        render_size: Sequence[int] = (128, 384),
        **kwargs: Any,
    ) -> None:
        if len(render_size) != 2 or min(int(s) for s in render_size) < 1:
            raise ValueError(f"render_size must be (H, W) with positive entries, got {tuple(render_size)!r}")
        super().__init__(
            root=root,
            crop_size=(int(render_size[1]), int(render_size[0])),
            grid_size=_check_grid_size(grid_size),
            **kwargs,
        )
        self.num_train = num_train
        self.num_val = num_val
        self.seed = seed
        self.render_size = (int(render_size[0]), int(render_size[1]))

    def prepare_data(self) -> None:
        """Generate the dataset when ``root`` has no manifest or one that does not match these arguments."""
        generate_demo_dataset(self.root, self.num_train, self.num_val, self.grid_size, self.render_size, self.seed)

    def build_dataset(self, split: str, augment: bool) -> SemanticKittiDataset:
        # The demo's "test" split is its labelled val sequence, so `occscene-pl test` works on it.
        reader_split, sequence = ("train", "00") if split == "train" else ("val", "08")
        SemanticKittiDataset.check_split(split)
        return SemanticKittiDataset(
            self.root,
            reader_split,
            grid_size=self.grid_size,
            crop_size=self.crop_size,
            sequences=(sequence,),
            **self.augmentation(augment),
        )
