"""The aligner sees the occupancy it is given: coverage of in-view voxels at the paper configs, and splat exactness.

Coverage = the fraction of in-view voxels (centre projecting inside the image, camera depth inside the aligner's
``depth_range``; computed independently with :func:`occscene_pl.geometry.project_points`) whose class probabilities
get a non-zero gradient from the residuals, with the zero-initialised output convs re-drawn at random. Grids, image
and latent sizes, depth bins / range and cameras are those of ``configs/{kitti,nyuv2,nuscenes_occupancy}.yaml`` with
the calibrations of the fake-data writers; the widths are small (coverage does not depend on them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from occscene_pl.camera import Camera
from occscene_pl.geometry import project_points
from occscene_pl.models.alignment import MambaDualAlignment
from occscene_pl.models.frustum import depth_bin_edges, frustum_grid, frustum_points, sample_frustum, splat_frustum
from occscene_pl.models.generator import ResidualSpec
from tests.fakes import nuscenes_occupancy as fake_nuscenes
from tests.fakes.nyuv2 import NYU_K, fake_camera_pose
from tests.fakes.semantic_kitti import KITTI_00_P2, KITTI_00_TR

LATENT_SCALE = 8  # Stable Diffusion's VAE
BAR = 0.90


@dataclass
class PaperScene:
    """One paper config's geometry: grid, cameras (``(1, V, ...)``), image size and aligner depth range."""

    name: str
    num_classes: int
    grid_size: tuple[int, int, int]
    voxel_size: float
    voxel_origin: tuple[float, float, float]
    image_size: tuple[int, int]
    depth_range: tuple[float, float]
    intrinsics: torch.Tensor
    voxel_to_camera: torch.Tensor

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.image_size[0] // LATENT_SCALE, self.image_size[1] // LATENT_SCALE


