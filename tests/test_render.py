"""Occupancy renderer: ray casting against hand-computed projections, occlusion, transparency and BEV."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from occscene_pl.render import (
    CLASS_COLORS_KITTI,
    camera_rays,
    palette,
    raycast,
    render_bev,
    render_occupancy,
    render_occupancy_figure,
)

# A camera at the voxel-frame origin looking along +x, KITTI's axis convention: x_cam = -y, y_cam = -z, z_cam = x.
LOOK_ALONG_X = np.array([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
F, CX, CY = 40.0, 63.5, 31.5
K = np.array([[F, 0.0, CX], [0.0, F, CY], [0.0, 0.0, 1.0]])
IMAGE = (64, 128)  # (H, W)
# 1 m voxels; the camera sits inside the grid at the centre of its y/z extent, 2 m behind the first x plane.
GRID = (12, 16, 8)
ORIGIN = (-2.0, -8.0, -4.0)
SKY, GROUND = (150, 185, 225), (45, 42, 40)
COLORS = palette(20)


def _render(occupancy: np.ndarray, **kwargs: object) -> np.ndarray:
    options: dict[str, object] = {"shading": False, "sky_color": SKY, "ground_color": GROUND, "colors": COLORS}
    options.update(kwargs)
    return render_occupancy(occupancy, ORIGIN, 1.0, K, LOOK_ALONG_X, IMAGE, **options)  # type: ignore[arg-type]


def _wall(grid: np.ndarray, x_index: int, y_range: tuple[int, int], z_range: tuple[int, int], label: int) -> None:
    grid[x_index, y_range[0] : y_range[1], z_range[0] : z_range[1]] = label


def _band(depth: float, y_lo: float, y_hi: float, z_lo: float, z_hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres strictly inside the projection of the face x = depth, y in [y_lo, y_hi], z in [z_lo, z_hi].

    u = F * (-y) / depth + CX and v = F * (-z) / depth + CY; pixels within half a pixel of an edge are excluded from
    both the inside and the outside sets.
    """
    u = np.arange(IMAGE[1])
    v = np.arange(IMAGE[0])
    u_lo, u_hi = F * -y_hi / depth + CX, F * -y_lo / depth + CX
    v_lo, v_hi = F * -z_hi / depth + CY, F * -z_lo / depth + CY
    inside = ((v[:, None] > v_lo + 0.5) & (v[:, None] < v_hi - 0.5)) & ((u > u_lo + 0.5) & (u < u_hi - 0.5))
    outside = ((v[:, None] < v_lo - 0.5) | (v[:, None] > v_hi + 0.5)) | ((u < u_lo - 0.5) | (u > u_hi + 0.5))
    return inside, outside


def test_wall_fills_the_hand_computed_pixel_band() -> None:
    grid = np.zeros(GRID, dtype=np.uint8)
    # Voxels x in [4, 5) m, y in [-3, 2) m, z in [-1, 2) m (index = metres - origin).
    _wall(grid, 6, (5, 10), (3, 6), 13)
    image = _render(grid)
    inside, outside = _band(4.0, -3.0, 2.0, -1.0, 2.0)
    assert inside.sum() > 200
    assert (image[inside] == COLORS[13]).all()
    assert not (image[outside] == COLORS[13]).all(axis=-1).any()


def test_sky_above_and_ground_below_the_horizon_when_nothing_is_hit() -> None:
    image = _render(np.zeros(GRID, dtype=np.uint8))
    # Rows below the principal point look down (y_cam > 0 is z < 0), rows above look up.
    assert (image[int(CY) + 1 :] == GROUND).all()
    sky = image[: int(CY) + 1, 64].astype(int)
    # The horizon colour just above the horizon, turning monotonically to a deeper blue towards the zenith.
    np.testing.assert_allclose(sky[-1], SKY, atol=6)
    assert (np.diff(sky, axis=0) >= 0).all()  # every channel brightens from the zenith down to the horizon
    assert sky[0, 2] / sky[0].sum() > sky[-1, 2] / sky[-1].sum() + 0.05


