"""Pictures of semantic occupancy: ray-cast camera views, bird's-eye views and side-by-side figures.

The camera view casts one ray per pixel through the pinhole camera into the voxel grid and walks it voxel by voxel
(Amanatides & Woo's exact traversal, vectorised over all rays in NumPy): the first voxel that is neither empty (0) nor
ignored (255) colours the pixel, shaded by the face the ray entered through. The same traversal serves any ray set
(:func:`raycast`), e.g. a simulated LiDAR scan.

Conventions are those of :mod:`occscene_pl.geometry`: the grid ``(X, Y, Z)`` sits at ``voxel_origin`` with isotropic
``voxel_size``; ``voxel_to_camera`` maps voxel-frame points into a camera with x right, y down, z forward; pixel
centres are at integer coordinates. The voxel frame's ``+z`` is "up" for shading, the sky and the horizon.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "CLASS_COLORS_KITTI",
    "RayHits",
    "camera_rays",
    "palette",
    "raycast",
    "render_bev",
    "render_occupancy",
    "render_occupancy_figure",
]

# SemanticKITTI's `color_map` (config/semantic-kitti.yaml, stored there as BGR) in RGB, indexed by train id
# through `learning_map_inv`, so pictures match the ones in the SSC literature.
CLASS_COLORS_KITTI = np.array(
    [
        [0, 0, 0],  # empty
        [100, 150, 245],  # car
        [100, 230, 245],  # bicycle
        [30, 60, 150],  # motorcycle
        [80, 30, 180],  # truck
        [0, 0, 255],  # other-vehicle
        [255, 30, 30],  # person
        [255, 40, 200],  # bicyclist
        [150, 30, 90],  # motorcyclist
        [255, 0, 255],  # road
        [255, 150, 255],  # parking
        [75, 0, 75],  # sidewalk
        [175, 0, 75],  # other-ground
        [255, 200, 0],  # building
        [255, 120, 50],  # fence
        [0, 175, 0],  # vegetation
        [135, 60, 0],  # trunk
        [150, 240, 80],  # terrain
        [255, 240, 150],  # pole
        [255, 0, 0],  # traffic-sign
    ],
    dtype=np.uint8,
)
CLASS_COLORS_KITTI.setflags(write=False)

DEFAULT_SKY_COLOR = (150, 185, 225)
DEFAULT_GROUND_COLOR = (45, 42, 40)
# Mostly from above, slightly from the front-left: top faces are brightest, the two side orientations differ.
DEFAULT_LIGHT_DIRECTION = (-0.4, 0.3, 1.0)
_EMPTY, _IGNORE = 0, 255
_PASS, _SOLID, _EXIT = 0, 1, 2  # cell codes of the padded traversal grid


def palette(num_classes: int) -> np.ndarray:
    """A deterministic palette of ``num_classes`` well-separated colours, class 0 (empty) black.

    Args:
        num_classes: number of classes including the empty class 0.

    Returns:
        ``(num_classes, 3)`` uint8; :data:`CLASS_COLORS_KITTI` when ``num_classes == 20``.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if num_classes == len(CLASS_COLORS_KITTI):
        return CLASS_COLORS_KITTI.copy()
    colors = np.zeros((num_classes, 3), dtype=np.uint8)
    for c in range(1, num_classes):
        # Golden-ratio hue steps keep neighbouring ids apart; alternating value keeps similar hues apart.
        hue = (c * 0.618033988749895) % 1.0
        saturation, value = 0.75, 0.95 if c % 2 else 0.7
        colors[c] = np.round(255 * _hsv_to_rgb(hue, saturation, value)).astype(np.uint8)
    return colors


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


@dataclass
class RayHits:
    """First non-empty, non-ignored voxel along each ray (:func:`raycast`).

    Attributes:
        hit: ``(N,)`` bool, whether the ray hit a voxel inside ``max_distance``.
        label: ``(N,)`` int64 class of the hit voxel, 0 where nothing was hit.
        distance: ``(N,)`` float64 ray parameter of the entry point (in units of the direction's length), ``inf``
            where nothing was hit.
        normal: ``(N, 3)`` float64 outward unit normal of the face the ray entered through, 0 where nothing was hit.
        voxel: ``(N, 3)`` int64 index of the hit voxel, -1 where nothing was hit.
    """

    hit: np.ndarray
    label: np.ndarray
    distance: np.ndarray
    normal: np.ndarray
    voxel: np.ndarray


