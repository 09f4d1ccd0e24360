"""Voxel -> pixel projection: batched torch version vs the MonoScene-exact NumPy port vs hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from occscene_pl.geometry import pixels_to_grid, project_points, project_voxels, vox2pix, voxel_centers

# KITTI odometry sequence 00: P2[:3, :3] and a velodyne -> camera transform of the real rig's shape.
KITTI_K = np.array([[718.856, 0.0, 607.1928], [0.0, 718.856, 185.2157], [0.0, 0.0, 1.0]])
KITTI_TR = np.array(
    [
        [4.276802e-04, -9.999672e-01, -8.084491e-03, -1.198459e-02],
        [-7.210626e-03, 8.081198e-03, -9.999413e-01, -5.403984e-02],
        [9.999738e-01, 4.859485e-04, -7.206933e-03, -2.921968e-01],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def test_voxel_centers_order_and_values() -> None:
    centers = voxel_centers((2, 3, 4), torch.tensor([0.0, -25.6, -2.0]), 0.2)
    assert centers.shape == (24, 3)
    # C order over (X, Y, Z): the flat index of (i, j, k) is i*12 + j*4 + k.
    torch.testing.assert_close(centers[1 * 12 + 2 * 4 + 3], torch.tensor([0.3, -25.6 + 0.5, -2.0 + 0.7]))
    batched = voxel_centers((2, 3, 4), torch.zeros(5, 3), torch.full((5,), 0.5))
    assert batched.shape == (5, 24, 3)


def test_project_points_by_hand() -> None:
    k = torch.tensor([[[[100.0, 0, 50], [0, 200.0, 20], [0, 0, 1]]]])
    t = torch.eye(4)[None, None]
    pixels, depth = project_points(torch.tensor([[[1.0, -2.0, 4.0], [0.0, 0.0, -1.0]]]), k, t)
    torch.testing.assert_close(pixels[0, 0, 0], torch.tensor([100 * 1 / 4 + 50, 200 * -2 / 4 + 20]))
    torch.testing.assert_close(depth[0, 0], torch.tensor([4.0, -1.0]))


def test_project_voxels_matches_monoscene_vox2pix_on_kitti() -> None:
    grid = (64, 64, 8)  # the KITTI extent at 0.8 m voxels
    origin, size = np.array([0.0, -25.6, -2.0]), 0.8
    pix, fov, pix_z = vox2pix(KITTI_TR, KITTI_K, origin, size, 1220, 370, grid)
    proj = project_voxels(
        grid,
        torch.tensor(origin)[None].float(),
        torch.tensor([size]),
        torch.tensor(KITTI_K)[None, None].float(),
        torch.tensor(KITTI_TR)[None, None].float(),
        (370, 1220),
    )
    assert proj.fov_mask.shape == (1, 1, 64 * 64 * 8)
    assert 0.05 < fov.mean() < 0.9  # a real frustum: some voxels inside, many outside
    assert np.array_equal(proj.fov_mask[0, 0].numpy(), fov)
    rounded = proj.rounded_pixels[0, 0].numpy()
    assert np.array_equal(rounded[fov], pix[fov])
    np.testing.assert_allclose(proj.depth[0, 0].numpy(), pix_z, rtol=1e-5, atol=1e-5)


def test_fov_is_strict_at_the_border() -> None:
    # Identity camera, a point exactly projecting to u = W must be outside, u = W - 1 inside.
    k = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1]])
    t = np.eye(4)
    width, height = 4, 2
    # one-voxel grids whose centre projects to chosen pixels at depth 1
    for u, inside in [(3.0, True), (4.0, False), (-1.0, False)]:
        origin = np.array([u - 0.5, 0.5, 0.5])
        _, fov, _ = vox2pix(t, k, origin, 1.0, width, height, (1, 1, 1))
        proj = project_voxels(
            (1, 1, 1),
            torch.tensor(origin)[None],
            1.0,
            torch.tensor(k)[None, None],
            torch.tensor(t)[None, None],
            (height, width),
        )
        assert bool(fov[0]) is inside
        assert bool(proj.fov_mask[0, 0, 0]) is inside


def test_points_behind_the_camera_are_outside_the_fov() -> None:
    k = torch.tensor([[[[10.0, 0, 5], [0, 10.0, 5], [0, 0, 1]]]])
    t = torch.eye(4)[None, None]
    proj = project_voxels((1, 1, 1), torch.tensor([[-0.5, -0.5, -3.5]]), 1.0, k, t, (10, 10))
    assert not proj.fov_mask.any()


@pytest.mark.parametrize("size", [(4, 6), (5, 3)])
def test_pixels_to_grid_hits_pixel_centres(size: tuple[int, int]) -> None:
    height, width = size
    image = torch.arange(height * width, dtype=torch.float32).reshape(1, 1, height, width)
    u, v = torch.meshgrid(torch.arange(width), torch.arange(height), indexing="xy")
    pixels = torch.stack([u, v], dim=-1).float()  # (H, W, 2)
    sampled = torch.nn.functional.grid_sample(image, pixels_to_grid(pixels, size)[None], align_corners=False)
    torch.testing.assert_close(sampled, image)
