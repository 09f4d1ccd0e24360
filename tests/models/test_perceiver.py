"""OccupancyPerceiver: shapes, gradients, FLoSP lifting on constructed cameras, construction errors, local weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

from occscene_pl.camera import Camera
from occscene_pl.geometry import VoxelProjection, project_voxels
from occscene_pl.models.perceiver import OccupancyPerceiver, lift_features

BACKBONE = "mobilenetv3_small_050"  # 0.27 M parameters, strides 2..32
IMAGE = (32, 96)


def tiny_perceiver(grid: tuple[int, int, int], **kwargs: object) -> OccupancyPerceiver:
    options = {"backbone": BACKBONE, "feature_dim": 8, "decoder_dim": 32, **kwargs}
    return OccupancyPerceiver(num_classes=5, grid_size=grid, **options)  # type: ignore[arg-type]


def kitti_like_inputs(batch: int, views: int, voxel_size: float = 0.4, seed: int = 0) -> dict[str, Any]:
    """Cameras looking along the voxel frame's +x (KITTI axes: x forward, y left, z up)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = IMAGE
    intrinsics = torch.tensor([[40.0, 0.0, width / 2], [0.0, 40.0, height / 2], [0.0, 0.0, 1.0]])
    camera = torch.eye(4)
    camera[:3, :3] = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    cameras = camera.repeat(batch, views, 1, 1)
    cameras[:, 1:, 0, 3] = 0.5  # other views shifted sideways
    return {
        "images": torch.rand(batch, views, 3, height, width, generator=generator),
        "camera": Camera(
            intrinsics.expand(batch, views, 3, 3),
            cameras,
            torch.tensor([0.0, -3.2, -1.6]).expand(batch, 3),
            torch.full((batch,), voxel_size),
            IMAGE,
        ),
    }