def _resized(k: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Intrinsics after resizing the image by ``(sx, sy)`` (occscene_pl.data.transforms' pixel-centre convention)."""
    k = np.array(k, dtype=np.float64)
    k[0, 0] *= sx
    k[1, 1] *= sy
    k[0, 2] = (k[0, 2] + 0.5) * sx - 0.5
    k[1, 2] = (k[1, 2] + 0.5) * sy - 0.5
    return k


def _scene(
    name: str,
    num_classes: int,
    grid: tuple[int, int, int],
    size: float,
    origin: Sequence[float],
    image: tuple[int, int],
    depth_range: tuple[float, float],
    ks: list[np.ndarray],
    cams: list[np.ndarray],
) -> PaperScene:
    return PaperScene(
        name,
        num_classes,
        grid,
        size,
        (float(origin[0]), float(origin[1]), float(origin[2])),
        image,
        depth_range,
        torch.tensor(np.stack(ks), dtype=torch.float32)[None],
        torch.tensor(np.stack(cams), dtype=torch.float32)[None],
    )


def kitti() -> PaperScene:
    """configs/kitti.yaml: sequence 00's P2 / Tr, MonoScene's 1220 x 370 top-left crop resized to 1024 x 320."""
    k = _resized(KITTI_00_P2[:, :3], 1024 / 1220, 320 / 370)
    return _scene("kitti", 20, (256, 256, 32), 0.2, (0.0, -25.6, -2.0), (320, 1024), (2.0, 52.0), [k], [KITTI_00_TR])


def nyuv2() -> PaperScene:
    """configs/nyuv2.yaml: fx = fy = 518.8579 at 640 x 480 resized to 512 x 384, the fake writer's camera pose."""
    origin = np.array([-1.5, 0.3, -0.05])
    pose = fake_camera_pose(origin, (4.8, 4.8, 2.88), np.random.default_rng(0)).astype(np.float64)
    k = _resized(NYU_K, 0.8, 0.8)
    return _scene("nyuv2", 12, (60, 60, 36), 0.08, origin, (384, 512), (0.3, 8.0), [k], [np.linalg.inv(pose)])


def nuscenes() -> PaperScene:
    """configs/nuscenes_occupancy.yaml: the fake writer's six-camera rig, 1600 x 900 cropped to 896 rows, 448 x 256."""
    f = fake_nuscenes
    lidar_to_ego = f._transform(f._quaternion_to_matrix(f.LIDAR_TO_EGO_ROTATION), f.LIDAR_TO_EGO_TRANSLATION)
    ks, cams = [], []
    for position, yaw, focal, cx, cy in f.CAMERA_RIG.values():
        cam_to_lidar = np.linalg.inv(lidar_to_ego) @ f._transform(f._camera_to_ego(yaw), position)
        k = np.array([[focal, 0.0, cx], [0.0, focal, cy - 4.0], [0.0, 0.0, 1.0]])  # crop box (0, 4, 1600, 900)
        ks.append(_resized(k, 448 / 1600, 256 / 896))
        cams.append(np.linalg.inv(cam_to_lidar))
    return _scene("nuscenes", 17, (512, 512, 40), 0.2, (-51.2, -51.2, -5.0), (256, 448), (1.0, 55.0), ks, cams)


def in_view_mask(scene: PaperScene) -> torch.Tensor:
    """``(X, Y, Z)``: voxel centre inside the image of some view at a depth inside the depth range."""
    axes = [scene.voxel_origin[a] + (torch.arange(n) + 0.5) * scene.voxel_size for a, n in enumerate(scene.grid_size)]
    height, width = scene.image_size
    near, far = scene.depth_range
    mask = torch.zeros(scene.grid_size, dtype=torch.bool)
    for x in range(scene.grid_size[0]):  # one x-slice at a time: bounded memory at nuScenes size
        centres = torch.stack(torch.meshgrid(axes[0][x : x + 1], axes[1], axes[2], indexing="ij"), dim=-1)
        pixels, depth = project_points(centres.reshape(1, -1, 3), scene.intrinsics, scene.voxel_to_camera)
        u, v = pixels[0, ..., 0], pixels[0, ..., 1]
        seen = (depth[0] >= near) & (depth[0] < far) & (u >= -0.5) & (u < width - 0.5) & (v >= -0.5)
        seen &= v < height - 0.5
        mask[x] = seen.any(dim=0).reshape(scene.grid_size[1:])
    return mask


def aligner_coverage(scene: PaperScene, sampling: str, in_view: torch.Tensor | None = None, seed: int = 0) -> float:
    """Fraction of in-view voxels whose class probabilities influence the residuals of a random-output aligner."""
    torch.manual_seed(seed)
    spec = ResidualSpec(channels=[8], downsample=[1], mid_channels=8, mid_downsample=2)
    mda = MambaDualAlignment(
        scene.num_classes,
        spec,
        latent_channels=4,
        embed_dim=4,
        depth_bins=32,
        depth_range=scene.depth_range,
        patch_size=(4, 2, 2),
        num_layers=1,
        d_state=4,
        d_model=8,
        frustum_sampling=sampling,  # type: ignore[arg-type]
    )
    for conv in [*mda.down_convs, mda.mid_conv]:
        torch.nn.init.normal_(conv.weight, std=0.5)
    probabilities = torch.rand(1, scene.num_classes, *scene.grid_size).requires_grad_(True)
    views = scene.intrinsics.shape[1]
    camera = Camera(
        scene.intrinsics,
        scene.voxel_to_camera,
        torch.tensor([scene.voxel_origin]),
        torch.tensor([scene.voxel_size]),
        scene.image_size,
    )
    down, mid = mda(probabilities, camera, torch.randn(views, 4, *scene.latent_size))
    loss = sum((r * torch.randn_like(r)).sum() for r in [*down, mid])
    loss.backward()  # type: ignore[union-attr]
    assert probabilities.grad is not None
    influences = probabilities.grad.abs().amax(dim=1)[0] > 0
    in_view = in_view_mask(scene) if in_view is None else in_view
    return float((influences & in_view).sum() / in_view.sum())


def frustum_coverage(scene: PaperScene, sampling: str, in_view: torch.Tensor | None = None) -> float:
    """Coverage of the frustum-resampling stage alone (class probabilities -> frustum volume, before the embedding)."""
    torch.manual_seed(0)
    edges = depth_bin_edges(32, scene.depth_range)
    probabilities = torch.rand(1, scene.num_classes, *scene.grid_size).requires_grad_(True)
    origin, size = torch.tensor([scene.voxel_origin]), torch.tensor([scene.voxel_size])
    if sampling == "splat":
        frustum, _, _ = splat_frustum(
            probabilities,
            scene.intrinsics,
            scene.voxel_to_camera,
            origin,
            size,
            scene.image_size,
            scene.latent_size,
            edges,
        )
    else:
        centres = 0.5 * (edges[:-1] + edges[1:])
        points = frustum_points(scene.intrinsics, scene.voxel_to_camera, scene.image_size, scene.latent_size, centres)
        frustum = sample_frustum(probabilities, frustum_grid(points, origin, size, scene.grid_size))
    (frustum * torch.randn_like(frustum)).sum().backward()
    assert probabilities.grad is not None
    influences = probabilities.grad.abs().amax(dim=1)[0] > 0
    in_view = in_view_mask(scene) if in_view is None else in_view
    return float((influences & in_view).sum() / in_view.sum())


SCENES = [pytest.param(kitti, id="kitti"), pytest.param(nyuv2, id="nyuv2"), pytest.param(nuscenes, id="nuscenes")]


@pytest.mark.parametrize("make_scene", SCENES)
def test_splatting_reads_every_in_view_voxel_where_point_sampling_skips_many(
    make_scene: Callable[[], PaperScene],
) -> None:
    scene = make_scene()
    in_view = in_view_mask(scene)
    assert in_view.float().mean() > 0.4  # the cameras look at the grid
    assert frustum_coverage(scene, "splat", in_view) >= BAR
    assert frustum_coverage(scene, "point", in_view) < BAR  # the old trilinear point sampling: 19 % / 73 % / 9 %


def test_every_in_view_voxel_influences_the_residuals_of_the_kitti_aligner() -> None:
    assert aligner_coverage(kitti(), "splat") >= BAR


@pytest.mark.slow
@pytest.mark.parametrize("make_scene", SCENES)
@pytest.mark.parametrize("sampling", ["splat", "point"])
def test_aligner_coverage_at_the_paper_configs(make_scene: Callable[[], PaperScene], sampling: str) -> None:
    coverage = aligner_coverage(make_scene(), sampling)
    assert coverage >= BAR if sampling == "splat" else coverage < BAR
