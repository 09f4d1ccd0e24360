"""MambaDualAlignment: frustum geometry by hand, deformable conv vs Conv3d, and the residuals in a real tiny UNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from occscene_pl.camera import Camera
from occscene_pl.geometry import project_points
from occscene_pl.models.alignment import CameraEncoder, MambaDualAlignment
from occscene_pl.models.deform_conv import DeformConv3d
from occscene_pl.models.frustum import (
    depth_bin_centers,
    depth_bin_edges,
    frustum_grid,
    frustum_points,
    sample_frustum,
    splat_frustum,
)
from occscene_pl.models.generator import ResidualSpec, SceneGenerator

# Voxel frame x forward, y left, z up (SemanticKITTI-like); camera x right, y down, z forward.
AXES = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])


def _rig(translation: list[float]) -> torch.Tensor:
    t = torch.eye(4)
    t[:3, :3] = AXES
    t[:3, 3] = torch.tensor(translation)
    return t


@pytest.mark.parametrize(
    ("spacing", "depth_range", "expected"),
    [
        ("linear", (1.0, 9.0), [2.0, 4.0, 6.0, 8.0]),
        # edges 1 + 10 * k (k + 1) / 20 = 1, 2, 4, 7, 11
        ("linear_increasing", (1.0, 11.0), [1.5, 3.0, 5.5, 9.0]),
    ],
)
def test_depth_bin_centers(spacing: str, depth_range: tuple[float, float], expected: list[float]) -> None:
    torch.testing.assert_close(depth_bin_centers(4, depth_range, spacing), torch.tensor(expected))  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [(0.0, 5.0), (5.0, 2.0)])
def test_depth_range_must_be_positive_and_increasing(bad: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="depth_range"):
        depth_bin_centers(4, bad)


def test_one_occupied_voxel_lands_in_the_hand_computed_frustum_cell() -> None:
    # Grid 16 x 8 x 4 of 0.5 m from (0, -2, -1); voxel (8, 4, 1) has its centre at (4.25, 0.25, -0.25).
    occupancy = torch.zeros(1, 1, 16, 8, 4)
    occupancy[0, 0, 8, 4, 1] = 1.0
    # Image 16 x 32 px, latent 4 x 8 (scale 4): latent pixel (i, j) is centred on image pixel (4j + 1.5, 4i + 1.5).
    k = torch.tensor([[8.0, 0.0, 15.5], [0.0, 8.0, 7.5], [0.0, 0.0, 1.0]])
    # View 0 sees the voxel centre at camera (3.375, -1.125, 4.5): u = 8 * 0.75 + 15.5 = 21.5 (j = 5),
    # v = 8 * -0.25 + 7.5 = 5.5 (i = 1), depth 4.5 = bin 3 of 8 linear bins over [1, 9].
    # View 1 sees it at (8.125, 1.625, 6.5): u = 25.5 (j = 6), v = 9.5 (i = 2), depth bin 5.
    cams = torch.stack((_rig([3.625, -1.375, 0.25]), _rig([8.375, 1.375, 2.25])))[None]
    depths = depth_bin_centers(8, (1.0, 9.0))
    points = frustum_points(k.expand(1, 2, 3, 3), cams, (16, 32), (4, 8), depths)
    assert points.shape == (1, 2, 8, 4, 8, 3)
    torch.testing.assert_close(points[0, 0, 3, 1, 5], torch.tensor([4.25, 0.25, -0.25]))
    grid = frustum_grid(points, torch.tensor([[0.0, -2.0, -1.0]]), torch.tensor([0.5]), (16, 8, 4))
    frustum = sample_frustum(occupancy, grid)
    assert frustum.shape == (2, 1, 8, 4, 8)
    for view, cell in enumerate([(3, 1, 5), (5, 2, 6)]):
        expected = torch.zeros(8, 4, 8)
        expected[cell] = 1.0
        torch.testing.assert_close(frustum[view, 0], expected, atol=1e-5, rtol=0)


def test_frustum_points_project_back_to_latent_pixel_centres() -> None:
    # KITTI odometry 00 calibration, a 8x latent of a 370 x 1220 image; two views in one batch entry.
    k = torch.tensor([[718.856, 0.0, 607.1928], [0.0, 718.856, 185.2157], [0.0, 0.0, 1.0]])
    tr = torch.tensor(
        [
            [4.276802e-04, -9.999672e-01, -8.084491e-03, -1.198459e-02],
            [-7.210626e-03, 8.081198e-03, -9.999413e-01, -5.403984e-02],
            [9.999738e-01, 4.859485e-04, -7.206933e-03, -2.921968e-01],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    cams = torch.stack((tr, _rig([1.0, 2.0, -3.0])))[None]
    depths = depth_bin_centers(5, (2.0, 50.0), "linear_increasing")
    points = frustum_points(k.expand(1, 2, 3, 3), cams, (370, 1220), (46, 152), depths)
    for view in range(2):
        pixels, depth = project_points(points[:, view].reshape(1, -1, 3), k[None, None], cams[:, view : view + 1])
        pixels = pixels.reshape(5, 46, 152, 2)
        torch.testing.assert_close(depth.reshape(5, 46, 152), depths[:, None, None].expand(5, 46, 152))
        # latent pixel (i, j) is centred on image pixel ((j + 0.5) * 1220 / 152 - 0.5, (i + 0.5) * 370 / 46 - 0.5)
        centre = torch.tensor([1220 / 152 / 2 - 0.5, 370 / 46 / 2 - 0.5])
        torch.testing.assert_close(pixels[0, 0, 0], centre, atol=1e-3, rtol=0)
        torch.testing.assert_close(
            pixels[4, 45, 151], centre + torch.tensor([151 * 1220 / 152, 45 * 370 / 46]), atol=1e-3, rtol=0
        )


def test_depth_bin_edges_bound_the_centres() -> None:
    torch.testing.assert_close(depth_bin_edges(4, (1.0, 11.0), "linear_increasing"), torch.tensor([1, 2, 4, 7, 11.0]))
    edges = depth_bin_edges(3, (2.0, 8.0))
    torch.testing.assert_close(depth_bin_centers(3, (2.0, 8.0)), 0.5 * (edges[:-1] + edges[1:]))


# --- splatting: every in-view voxel centre is averaged into the frustum cell it projects into -------------------


def test_two_voxels_in_one_cell_are_averaged() -> None:
    # Voxels (0, 0, 0) and (1, 0, 0) of a 2 x 1 x 1 grid of 0.5 m from (4, -0.25, -0.25): centres (4.25, 0, 0) and
    # (4.75, 0, 0), i.e. camera (0, 0, 4.25) and (0, 0, 4.75) for a camera at the origin looking along +x. With
    # cx = cy = 3 both project to pixel (3, 3) of an 8 x 8 image: latent pixel (0, 0) of 2 x 2 ((3 + 0.5) * 2 / 8
    # = 0.875), depth bin 1 = [3, 5) of 4 bins over [1, 9]. Every other cell centre lies outside the grid.
    k = torch.tensor([[8.0, 0.0, 3.0], [0.0, 8.0, 3.0], [0.0, 0.0, 1.0]])
    probabilities = torch.tensor([[0.2, 0.6], [0.8, 0.4]]).reshape(1, 2, 2, 1, 1).requires_grad_(True)
    values, weight, count = splat_frustum(
        probabilities,
        k[None, None],
        _rig([0.0, 0.0, 0.0])[None, None],
        torch.tensor([[4.0, -0.25, -0.25]]),
        torch.tensor([0.5]),
        (8, 8),
        (2, 2),
        depth_bin_edges(4, (1.0, 9.0)),
    )
    assert values.shape == (1, 2, 4, 2, 2) and weight.shape == count.shape == (1, 1, 4, 2, 2)
    expected = torch.zeros(1, 2, 4, 2, 2)
    expected[0, :, 1, 0, 0] = torch.tensor([0.4, 0.6])
    torch.testing.assert_close(values, expected)
    assert count[0, 0, 1, 0, 0] == 2 and count.sum() == 2
    assert weight[0, 0, 1, 0, 0] == 1 and weight.sum() == 1
    values[0, 1, 1, 0, 0].backward()
    torch.testing.assert_close(probabilities.grad, torch.tensor([[0.0, 0.0], [0.5, 0.5]]).reshape(1, 2, 2, 1, 1))


def test_one_occupied_voxel_is_splatted_into_the_hand_computed_frustum_cell() -> None:
    # The scene of test_one_occupied_voxel_lands_in_the_hand_computed_frustum_cell: voxel (8, 4, 1) projects into
    # cell (3, 1, 5) of view 0 and (5, 2, 6) of view 1; every other voxel is empty.
    occupancy = torch.zeros(1, 1, 16, 8, 4)
    occupancy[0, 0, 8, 4, 1] = 1.0
    k = torch.tensor([[8.0, 0.0, 15.5], [0.0, 8.0, 7.5], [0.0, 0.0, 1.0]])
    cams = torch.stack((_rig([3.625, -1.375, 0.25]), _rig([8.375, 1.375, 2.25])))[None]
    values, _, count = splat_frustum(
        occupancy,
        k.expand(1, 2, 3, 3),
        cams,
        torch.tensor([0.0, -2.0, -1.0]),
        0.5,
        (16, 32),
        (4, 8),
        depth_bin_edges(8, (1.0, 9.0)),
        fill_empty=False,
    )
    for view, cell in enumerate([(3, 1, 5), (5, 2, 6)]):
        n = int(count[view, 0][cell])
        assert n >= 1
        expected = torch.zeros(8, 4, 8)
        expected[cell] = 1.0 / n
        torch.testing.assert_close(values[view, 0], expected)


def _brute_force_cells(
    k: torch.Tensor,
    cam: torch.Tensor,
    origin: list[float],
    size: float,
    grid: tuple[int, int, int],
    image: tuple[int, int],
    latent: tuple[int, int],
    edges: torch.Tensor,
) -> np.ndarray:
    """Flat cell ``(d * h + i) * w + j`` of every voxel (C order), -1 outside the image / depth range."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in grid], indexing="ij"), axis=-1).reshape(-1, 3)
    centres = torch.tensor(np.asarray(origin) + (index + 0.5) * size, dtype=torch.float64)
    pixels, depth = project_points(centres[None], k[None, None].double(), cam[None, None].double())
    u, v, z = pixels[0, 0, :, 0].numpy(), pixels[0, 0, :, 1].numpy(), depth[0, 0].numpy()
    e = edges.double().numpy()
    inside = (z >= e[0]) & (z < e[-1]) & (u >= -0.5) & (u < image[1] - 0.5) & (v >= -0.5) & (v < image[0] - 0.5)
    j = np.floor((u + 0.5) * latent[1] / image[1]).astype(np.int64)
    i = np.floor((v + 0.5) * latent[0] / image[0]).astype(np.int64)
    d = np.searchsorted(e, z, side="right") - 1
    return np.where(inside, (d * latent[0] + i) * latent[1] + j, -1)