def raycast(
    occupancy: Any,
    voxel_origin: Sequence[float] | np.ndarray,
    voxel_size: float,
    origins: np.ndarray,
    directions: np.ndarray,
    max_distance: float = np.inf,
) -> RayHits:
    """Exact voxel traversal (Amanatides & Woo) of many rays at once, stopping at the first solid voxel.

    A voxel is solid when its label is neither 0 (empty) nor 255 (ignore). Rays starting outside the grid enter it
    through its bounding box; a ray starting inside a solid voxel hits it at distance 0.

    Args:
        occupancy: ``(X, Y, Z)`` integer labels (NumPy array or tensor).
        voxel_origin: ``(3,)`` corner of voxel ``[0, 0, 0]``, metres.
        voxel_size: voxel edge, metres.
        origins: ``(3,)`` or ``(N, 3)`` ray origins in the voxel frame, metres.
        directions: ``(N, 3)`` ray directions (not necessarily unit); distances are in their units.
        max_distance: rays stop (missing) beyond this ray parameter.

    Returns:
        The :class:`RayHits` of every ray.
    """
    occ = _as_numpy(occupancy)
    if occ.ndim != 3:
        raise ValueError(f"occupancy must have shape (X, Y, Z), got {occ.shape}")
    if voxel_size <= 0:
        raise ValueError(f"voxel_size must be positive, got {voxel_size}")
    dims = np.array(occ.shape, dtype=np.int64)
    solid = ((occ != _EMPTY) & (occ != _IGNORE)).reshape(-1)
    labels_flat = occ.reshape(-1).astype(np.int64)
    directions = np.asarray(directions, dtype=np.float64).reshape(-1, 3)
    n = len(directions)
    start = np.broadcast_to(np.asarray(origins, np.float64), (n, 3)) - np.asarray(voxel_origin, np.float64)
    start = start / voxel_size  # (N, 3) in voxel units
    step_dir = directions / voxel_size

    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = np.where(step_dir != 0, 1.0 / step_dir, np.inf)
        t_low = np.where(step_dir != 0, (0.0 - start) * inverse, -np.inf)
        t_high = np.where(step_dir != 0, (dims - start) * inverse, np.inf)
    # Axis-parallel rays outside the slab of that axis never enter the grid.
    parallel_outside = (step_dir == 0) & ((start < 0) | (start >= dims))
    t_near = np.minimum(t_low, t_high)
    t_far = np.maximum(t_low, t_high)
    entry_axis = np.argmax(t_near, axis=1)
    t_enter = np.maximum(t_near.max(axis=1), 0.0)
    t_exit = t_far.min(axis=1)
    enters = (t_enter < t_exit) & ~parallel_outside.any(axis=1) & (t_enter <= max_distance)

    hits = RayHits(
        hit=np.zeros(n, dtype=bool),
        label=np.zeros(n, dtype=np.int64),
        distance=np.full(n, np.inf),
        normal=np.zeros((n, 3)),
        voxel=np.full((n, 3), -1, dtype=np.int64),
    )
    rays = np.flatnonzero(enters)
    if rays.size == 0:
        return hits
    step = np.sign(step_dir[rays]).astype(np.int64)
    t_start = t_enter[rays]
    entry = start[rays] + t_start[:, None] * step_dir[rays]
    index = np.clip(np.floor(entry).astype(np.int64), 0, dims - 1)
    # Face of entry: the slab entered last, or (inside the grid already) the axis the ray mostly travels along.
    entry_axis = np.where(t_near[rays].max(axis=1) > 0, entry_axis[rays], np.argmax(np.abs(step_dir[rays]), axis=1))

    # Pad the grid with a border of "exit" cells so the loop needs no bounds checks, plus one trailing "sink" cell
    # where finished rays are parked until the next compaction.
    cells = np.full(dims + 2, _EXIT, dtype=np.uint8)
    cells[1:-1, 1:-1, 1:-1] = solid.reshape(occ.shape)
    cells = np.append(cells.reshape(-1), np.uint8(_PASS))
    sink = cells.size - 1
    strides = np.array([(dims[1] + 2) * (dims[2] + 2), dims[2] + 2, 1], dtype=np.int64)
    flat = (index + 1) @ strides

    first = cells[flat] == _SOLID
    if first.any():
        r = rays[first]
        _record(hits, r, flat[first], t_start[first], entry_axis[first], step[first], strides, labels_flat, dims)
    # Parallel axes get a huge finite crossing time and delta so `t += delta * moved` never produces inf * 0.
    big = 1e30
    with np.errstate(invalid="ignore"):
        t_next = np.where(step != 0, (index + (step > 0) - start[rays]) * inverse[rays], big)
    t_delta = np.where(step != 0, np.abs(inverse[rays]), big)
    # One 1-D array per axis: contiguous element-wise ops are several times faster than (N, 3) fancy indexing.
    keep = ~first
    rays, flat, step = rays[keep], flat[keep], step[keep]
    tx, ty, tz = (np.ascontiguousarray(t_next[keep, a]) for a in range(3))
    dx, dy, dz = (np.ascontiguousarray(t_delta[keep, a]) for a in range(3))
    fx, fy, fz = (np.ascontiguousarray(step[:, a] * strides[a]) for a in range(3))
    state = [rays, flat, tx, ty, tz, dx, dy, dz, fx, fy, fz]
    parked = 0
    while state[0].size:
        rays, flat, tx, ty, tz, dx, dy, dz, fx, fy, fz = state
        move_x = (tx <= ty) & (tx <= tz)
        move_y = (ty <= tz) & ~move_x
        move_z = ~(move_x | move_y)
        flat += np.where(move_x, fx, np.where(move_y, fy, fz))
        tx += dx * move_x
        ty += dy * move_y
        tz += dz * move_z
        code = cells[flat]
        if not code.any():
            continue
        where = np.flatnonzero(code)
        solid_now = code[where] == _SOLID
        if solid_now.any():
            w = where[solid_now]
            last = np.stack([tx[w] - dx[w], ty[w] - dy[w], tz[w] - dz[w]], axis=1)
            last[np.stack([dx[w], dy[w], dz[w]], axis=1) >= big] = -np.inf
            axis = np.argmax(last, axis=1)
            signs = np.sign(np.stack([fx[w], fy[w], fz[w]], axis=1))
            _record(hits, rays[w], flat[w], last.max(axis=1), axis, signs, strides, labels_flat, dims)
        # Park finished rays on the sink; compact once a quarter of the arrays is dead weight.
        flat[where] = sink
        fx[where] = 0
        fy[where] = 0
        fz[where] = 0
        parked += where.size
        if parked * 4 > rays.size:
            alive = flat != sink
            state = [s[alive] for s in state]
            parked = 0
    if np.isfinite(max_distance):
        beyond = hits.distance > max_distance
        hits.hit[beyond] = False
        hits.label[beyond] = 0
        hits.distance[beyond] = np.inf
        hits.normal[beyond] = 0.0
        hits.voxel[beyond] = -1
    return hits