def test_nearest_voxel_wins() -> None:
    grid = np.zeros(GRID, dtype=np.uint8)
    _wall(grid, 9, (2, 14), (1, 7), 13)  # far wall: x in [7, 8) m
    _wall(grid, 5, (7, 9), (3, 5), 1)  # near car: x in [3, 4) m, y in [-1, 1), z in [-1, 1)
    image = _render(grid)
    near, near_out = _band(3.0, -1.0, 1.0, -1.0, 1.0)
    far, _ = _band(7.0, -6.0, 6.0, -3.0, 3.0)
    assert (image[near] == COLORS[1]).all()
    visible_far = far & near_out
    assert visible_far.sum() > 100
    assert (image[visible_far] == COLORS[13]).all()


@pytest.mark.parametrize("transparent", [0, 255])
def test_empty_and_ignored_voxels_are_transparent(transparent: int) -> None:
    grid = np.zeros(GRID, dtype=np.uint8)
    _wall(grid, 9, (2, 14), (1, 7), 13)
    _wall(grid, 5, (4, 12), (2, 6), transparent)
    image = _render(grid)
    far, _ = _band(7.0, -6.0, 6.0, -3.0, 3.0)
    assert (image[far] == COLORS[13]).all()


def test_kitti_rig_wall_lands_where_k_and_tr_project_it() -> None:
    """A building face 10 m ahead seen through KITTI's real rig; its corners are projected by hand with K and Tr."""
    tr = np.array(
        [
            [4.276802385584e-04, -9.999672484946e-01, -8.084491683471e-03, -1.198459927713e-02],
            [-7.210626507497e-03, 8.081198471645e-03, -9.999413164504e-01, -5.403984729748e-02],
            [9.999738645903e-01, 4.859485810390e-04, -7.206933692422e-03, -2.921968648686e-01],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    k = np.array([[222.434, 0.0, 187.537], [0.0, 222.434, 62.722], [0.0, 0.0, 1.0]])
    grid = np.zeros((64, 64, 8), dtype=np.uint8)
    grid[12:14, 26:38, 1:6] = 13  # x in [9.6, 11.2), y in [-4.8, 4.8), z in [-1.2, 2.8) at 0.8 m
    image = render_occupancy(grid, (0.0, -25.6, -2.0), 0.8, k, tr, (128, 384), CLASS_COLORS_KITTI, shading=False)
    corners = np.array([[9.6, y, z, 1.0] for y in (-4.8, 4.8) for z in (-1.2, 2.8)])
    cam = (tr @ corners.T)[:3]
    u = k[0, 0] * cam[0] / cam[2] + k[0, 2]
    v = k[1, 1] * cam[1] / cam[2] + k[1, 2]
    # The face is nearly fronto-parallel, so the bounding box of its corners, shrunk by 2 px, lies inside it.
    uu, vv = np.meshgrid(np.arange(384), np.arange(128))
    inside = (uu > u.min() + 2) & (uu < u.max() - 2) & (vv > v.min() + 2) & (vv < v.max() - 2)
    outside = (uu < u.min() - 2) | (uu > u.max() + 2) | (vv < v.min() - 2) | (vv > v.max() + 2)
    assert inside.sum() > 2000
    assert (image[inside] == CLASS_COLORS_KITTI[13]).all()
    assert not (image[outside] == CLASS_COLORS_KITTI[13]).all(axis=-1).any()


def test_shading_top_faces_brighter_than_side_faces_and_noise_is_seeded() -> None:
    grid = np.zeros(GRID, dtype=np.uint8)
    grid[:, :, :3] = 9  # a floor whose top is z = -1 m
    grid[8, 4:12, 3:5] = 13
    shaded = render_occupancy(grid, ORIGIN, 1.0, K, LOOK_ALONG_X, IMAGE, COLORS, fog_distance=None)
    floor = shaded[60, 64].sum() / COLORS[9].sum()  # row 60 looks down onto the floor
    front = shaded[28, 64].sum() / COLORS[13].sum()  # the front face of the block
    assert floor > front + 0.2
    noisy_a = render_occupancy(
        grid, ORIGIN, 1.0, K, LOOK_ALONG_X, IMAGE, COLORS, texture_noise=0.1, rng=np.random.default_rng(3)
    )
    noisy_b = render_occupancy(
        grid, ORIGIN, 1.0, K, LOOK_ALONG_X, IMAGE, COLORS, texture_noise=0.1, rng=np.random.default_rng(3)
    )
    clean = render_occupancy(grid, ORIGIN, 1.0, K, LOOK_ALONG_X, IMAGE, COLORS)
    assert np.array_equal(noisy_a, noisy_b)
    assert not np.array_equal(noisy_a, clean)


def test_raycast_entry_distance_normal_and_voxel() -> None:
    grid = np.zeros((6, 4, 4), dtype=np.uint8)
    grid[3, 1, 2] = 7
    grid[0, 0, 0] = 5
    origins = np.array([[-5.0, 1.5, 2.5], [3.5, 1.5, 6.0], [0.5, 0.5, 0.5], [-1.0, 10.0, 0.5]])
    directions = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -2.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    hits = raycast(grid, (0.0, 0.0, 0.0), 1.0, origins, directions)
    np.testing.assert_array_equal(hits.hit, [True, True, True, False])
    np.testing.assert_array_equal(hits.label, [7, 7, 5, 0])
    # Ray 0 enters voxel (3, 1, 2) through its x = 3 face, 8 m from the origin; ray 1 (direction length 2) through
    # its top face z = 3 at parameter 1.5; ray 2 starts inside a solid voxel.
    np.testing.assert_allclose(hits.distance[:3], [8.0, 1.5, 0.0])
    np.testing.assert_array_equal(hits.normal[0], [-1, 0, 0])
    np.testing.assert_array_equal(hits.normal[1], [0, 0, 1])
    np.testing.assert_array_equal(hits.voxel[:2], [[3, 1, 2], [3, 1, 2]])
    np.testing.assert_array_equal(hits.voxel[3], [-1, -1, -1])
    assert hits.distance[3] == np.inf
    clipped = raycast(grid, (0.0, 0.0, 0.0), 1.0, origins[:1], directions[:1], max_distance=7.5)
    assert not clipped.hit[0]


def test_raycast_matches_a_dense_march_on_random_grids() -> None:
    rng = np.random.default_rng(0)
    grid = (rng.random((10, 9, 7)) < 0.08).astype(np.uint8) * 3
    origin = np.array([4.3, 4.1, 3.2])
    directions = rng.normal(size=(300, 3))
    hits = raycast(grid, (0.0, 0.0, 0.0), 1.0, origin, directions)
    for d, hit, voxel, distance in zip(directions, hits.hit, hits.voxel, hits.distance, strict=True):
        # March in steps of 1/200 voxel and take the first solid cell (independent of the traversal).
        t = np.arange(0, 40, 0.005 / np.linalg.norm(d))
        points = np.floor(origin + t[:, None] * d).astype(int)
        inside = ((points >= 0) & (points < grid.shape)).all(axis=1)
        stop = np.argmin(inside) if not inside.all() else len(t)
        solid = grid[tuple(points[:stop].T)] != 0
        assert hit == solid.any()
        if hit:
            first = np.argmax(solid)
            np.testing.assert_array_equal(voxel, points[first])
            assert abs(distance - t[first]) < 0.01 / np.linalg.norm(d) + 1e-9


def test_camera_rays_reproject_to_their_pixels() -> None:
    origin, directions = camera_rays(K, LOOK_ALONG_X, IMAGE)
    np.testing.assert_allclose(origin, 0.0, atol=1e-12)
    cam = directions @ LOOK_ALONG_X[:3, :3].T
    np.testing.assert_allclose(cam[:, 2], 1.0)  # the ray parameter is the depth
    pixel = 3 * IMAGE[1] + 17  # row 3, column 17
    np.testing.assert_allclose(F * cam[pixel, :2] + [CX, CY], [17.0, 3.0])


def test_tensor_input_and_bad_arguments() -> None:
    grid = np.zeros(GRID, dtype=np.uint8)
    _wall(grid, 6, (5, 10), (3, 6), 13)
    from_tensor = render_occupancy(torch.from_numpy(grid), ORIGIN, 1.0, torch.from_numpy(K), LOOK_ALONG_X, IMAGE)
    assert np.array_equal(from_tensor, render_occupancy(grid, ORIGIN, 1.0, K, LOOK_ALONG_X, IMAGE))
    with pytest.raises(ValueError, match="colors has only 10 entries"):
        _render(grid, colors=palette(10))
    with pytest.raises(ValueError, match=r"shape \(X, Y, Z\)"):
        render_occupancy(grid[0], ORIGIN, 1.0, K, LOOK_ALONG_X, IMAGE)
    with pytest.raises(ValueError, match="voxel_size"):
        render_occupancy(grid, ORIGIN, 0.0, K, LOOK_ALONG_X, IMAGE)


def test_palette() -> None:
    assert np.array_equal(palette(20), CLASS_COLORS_KITTI)
    colors = palette(12)
    assert colors.shape == (12, 3) and colors.dtype == np.uint8
    assert (colors[0] == 0).all()
    assert len({tuple(c) for c in colors}) == 12
    # SemanticKITTI's colour map: road magenta, building yellow-orange, vegetation green, car light blue.
    assert CLASS_COLORS_KITTI.shape == (20, 3)
    assert tuple(CLASS_COLORS_KITTI[9]) == (255, 0, 255)
    assert tuple(CLASS_COLORS_KITTI[13]) == (255, 200, 0)
    assert tuple(CLASS_COLORS_KITTI[15]) == (0, 175, 0)
    assert tuple(CLASS_COLORS_KITTI[1]) == (100, 150, 245)


def test_render_bev_colours_the_highest_solid_voxel() -> None:
    grid = np.zeros((4, 3, 5), dtype=np.uint8)
    grid[:, :, 0] = 9
    grid[1, 2, :3] = 13
    grid[2, 0, 4] = 255  # ignored: the road below shows
    grid[3, 1, :] = 0  # an empty column
    flat = render_bev(grid, CLASS_COLORS_KITTI, shade=False)
    assert flat.shape == (4, 3, 3)
    assert (flat[1, 2] == CLASS_COLORS_KITTI[13]).all()
    assert (flat[2, 0] == CLASS_COLORS_KITTI[9]).all()
    assert (flat[3, 1] == 0).all()
    shaded = render_bev(grid, CLASS_COLORS_KITTI, scale=3)
    assert shaded.shape == (12, 9, 3)
    assert (shaded[3:6, 6:9] == shaded[3, 6]).all()
    # Higher surfaces are brighter: building (top z = 2) and road (z = 0) share a red channel of 255.
    assert int(shaded[3, 6, 0]) > int(shaded[0, 0, 0]) + 20


def test_render_occupancy_figure_layout() -> None:
    grid = np.zeros(GRID, dtype=np.uint8)
    grid[:, :, :3] = 9
    image = np.zeros((3, *IMAGE), dtype=np.float32)
    figure = render_occupancy_figure(grid, ORIGIN, 1.0, K, LOOK_ALONG_X, IMAGE, COLORS, image=image, gap=4)
    bev_width = GRID[1] * (IMAGE[0] // GRID[0])
    assert figure.shape == (IMAGE[0], IMAGE[1] + 4 + IMAGE[1] + 4 + bev_width, 3)
    assert (figure[:, : IMAGE[1]] == 0).all()
    assert (figure[:, IMAGE[1] : IMAGE[1] + 4] == 255).all()


def test_street_sized_render_sees_the_street() -> None:
    # The street of benchmarks/bench_render.py (which times this render): camera on the road looking along +x.
    tr = np.array([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, -0.05], [1.0, 0.0, 0.0, -0.27], [0.0, 0.0, 0.0, 1.0]])
    k = np.array([[222.4, 0.0, 187.5], [0.0, 222.4, 62.7], [0.0, 0.0, 1.0]])
    grid = np.zeros((64, 64, 8), dtype=np.uint8)
    grid[:, :, 0] = 9  # road
    grid[:, :20, :6] = 13  # building, on the right (y < 0)
    grid[:, 44:, :4] = 15  # vegetation, on the left
    grid[20:26, 30:33, 1:3] = 1  # car ahead
    image = render_occupancy(grid, (0.0, -25.6, -2.0), 0.8, k, tr, (128, 384), CLASS_COLORS_KITTI, texture_noise=0.05)
    assert image.shape == (128, 384, 3) and image.dtype == np.uint8
    classes = np.array([9, 13, 15, 1])
    directions = CLASS_COLORS_KITTI[classes].astype(np.float64)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)

    def seen(row: int, column: int) -> int:
        """The class whose colour direction is closest to the pixel's (shading only scales brightness)."""
        return int(classes[np.argmax(directions @ image[row, column].astype(np.float64))])

    assert seen(120, 192) == 9 and seen(70, 192) == 1 and seen(64, 370) == 13 and seen(64, 10) == 15