@pytest.mark.parametrize("spacing", ["linear", "linear_increasing"])
def test_splat_means_match_a_brute_force_average_over_voxel_centres(spacing: str) -> None:
    # Generic cameras (no voxel centre on a cell boundary), two samples with their own origin and voxel size.
    torch.manual_seed(0)
    grid, image, latent = (12, 10, 6), (24, 40), (6, 10)
    k = torch.tensor([[21.3, 0.0, 19.7], [0.0, 20.9, 11.2], [0.0, 0.0, 1.0]])
    yaw = torch.tensor(0.13)
    rotation = torch.tensor([[yaw.cos(), -yaw.sin(), 0.0], [yaw.sin(), yaw.cos(), 0.0], [0.0, 0.0, 1.0]])
    cams = torch.stack([_rig([0.31, -0.17, 0.23]), _rig([-0.52, 0.11, 0.37])])
    cams[1, :3, :3] = cams[1, :3, :3] @ rotation
    origins, sizes = [[0.2, -1.4, -0.7], [0.45, -1.1, -0.9]], [0.25, 0.3]
    edges = depth_bin_edges(4, (0.8, 4.1), spacing)  # type: ignore[arg-type]
    probabilities = torch.rand(2, 3, *grid)
    values, weight, count = splat_frustum(
        probabilities,
        k.expand(2, 2, 3, 3),
        cams.expand(2, 2, 4, 4),
        torch.tensor(origins),
        torch.tensor(sizes),
        image,
        latent,
        edges,
        fill_empty=False,
    )
    cells = 4 * latent[0] * latent[1]
    for b in range(2):
        for view in range(2):
            cell = _brute_force_cells(k, cams[view], origins[b], sizes[b], grid, image, latent, edges)
            seen = cell >= 0
            assert seen.sum() > 50
            expected_count = np.bincount(cell[seen], minlength=cells)
            sums = np.zeros((3, cells))
            np.add.at(sums.T, cell[seen], probabilities[b].reshape(3, -1).T.numpy()[seen])
            expected = sums / np.maximum(expected_count, 1)
            entry = b * 2 + view
            np.testing.assert_array_equal(count[entry].reshape(-1).numpy(), expected_count)
            np.testing.assert_allclose(values[entry].reshape(3, -1).numpy(), expected, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(weight[entry].reshape(-1).numpy(), (expected_count > 0).astype(np.float32))


def _near_scene() -> dict:
    """_scene's 8 x 8 x 4 grid of 0.5 m seen from 1 m: near the camera a voxel spans several latent pixels."""
    scene = _scene(2, 2)
    return dict(
        intrinsics=scene["intrinsics"],
        voxel_to_camera=scene["voxel_to_camera"],
        voxel_origin=scene["voxel_origin"],
        voxel_size=scene["voxel_size"],
        image_size=(32, 32),
        latent_size=(8, 8),
    )


def test_cells_without_a_voxel_centre_are_point_sampled_like_sample_frustum() -> None:
    near = _near_scene()
    probabilities = _scene(2, 2)["occupancy"]
    edges = depth_bin_edges(4, (1.0, 6.0))
    values, weight, count = splat_frustum(probabilities, **near, depth_edges=edges)
    centres = 0.5 * (edges[:-1] + edges[1:])
    cam = (near["intrinsics"], near["voxel_to_camera"], near["image_size"], near["latent_size"])
    grid = frustum_grid(frustum_points(*cam, centres), near["voxel_origin"], near["voxel_size"], (8, 8, 4))
    empty = (count == 0).expand_as(values)
    assert ((count == 0) & (weight > 0)).sum() > 10  # empty cells inside the grid exist and are filled
    assert (count > 0).sum() > 10
    torch.testing.assert_close(values[empty], sample_frustum(probabilities, grid)[empty])
    ones = sample_frustum(torch.ones(2, 1, 8, 8, 4), grid)
    torch.testing.assert_close(weight[count == 0], ones[count == 0])


def test_integer_labels_splat_like_their_one_hot_probabilities() -> None:
    near = _near_scene()
    labels = torch.randint(0, NUM_CLASSES, (2, 8, 8, 4), generator=torch.Generator().manual_seed(0))
    labels[:, 3:5] = 255
    one_hot = torch.nn.functional.one_hot(labels.clamp(max=NUM_CLASSES - 1), NUM_CLASSES).permute(0, 4, 1, 2, 3)
    one_hot = one_hot.float() * (labels != 255)[:, None]
    edges = depth_bin_edges(4, (1.0, 6.0))
    from_labels = splat_frustum(labels, **near, depth_edges=edges, num_classes=NUM_CLASSES)
    from_one_hot = splat_frustum(one_hot, **near, depth_edges=edges)
    for a, b in zip(from_labels, from_one_hot, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="num_classes"):
        splat_frustum(labels, **near, depth_edges=edges)


def test_half_precision_probabilities_are_splatted_in_float32() -> None:
    near = _near_scene()
    probabilities = _scene(2, 2)["occupancy"].bfloat16()
    edges = depth_bin_edges(4, (1.0, 6.0))
    values, _, _ = splat_frustum(probabilities, **near, depth_edges=edges)
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, splat_frustum(probabilities.float(), **near, depth_edges=edges)[0])