def _record(
    hits: RayHits,
    rays: np.ndarray,
    flat: np.ndarray,
    distance: np.ndarray,
    axis: np.ndarray,
    step: np.ndarray,
    strides: np.ndarray,
    labels_flat: np.ndarray,
    dims: np.ndarray,
) -> None:
    """Store hits given their padded-grid flat index, entry distance, entry axis and per-axis step signs."""
    padded = np.stack([flat // strides[0], (flat // strides[1]) % (dims[1] + 2), flat % (dims[2] + 2)], axis=1)
    voxel = padded - 1
    hits.hit[rays] = True
    hits.voxel[rays] = voxel
    hits.label[rays] = labels_flat[(voxel[:, 0] * dims[1] + voxel[:, 1]) * dims[2] + voxel[:, 2]]
    hits.distance[rays] = distance
    normal = np.zeros((rays.size, 3))
    normal[np.arange(rays.size), axis] = -step[np.arange(rays.size), axis]
    hits.normal[rays] = normal


def camera_rays(intrinsics: Any, voxel_to_camera: Any, image_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The ray of every pixel centre of a pinhole camera, in the voxel frame.

    Args:
        intrinsics: ``(3, 3)``.
        voxel_to_camera: ``(4, 4)``.
        image_size: ``(H, W)``.

    Returns:
        ``origin`` ``(3,)`` (the camera centre) and ``directions`` ``(H * W, 3)`` in row-major pixel order, scaled so
        that the ray parameter equals the camera-frame depth.
    """
    k = _as_numpy(intrinsics).astype(np.float64)
    t = _as_numpy(voxel_to_camera).astype(np.float64)
    if k.shape != (3, 3) or t.shape != (4, 4):
        raise ValueError(f"expected intrinsics (3, 3) and voxel_to_camera (4, 4), got {k.shape} and {t.shape}")
    height, width = (int(s) for s in image_size)
    camera_to_voxel = np.linalg.inv(t)
    v, u = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    pixels = np.stack([u.reshape(-1), v.reshape(-1), np.ones(height * width)], axis=0)  # (3, HW)
    directions_cam = np.linalg.solve(k, pixels)  # z = 1: the ray parameter is the depth
    return camera_to_voxel[:3, 3], (camera_to_voxel[:3, :3] @ directions_cam).T


def render_occupancy(
    occupancy: Any,
    voxel_origin: Sequence[float] | np.ndarray,
    voxel_size: float,
    intrinsics: Any,
    voxel_to_camera: Any,
    image_size: Sequence[int],
    colors: np.ndarray | None = None,
    sky_color: Sequence[float] = DEFAULT_SKY_COLOR,
    shading: bool = True,
    texture_noise: float = 0.0,
    rng: np.random.Generator | None = None,
    ground_color: Sequence[float] = DEFAULT_GROUND_COLOR,
    light_direction: Sequence[float] = DEFAULT_LIGHT_DIRECTION,
    ambient: float = 0.45,
    fog_distance: float | None = 150.0,
) -> np.ndarray:
    """Render a camera view of a semantic voxel grid by ray casting.

    Args:
        occupancy: ``(X, Y, Z)`` train ids (NumPy array or tensor); 0 and 255 are transparent.
        voxel_origin: ``(3,)`` corner of voxel ``[0, 0, 0]``, metres.
        voxel_size: voxel edge, metres.
        intrinsics: ``(3, 3)`` at ``image_size``.
        voxel_to_camera: ``(4, 4)``.
        image_size: ``(H, W)`` of the rendered image.
        colors: ``(C, 3)`` uint8 colour of every class; defaults to :func:`palette` of ``max label + 1`` classes
            (:data:`CLASS_COLORS_KITTI` for 20).
        sky_color: RGB of the sky at the horizon; it deepens towards the zenith.
        shading: Lambertian shading by the hit face's normal plus distance fog; ``False`` gives flat class colours.
        texture_noise: standard deviation of per-pixel multiplicative brightness noise on hit surfaces.
        rng: generator of the texture noise (a fixed seed when ``None``).
        ground_color: RGB of pixels looking below the horizon that hit nothing.
        light_direction: direction towards the light in the voxel frame (``+z`` up).
        ambient: light reaching faces turned away from the light, in ``[0, 1]``.
        fog_distance: distance (metres) at which fog covers 63 % of a surface; ``None`` disables fog.

    Returns:
        ``(H, W, 3)`` uint8 RGB image.
    """
    occ = _as_numpy(occupancy)
    colors = _check_colors(occ, colors)
    height, width = (int(s) for s in image_size)
    origin, directions = camera_rays(intrinsics, voxel_to_camera, (height, width))
    hits = raycast(occ, voxel_origin, voxel_size, origin, directions)

    rgb = np.empty((height * width, 3), dtype=np.float64)
    lengths = np.linalg.norm(directions, axis=1)
    elevation = directions[:, 2] / lengths
    miss = ~hits.hit
    sky = _sky(elevation[miss], sky_color)
    below = elevation[miss] < 0
    sky[below] = np.asarray(ground_color, dtype=np.float64)
    rgb[miss] = sky

    surface = colors[hits.label[hits.hit]].astype(np.float64)
    if shading:
        light = np.asarray(light_direction, dtype=np.float64)
        light = light / np.linalg.norm(light)
        lambert = np.clip(hits.normal[hits.hit] @ light, 0.0, None)
        surface *= (ambient + (1.0 - ambient) * lambert)[:, None]
        if fog_distance is not None:
            distance = hits.distance[hits.hit] * lengths[hits.hit]
            fog = 1.0 - np.exp(-distance / fog_distance)
            surface += fog[:, None] * (np.asarray(sky_color, dtype=np.float64) - surface)
    if texture_noise > 0:
        rng = rng if rng is not None else np.random.default_rng(0)
        surface *= 1.0 + texture_noise * rng.standard_normal((len(surface), 1))
    rgb[hits.hit] = surface
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8).reshape(height, width, 3)


def _sky(elevation: np.ndarray, sky_color: Sequence[float]) -> np.ndarray:
    """Sky gradient: ``sky_color`` at the horizon, a deeper blue towards the zenith."""
    horizon = np.asarray(sky_color, dtype=np.float64)
    zenith = horizon * np.array([0.45, 0.6, 0.85])
    weight = np.clip(elevation, 0.0, 1.0)[:, None] ** 0.6
    return horizon + weight * (zenith - horizon)


def render_bev(occupancy: Any, colors: np.ndarray | None = None, scale: int = 1, shade: bool = True) -> np.ndarray:
    """Top-down view: the colour of the highest solid voxel of every ``(x, y)`` column.

    Args:
        occupancy: ``(X, Y, Z)`` train ids; 0 and 255 are transparent.
        colors: ``(C, 3)`` uint8 class colours (see :func:`render_occupancy`).
        scale: every voxel becomes a ``scale x scale`` block of pixels.
        shade: darken lower surfaces so height reads in the picture.

    Returns:
        ``(X * scale, Y * scale, 3)`` uint8, indexed like the grid (row = x, column = y); empty columns are
        ``colors[0]``.
    """
    occ = _as_numpy(occupancy)
    colors = _check_colors(occ, colors)
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    solid = (occ != _EMPTY) & (occ != _IGNORE)
    depth = occ.shape[2]
    top = depth - 1 - np.argmax(solid[:, :, ::-1], axis=2)  # (X, Y) highest solid z
    any_solid = solid.any(axis=2)
    labels = np.take_along_axis(occ, top[..., None], axis=2)[..., 0].astype(np.int64)
    labels[~any_solid] = 0
    image = colors[labels].astype(np.float64)
    if shade:
        brightness = 0.55 + 0.45 * (top + 1) / depth
        image[any_solid] *= brightness[any_solid][:, None]
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    if scale > 1:
        image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    return image


def render_occupancy_figure(
    occupancy: Any,
    voxel_origin: Sequence[float] | np.ndarray,
    voxel_size: float,
    intrinsics: Any,
    voxel_to_camera: Any,
    image_size: Sequence[int],
    colors: np.ndarray | None = None,
    image: Any | None = None,
    gap: int = 4,
) -> np.ndarray:
    """One picture of a sample: [the RGB image,] the occupancy seen from the camera, and its bird's-eye view.

    The bird's-eye view is oriented for reading: forward (``+x``) up and left (``+y``) on the left.

    Args:
        occupancy: ``(X, Y, Z)`` train ids.
        voxel_origin: ``(3,)``.
        voxel_size: metres.
        intrinsics: ``(3, 3)`` at ``image_size``.
        voxel_to_camera: ``(4, 4)``.
        image_size: ``(H, W)`` of the camera panel.
        colors: ``(C, 3)`` uint8 class colours.
        image: optional ``(H, W, 3)`` uint8 or ``(3, H, W)`` float image in ``[0, 1]`` shown first.
        gap: white pixels between panels.

    Returns:
        ``(H, W_total, 3)`` uint8.
    """
    height = int(image_size[0])
    panels = []
    if image is not None:
        panels.append(_to_uint8_hwc(image))
    panels.append(
        render_occupancy(
            occupancy, voxel_origin, voxel_size, intrinsics, voxel_to_camera, image_size, colors, shading=True
        )
    )
    bev = render_bev(occupancy, colors)[::-1, ::-1]
    scale = max(1, height // bev.shape[0])
    bev = np.repeat(np.repeat(bev, scale, axis=0), scale, axis=1)
    panels.append(bev)
    rows = max(p.shape[0] for p in panels)
    padded = []
    for i, panel in enumerate(panels):
        canvas = np.full((rows, panel.shape[1], 3), 255, dtype=np.uint8)
        canvas[: panel.shape[0]] = panel
        padded.append(canvas)
        if i < len(panels) - 1:
            padded.append(np.full((rows, gap, 3), 255, dtype=np.uint8))
    return np.concatenate(padded, axis=1)


def _to_uint8_hwc(image: Any) -> np.ndarray:
    array = _as_numpy(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = np.moveaxis(array, 0, -1)
    if array.dtype != np.uint8:
        array = np.clip(np.round(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    return array


def _check_colors(occupancy: np.ndarray, colors: np.ndarray | None) -> np.ndarray:
    labels = occupancy[occupancy != _IGNORE]
    top = int(labels.max()) if labels.size else 0
    if colors is None:
        return palette(max(top + 1, len(CLASS_COLORS_KITTI)))
    colors = np.asarray(colors)
    if colors.ndim != 2 or colors.shape[1] != 3:
        raise ValueError(f"colors must have shape (num_classes, 3), got {colors.shape}")
    if top >= len(colors):
        raise ValueError(f"occupancy has label {top} but colors has only {len(colors)} entries")
    return colors.astype(np.uint8)


def _as_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)