@pytest.mark.parametrize(
    ("views", "project_scale", "grid", "context_prior"),
    [(1, 1, (16, 16, 8), True), (2, 1, (16, 16, 8), True), (1, 2, (16, 16, 16), True), (2, 2, (16, 16, 8), False)],
)
def test_output_shapes(views: int, project_scale: int, grid: tuple[int, int, int], context_prior: bool) -> None:
    model = tiny_perceiver(grid, project_scale=project_scale, context_prior=context_prior)
    output = model(**kitti_like_inputs(2, views))
    assert output["logits"].shape == (2, 5, *grid)
    assert torch.isfinite(output["logits"]).all()
    bottleneck = tuple(n // (4 * project_scale) for n in grid)
    assert model.bottleneck_size == bottleneck and model.relation_downsample == 4 * project_scale
    if context_prior:
        n_super = (bottleneck[0] // 2) * (bottleneck[1] // 2) * (bottleneck[2] // 2)
        assert output["relation_logits"].shape == (2, 4, bottleneck[0] * bottleneck[1] * bottleneck[2], n_super)
    else:
        assert "relation_logits" not in output


@pytest.mark.parametrize(("project_scale", "grid"), [(1, (16, 16, 6)), (2, (16, 12, 5))])
def test_non_divisible_grid_is_padded_and_cropped(project_scale: int, grid: tuple[int, int, int]) -> None:
    model = tiny_perceiver(grid, project_scale=project_scale, context_prior=False)
    divisor = 4 * project_scale
    assert model.padded_size == tuple(-(-n // divisor) * divisor for n in grid)
    images = kitti_like_inputs(1, 1)["images"].requires_grad_(True)
    output = model(**{**kitti_like_inputs(1, 1), "images": images})
    assert output["logits"].shape == (1, 5, *grid)
    output["logits"].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


@pytest.mark.parametrize(("lift_scales", "up_blocks"), [((2, 8), 4), ((8, 32), 2), ((1,), 4)])
def test_decoder_builds_only_the_needed_levels(lift_scales: tuple[int, ...], up_blocks: int) -> None:
    model = tiny_perceiver((16, 16, 8), project_scale=1, context_prior=False, lift_scales=lift_scales)
    assert len(model.decoder.up_blocks) == up_blocks  # encoder strides 2..32: one block per finer level used
    assert (model.decoder.image_block is not None) == (1 in lift_scales)
    assert model(**kitti_like_inputs(1, 1))["logits"].shape == (1, 5, 16, 16, 8)


def test_gradient_reaches_images_and_every_parameter() -> None:
    model = tiny_perceiver((16, 16, 16), project_scale=2).train()
    inputs = kitti_like_inputs(2, 2)
    images = inputs.pop("images").requires_grad_(True)
    output = model(images, **inputs)
    generator = torch.Generator().manual_seed(1)
    loss = (output["logits"] * torch.randn(output["logits"].shape, generator=generator)).sum()
    loss = loss + output["relation_logits"].square().mean()
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    no_grad = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_duplicated_view_equals_single_view() -> None:
    # The mean over views that see a voxel: the same image twice from the same camera changes nothing.
    model = tiny_perceiver((16, 16, 8), project_scale=1).eval()
    single = kitti_like_inputs(1, 1)
    camera = single["camera"]
    double = {
        "images": torch.cat([single["images"]] * 2, dim=1),
        "camera": dataclasses.replace(
            camera,
            intrinsics=torch.cat([camera.intrinsics] * 2, dim=1),
            voxel_to_camera=torch.cat([camera.voxel_to_camera] * 2, dim=1),
        ),
    }
    with torch.no_grad():
        torch.testing.assert_close(model(**double)["logits"], model(**single)["logits"])


def test_images_that_do_not_match_the_camera_are_refused() -> None:
    model = tiny_perceiver((16, 16, 8), project_scale=1)
    inputs = kitti_like_inputs(2, 1)
    with pytest.raises(ValueError, match="do not match the camera"):
        model(inputs["images"][:1], inputs["camera"])  # one scene, a camera of two
    with pytest.raises(ValueError, match="do not match the camera"):
        model(inputs["images"][..., :16, :], inputs["camera"])  # not the camera's image_size


def test_images_are_normalised_inside() -> None:
    model = tiny_perceiver((16, 16, 8), project_scale=1)
    torch.testing.assert_close(model.pixel_mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(model.pixel_std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    assert "pixel_mean" not in model.state_dict()  # constants, not checkpoint state


# ---------------------------------------------------------------- FLoSP on constructed cameras


def pixel_aligned_projection(width: int, height: int, shifts: list[float]) -> VoxelProjection:
    """Grid (width + 2, height, 1) at depth 2 m seen by one camera per shift: voxel (i, j) -> pixel (i - 1 + shift, j).

    Voxel centre x = i - 1, y = j, z = 2 (voxel size 1, origin (-1.5, -0.5, 1.5)) and fx = fy = 2, cx = shift,
    cy = 0, so u = 2 * (i - 1) / 2 + shift and v = j exactly.
    """
    views = len(shifts)
    intrinsics = torch.zeros(1, views, 3, 3)
    intrinsics[0, :, 0, 0], intrinsics[0, :, 1, 1], intrinsics[0, :, 2, 2] = 2.0, 2.0, 1.0
    intrinsics[0, :, 0, 2] = torch.tensor(shifts)
    return project_voxels(
        (width + 2, height, 1),
        torch.tensor([[-1.5, -0.5, 1.5]]),
        torch.tensor([1.0]),
        intrinsics,
        torch.eye(4).expand(1, views, 4, 4),
        (height, width),
    )


def test_flosp_puts_a_pixel_into_exactly_the_voxels_projecting_onto_it() -> None:
    height, width = 4, 6
    projection = pixel_aligned_projection(width, height, [0.0])
    feature_map = torch.zeros(1, 2, height, width)
    feature_map[0, :, 2, 3] = torch.tensor([1.5, -2.0])
    volume = lift_features({1: feature_map}, projection, (width + 2, height, 1))
    assert volume.shape == (1, 2, width + 2, height, 1)
    expected = torch.zeros(1, 2, width + 2, height, 1)
    expected[0, :, 3 + 1, 2, 0] = torch.tensor([1.5, -2.0])  # voxel i = u + 1
    torch.testing.assert_close(volume, expected)
    # Out-of-FOV voxels (u = -1 and u = W) get exactly 0 even from a map that is non-zero everywhere.
    volume = lift_features({1: torch.ones(1, 2, height, width)}, projection, (width + 2, height, 1))
    assert (volume[0, :, 0] == 0).all() and (volume[0, :, -1] == 0).all()
    assert (volume[0, :, 1:-1] == 1).all()


def test_flosp_coarse_scale_follows_monoscene_pixel_convention() -> None:
    # A hot pixel (row 1, col 2) of a 1:2 map covers image pixels u in {4, 5}, v in {2, 3} (MonoScene's u // 2);
    # bilinear sampling gives those 4 voxels the largest share (0.75 * 0.75) and their neighbours less.
    height, width = 8, 12
    projection = pixel_aligned_projection(width, height, [0.0])
    coarse = torch.zeros(1, 1, height // 2, width // 2)
    coarse[0, 0, 1, 2] = 1.0
    volume = lift_features({2: coarse}, projection, (width + 2, height, 1))[0, 0, 1:-1, :, 0]  # (u, v)
    top = torch.zeros(width, height, dtype=torch.bool)
    top[4:6, 2:4] = True
    torch.testing.assert_close(volume[top], torch.full((4,), 0.5625))
    assert volume[~top].max() < 0.5625
    torch.testing.assert_close(volume.sum(), torch.tensor(4.0))  # a 1:2 pixel spans 4 image pixels


def test_flosp_averages_over_the_views_that_see_a_voxel_and_sums_scales() -> None:
    height, width = 4, 6
    # View 0: u = i - 1 (sees i = 1..6); view 1: u = i + 1 (sees i = 0..4).
    projection = pixel_aligned_projection(width, height, [0.0, 2.0])
    fine = torch.stack([torch.full((1, height, width), 1.0), torch.full((1, height, width), 3.0)])  # (B*V, 1, H, W)
    coarse = torch.full((2, 1, height // 2, width // 2), 10.0)
    volume = lift_features({1: fine, 2: coarse}, projection, (width + 2, height, 1))[0, 0, :, :, 0]
    per_i = volume[:, 0]
    assert (volume == per_i[:, None]).all()  # constant along v
    expected = torch.tensor([3.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 0.0])  # only view 1, both, only view 0, none
    expected[:-1] += 10.0  # the coarse scale adds 10 wherever a view sees the voxel
    torch.testing.assert_close(per_i, expected)


# ---------------------------------------------------------------- construction errors and local weights


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grid_size": (16, 16, 6), "project_scale": 1}, r"grid_size \(16, 16, 6\) must be divisible by 4"),
        ({"grid_size": (16, 16, 12), "project_scale": 2}, r"divisible by 4 \* project_scale = 8"),
        ({"grid_size": (16, 16, 8), "project_scale": 1, "backbone": "hf-hub:timm/resnet10t"}, "Hugging Face Hub"),
        ({"grid_size": (16, 16, 4), "project_scale": 1}, "context_prior needs at least 2 bottleneck voxels"),
        ({"grid_size": (24, 24, 12), "project_scale": 3}, "power of two"),
        ({"grid_size": (16, 16, 8), "project_scale": 1, "feature_dim": 6}, "multiple of 4"),
        (
            {"grid_size": (16, 16, 8), "project_scale": 1, "lift_scales": (1, 3)},
            r"offers scales \[1, 2, 4, 8, 16, 32\]",
        ),
    ],
)
def test_construction_errors(kwargs: dict[str, object], message: str) -> None:
    options = {"num_classes": 5, "backbone": BACKBONE, "feature_dim": 8, "decoder_dim": 32, **kwargs}
    with pytest.raises(ValueError, match=message):
        OccupancyPerceiver(**options)  # type: ignore[arg-type]


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        tiny_perceiver((16, 16, 8), project_scale=1, pretrained=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize(("backbone", "other"), [("mobilenetv3_small_050", "resnet10t"), ("resnet10t", BACKBONE)])
def test_local_weights_are_loaded(backbone: str, other: str, tmp_path: Path) -> None:
    reference = timm.create_model(backbone, pretrained=False)
    torch.save(reference.state_dict(), tmp_path / "weights.pth")
    model = tiny_perceiver((16, 16, 8), project_scale=1, backbone=backbone, pretrained=str(tmp_path / "weights.pth"))
    encoder_state = model.encoder.state_dict()
    reference_state = reference.state_dict()
    shared = [key for key in encoder_state if key in reference_state]
    assert len(shared) > 10
    for key in shared:
        assert torch.equal(encoder_state[key], reference_state[key]), key
    torch.save(timm.create_model(other, pretrained=False).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not hold weights"):
        tiny_perceiver((16, 16, 8), project_scale=1, backbone=backbone, pretrained=str(tmp_path / "other.pth"))
