"""Procedural street layouts as semantic voxel grids over the SemanticKITTI extent (``docs/design.md`` §8.5).

The grid covers x forward 0..51.2 m, y left -25.6..25.6 m and z up -2..4.4 m in the LiDAR frame. A scene is a
straight or gently curved road, sometimes a cross street, a median or a parking lot, sidewalks, building rows with
gaps, green strips with trees and bushes, fences, poles and traffic signs, parked and driving cars and the odd truck
or pedestrian. Every draw comes from the caller's generator, so the same generator state gives the same scene.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from occscene_pl.data.semantic_kitti import SEMANTIC_KITTI_CLASSES, SemanticKittiDataset

__all__ = ["EXTENT_M", "VOXEL_ORIGIN", "check_grid_size", "generate_scene", "generate_street_scene"]

C = {name: index for index, name in enumerate(SEMANTIC_KITTI_CLASSES)}
EMPTY = 0
VOXEL_ORIGIN = np.array(SemanticKittiDataset.VOXEL_ORIGIN)
EXTENT_M = SemanticKittiDataset.SCENE_EXTENT_M
# The Velodyne HDL-64E sits 1.73 m above the road (KITTI setup); the ground layer is the one containing the road.
GROUND_Z_M = -1.73


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


def check_grid_size(grid_size: Sequence[int]) -> tuple[int, int, int]:
    """Validate a demo grid size: three positive integers giving isotropic voxels over the KITTI extent.

    Args:
        grid_size: ``(X, Y, Z)``.

    Returns:
        ``grid_size`` as a tuple of ints.

    Raises:
        ValueError: when it is not three positive integers with ``X == Y == 8 * Z`` and ``Z >= 2``.
    """
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
    return generate_scene(rng, check_grid_size(grid_size))[0]


def generate_scene(rng: np.random.Generator, grid_size: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A random street scene and its mask of never-observable voxels (building interiors, space behind buildings).

    Args:
        rng: the random generator; the same state gives the same scene.
        grid_size: ``(X, Y, Z)``, already validated by :func:`check_grid_size`.

    Returns:
        ``labels``, ``(X, Y, Z)`` uint8 train ids, and ``invalid``, ``(X, Y, Z)`` bool.
    """
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