def test_splat_frustum_volume_embeds_the_mean_of_the_embedded_voxels() -> None:
    # The aligner embeds the cell means of the class probabilities (bias scaled by the cell weight): the same as
    # averaging the embedded voxels, and as point-sampling the embedded volume in cells without a voxel centre.
    spec = ResidualSpec(channels=[8], downsample=[1], mid_channels=8, mid_downsample=1)
    torch.manual_seed(6)
    mda = _tiny_mda(spec, d_model=8)
    torch.nn.init.normal_(mda.occupancy_embed.bias)
    near = _near_scene()
    probabilities = _scene(2, 2)["occupancy"]
    cam = (near["intrinsics"], near["voxel_to_camera"], near["voxel_origin"], near["voxel_size"])
    with torch.no_grad():
        features = mda.frustum_volume(probabilities, *cam, (32, 32), (8, 8))
        embedded = mda.occupancy_embed(probabilities)  # (B, E, X, Y, Z)
        grid = frustum_grid(frustum_points(*cam[:2], (32, 32), (8, 8), mda.depths), cam[2], cam[3], (8, 8, 4))
        expected = sample_frustum(embedded, grid)  # (B*V, E, D, h, w)
    edges = mda.depth_edges.float()
    for b in range(2):
        for view in range(2):
            cell = _brute_force_cells(
                near["intrinsics"][b, view],
                near["voxel_to_camera"][b, view],
                near["voxel_origin"][b].tolist(),
                float(near["voxel_size"][b]),
                (8, 8, 4),
                (32, 32),
                (8, 8),
                edges,
            )
            flat = expected[b * 2 + view].reshape(mda.embed_dim, -1)
            voxels = embedded[b].reshape(mda.embed_dim, -1)
            for c in np.unique(cell[cell >= 0]):
                flat[:, c] = voxels[:, torch.from_numpy(cell == c)].mean(dim=1)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    point = _tiny_mda(spec, d_model=8, frustum_sampling="point")
    point.load_state_dict(mda.state_dict())
    with torch.no_grad():
        differs = point.frustum_volume(probabilities, *cam, (32, 32), (8, 8))
    assert not torch.allclose(differs, features)


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_deform_conv_is_conv3d_at_zero_offsets(kernel_size: int) -> None:
    torch.manual_seed(0)
    deform = DeformConv3d(3, 5, kernel_size)
    conv = torch.nn.Conv3d(3, 5, kernel_size, padding=kernel_size // 2)
    with torch.no_grad():
        conv.weight.copy_(deform.weight)
        conv.bias.copy_(deform.bias)
    x = torch.randn(2, 3, 4, 5, 6)
    torch.testing.assert_close(deform(x), conv(x), rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(deform.offset_conv.weight) == 0


def test_deform_conv_offsets_are_depth_height_width_in_voxels() -> None:
    torch.manual_seed(0)
    deform = DeformConv3d(2, 3, 3)
    conv = torch.nn.Conv3d(2, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(deform.weight)
        conv.bias.copy_(deform.bias)
        deform.offset_conv.bias.view(27, 3)[:, 2] = 1.0  # every tap looks one voxel further along W
    x = torch.randn(1, 2, 3, 4, 5)
    torch.testing.assert_close(deform(x)[..., :-1], conv(x)[..., 1:], rtol=1e-5, atol=1e-5)


def test_camera_encoder_uses_size_normalised_intrinsics() -> None:
    k = torch.tensor([[[100.0, 0.0, 50.0], [0.0, 120.0, 20.0], [0.0, 0.0, 1.0]]])
    cam = _rig([1.0, 2.0, 3.0])[None]
    params = CameraEncoder.camera_parameters(k, cam, (40, 200))
    expected = torch.tensor([0.5, 3.0, 0.25, 0.5, 0, -1, 0, 0, 0, -1, 1, 0, 0, 1.0, 2.0, 3.0])
    torch.testing.assert_close(params[0], expected)
    encoder = CameraEncoder(6, num_frequencies=3)
    scaled = k.clone()
    scaled[:, :2] *= 2.0
    torch.testing.assert_close(encoder(k, cam, (40, 200)), encoder(scaled, cam, (80, 400)))
    assert encoder(k, cam, (40, 200)).shape == (1, 6)


# --- the module in a real tiny UNet ------------------------------------------------------------------------------

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=4,
    norm_num_groups=8,
)
NUM_CLASSES = 5


def _spec_from_unet(unet: UNet2DConditionModel, latent: torch.Tensor, text: torch.Tensor) -> ResidualSpec:
    """Read the residual layout off the UNet's own forward pass (hooks), not from its config."""
    shapes: list[torch.Size] = []
    mid: list[torch.Size] = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: shapes.append(o.shape))]
    for block in unet.down_blocks:
        hooks.append(block.register_forward_hook(lambda m, i, o: shapes.extend(r.shape for r in o[1])))
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: mid.append(o.shape)))
    with torch.no_grad():
        unet(latent, 10, text)
    for hook in hooks:
        hook.remove()
    h = latent.shape[-2]
    return ResidualSpec(
        channels=[s[1] for s in shapes],
        downsample=[h // s[2] for s in shapes],
        mid_channels=mid[0][1],
        mid_downsample=h // mid[0][2],
    )


def _scene(batch: int, views: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random soft occupancy on an 8 x 8 x 4 grid of 0.5 m and cameras 1 m behind it looking along +x."""
    g = torch.Generator().manual_seed(seed)
    k = torch.tensor([[16.0, 0.0, 15.5], [0.0, 16.0, 15.5], [0.0, 0.0, 1.0]])
    cams = torch.stack([_rig([0.3 * v, 0.0, 1.0]) for v in range(views)])
    return dict(
        occupancy=torch.softmax(torch.randn(batch, NUM_CLASSES, 8, 8, 4, generator=g), dim=1),
        intrinsics=k.expand(batch, views, 3, 3).clone(),
        voxel_to_camera=cams.expand(batch, views, 4, 4).clone(),
        voxel_origin=torch.tensor([0.0, -2.0, -1.0]).expand(batch, 3).clone(),
        voxel_size=torch.full((batch,), 0.5),
    )


def _tiny_mda(spec: ResidualSpec, **kwargs: object) -> MambaDualAlignment:
    options = dict(embed_dim=4, depth_bins=4, depth_range=(1.0, 6.0), patch_size=(2, 2, 2), num_layers=1, d_state=4)
    options.update(kwargs)
    return MambaDualAlignment(NUM_CLASSES, spec, latent_channels=4, **options)  # type: ignore[arg-type]


def _align(
    mda: MambaDualAlignment,
    occupancy: torch.Tensor | None,
    intrinsics: torch.Tensor,
    voxel_to_camera: torch.Tensor,
    voxel_origin: torch.Tensor,
    voxel_size: torch.Tensor,
    image_size: tuple[int, ...],
    latents: torch.Tensor,
    frames: int = 1,
) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """Call the aligner with the unpacked fields of :func:`_scene` gathered into a :class:`Camera`."""
    camera = Camera(intrinsics, voxel_to_camera, voxel_origin, voxel_size, image_size)  # type: ignore[arg-type]
    return mda(occupancy, camera, latents, frames=frames)


@pytest.fixture(scope="module")
def unet_and_spec() -> tuple[UNet2DConditionModel, ResidualSpec]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    spec = _spec_from_unet(unet, torch.randn(1, 4, 8, 8), torch.randn(1, 3, 16))
    return unet, spec


def test_spec_read_from_the_unet_is_the_diffusers_layout(unet_and_spec: tuple) -> None:
    _, spec = unet_and_spec
    # conv_in, block 0 (resnet+attention, downsampler), block 1 (resnet; the last block does not downsample)
    assert spec == ResidualSpec(channels=[16, 16, 16, 32], downsample=[1, 1, 2, 2], mid_channels=32, mid_downsample=2)
    # ... and it is what the generator reports for the same UNet (pixel space: 3 channels in and out)
    pixel_unet = {k: v for k, v in UNET_CONFIG.items() if k not in ("in_channels", "out_channels")}
    assert SceneGenerator(unet=pixel_unet, vae=None).residual_spec() == spec


def test_residuals_are_zero_at_init_and_leave_the_unet_output_unchanged(unet_and_spec: tuple) -> None:
    unet, spec = unet_and_spec
    torch.manual_seed(1)
    mda = _tiny_mda(spec)
    scene = _scene(2, 1)
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 16)
    down, mid = _align(mda, **scene, image_size=(32, 32), latents=latents)
    assert [tuple(r.shape) for r in down] == [(2, 16, 8, 8), (2, 16, 8, 8), (2, 16, 4, 4), (2, 32, 4, 4)]
    assert tuple(mid.shape) == (2, 32, 4, 4)
    assert all(torch.count_nonzero(r) == 0 for r in [*down, mid])
    with torch.no_grad():
        plain = unet(latents, 10, text).sample
        conditioned = unet(latents, 10, text, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    assert torch.equal(conditioned.sample, plain)


@pytest.mark.parametrize("sampling", ["splat", "point"])
def test_training_makes_residuals_nonzero_and_reaches_every_parameter(unet_and_spec: tuple, sampling: str) -> None:
    unet, spec = unet_and_spec
    torch.manual_seed(2)
    mda = _tiny_mda(spec, frustum_sampling=sampling)
    scene = _scene(2, 1, seed=1)
    latents, text, target = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 16), torch.randn(2, 4, 8, 8)
    optimiser = torch.optim.Adam(mda.parameters(), lr=1e-2)

    def step() -> tuple[list[torch.Tensor], torch.Tensor]:
        optimiser.zero_grad()
        down, mid = _align(mda, **scene, image_size=(32, 32), latents=latents)
        out = unet(latents, 10, text, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        torch.nn.functional.mse_loss(out.sample, target).backward()
        return down, mid

    step()  # zero convs block the gradient to everything upstream on this first step only
    optimiser.step()
    down, mid = step()
    assert all(r.abs().amax() > 0 for r in [*down, mid])
    missing = [n for n, p in mda.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert missing == []


def _randomise_zero_convs(mda: MambaDualAlignment) -> None:
    for conv in [*mda.down_convs, mda.mid_conv]:
        torch.nn.init.normal_(conv.weight, std=0.5)


@pytest.mark.parametrize(("batch", "views", "frames"), [(2, 2, 1), (4, 1, 2)])
def test_one_sequence_per_sample_spans_its_views_and_frames(batch: int, views: int, frames: int) -> None:
    spec = ResidualSpec(channels=[8, 12], downsample=[1, 2], mid_channels=12, mid_downsample=2)
    torch.manual_seed(3)
    mda = _tiny_mda(spec, d_model=8)
    _randomise_zero_convs(mda)
    scene = _scene(batch, views)
    latents = torch.randn(batch * views, 4, 8, 8)
    with torch.no_grad():
        down, mid = _align(mda, **scene, image_size=(32, 32), latents=latents, frames=frames)
        assert [tuple(r.shape) for r in down] == [(batch * views, 8, 8, 8), (batch * views, 12, 4, 4)]
        assert tuple(mid.shape) == (batch * views, 12, 4, 4)
        changed = latents.clone()
        changed[1] += 1.0  # the 2nd entry: view 1 of sample 0 (V = 2), or frame 1 of clip 0 (frames = 2)
        down2, _ = _align(mda, **scene, image_size=(32, 32), latents=changed, frames=frames)
    group = views * frames  # entries sharing one sequence
    per_entry = (down2[1] - down[1]).abs().flatten(1).amax(dim=1)
    assert per_entry[0] > 1e-5  # entry 0 sees entry 1 through the shared scan
    assert torch.all(per_entry[group:] == 0)  # other samples / clips do not


@pytest.mark.parametrize("sampling", ["splat", "point"])
def test_integer_labels_equal_their_one_hot_probabilities(sampling: str) -> None:
    spec = ResidualSpec(channels=[8], downsample=[1], mid_channels=8, mid_downsample=2)
    torch.manual_seed(4)
    mda = _tiny_mda(spec, d_model=8, frustum_sampling=sampling)
    _randomise_zero_convs(mda)
    scene = _scene(1, 1)
    labels = torch.randint(0, NUM_CLASSES, (1, 8, 8, 4))
    labels[0, :2] = 255
    one_hot = torch.nn.functional.one_hot(labels.clamp(max=NUM_CLASSES - 1), NUM_CLASSES).permute(0, 4, 1, 2, 3)
    one_hot = one_hot.float() * (labels != 255)[:, None]
    latents = torch.randn(1, 4, 8, 8)
    scene.pop("occupancy")
    with torch.no_grad():
        a = _align(mda, labels, **scene, image_size=(32, 32), latents=latents)
        b = _align(mda, one_hot, **scene, image_size=(32, 32), latents=latents)
    torch.testing.assert_close(a[0][0], b[0][0])
    torch.testing.assert_close(a[1], b[1])


def test_checkpointing_gives_the_same_numbers_and_gradients() -> None:
    spec = ResidualSpec(channels=[8], downsample=[2], mid_channels=8, mid_downsample=2)
    torch.manual_seed(5)
    mda = _tiny_mda(spec, d_model=8, depth_reduction="mean")
    _randomise_zero_convs(mda)
    with torch.no_grad():
        mda.deform_conv.offset_conv.bias.uniform_(-0.5, 0.5)  # fractional offsets: a real trilinear backward
    scene = _scene(1, 2)
    latents = torch.randn(2, 4, 8, 8)
    grads = []
    outputs = []
    for enabled in (False, True):
        mda.gradient_checkpointing = enabled
        assert mda.deform_conv.checkpoint_taps is enabled
        mda.zero_grad()
        down, mid = _align(mda, **scene, image_size=(32, 32), latents=latents)
        (down[0].square().sum() + mid.square().sum()).backward()
        outputs.append(down[0].detach())
        grads.append([p.grad.clone() for p in mda.parameters()])
    torch.testing.assert_close(outputs[1], outputs[0])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain)


def test_no_occupancy_means_no_residuals() -> None:
    mda = _tiny_mda(ResidualSpec(channels=[8], downsample=[1], mid_channels=8, mid_downsample=1))
    scene = _scene(1, 1)
    scene["occupancy"] = None  # type: ignore[assignment]
    assert _align(mda, **scene, image_size=(32, 32), latents=torch.randn(1, 4, 8, 8)) == (None, None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(latents=torch.randn(1, 4, 7, 8)), "divisible by the patch size"),
        (dict(latents=torch.randn(2, 4, 8, 8)), r"latents must be \(B\*V=1"),
        (dict(latents=torch.randn(1, 3, 8, 8)), r"latents must be"),
        (dict(occupancy=torch.rand(1, NUM_CLASSES + 1, 8, 8, 4)), f"occupancy must be \\(B, {NUM_CLASSES}"),
        (dict(voxel_to_camera=torch.eye(4).expand(1, 2, 4, 4)), "voxel_to_camera must be"),
        (dict(image_size=(32,)), "image_size"),
        (dict(frames=2), "multiple of frames"),
    ],
)
def test_bad_inputs_raise_clear_errors(change: dict, message: str) -> None:
    mda = _tiny_mda(ResidualSpec(channels=[8], downsample=[1], mid_channels=8, mid_downsample=1))
    inputs: dict = dict(_scene(1, 1), image_size=(32, 32), latents=torch.randn(1, 4, 8, 8))
    inputs.update(change)
    with pytest.raises(ValueError, match=message):
        _align(mda, **inputs)


def test_constructor_rejects_an_unknown_frustum_sampling() -> None:
    with pytest.raises(ValueError, match="frustum_sampling"):
        _tiny_mda(ResidualSpec(channels=[8], downsample=[1], mid_channels=8, mid_downsample=1), frustum_sampling="max")


def test_constructor_rejects_depth_bins_not_divisible_by_the_patch() -> None:
    with pytest.raises(ValueError, match="depth_bins"):
        _tiny_mda(ResidualSpec(channels=[8], downsample=[1], mid_channels=8, mid_downsample=1), depth_bins=5)


def test_mda_accepts_a_mapping_spec_and_counts_parameters() -> None:
    mda = _tiny_mda({"channels": [8], "downsample": [1], "mid_channels": 8, "mid_downsample": 1}, d_model=8)
    assert isinstance(mda.residual_spec, ResidualSpec)
    assert np.isfinite(sum(p.sum().item() for p in mda.parameters()))
