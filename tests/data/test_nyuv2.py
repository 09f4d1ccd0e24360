"""NYUv2 SSC reader: SSCNet RLE decoding, class map, MonoScene's downsampling, axes, camera, cache, pkl, errors."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from occscene_pl.data import nyuv2
from occscene_pl.data.base import OPTIONAL_SAMPLE_KEYS, SAMPLE_KEYS
from occscene_pl.data.nyuv2 import (
    NYU_INTRINSICS,
    NYUV2_CLASS_WEIGHTS,
    NYUV2_CLASSES,
    SEG_CLASS_MAP,
    NYUv2DataModule,
    NYUv2Dataset,
    downsample_labels,
    read_sscnet_bin,
    write_sscnet_bin,
)
from occscene_pl.geometry import project_voxels, vox2pix
from tests.fakes.nyuv2 import (
    NYU_K,
    encode_rle,
    expected_nyu12,
    fake_camera_pose,
    fake_image,
    write_fake_nyuv2,
    write_fake_scene,
    write_monoscene_pkl,
)

SMALL_GRID = (8, 8, 4)  # (X, Y, Z); the .bin holds (32, 16, 32) voxels in [X, Z, Y] order
SMALL_FULL = (32, 16, 32)
REAL_GRID = (60, 60, 36)


def monoscene_downsample(label: np.ndarray, ds: int) -> np.ndarray:
    """MonoScene's ``_downsample_label``, block by block (``docs/design.md`` §8.4), as the brute-force reference."""
    small = tuple(s // ds for s in label.shape)
    out = np.zeros(small, dtype=np.uint8)
    for x, y, z in np.ndindex(*small):
        block = label[x * ds : (x + 1) * ds, y * ds : (y + 1) * ds, z * ds : (z + 1) * ds].astype(np.int32).ravel()
        n0, n255 = int((block == 0).sum()), int((block == 255).sum())
        if n0 + n255 > 0.95 * ds**3:
            out[x, y, z] = 0 if n0 > n255 else 255
        else:
            out[x, y, z] = np.argmax(np.bincount(block[(block > 0) & (block < 255)]))
    return out


def expected_target(labels12: np.ndarray, ds: int = 4) -> np.ndarray:
    """The reference target of a large grid: uniform blocks take their value, the others go through the loop."""
    a, b, c = (s // ds for s in labels12.shape)
    blocks = labels12.reshape(a, ds, b, ds, c, ds).transpose(0, 2, 4, 1, 3, 5).reshape(a, b, c, -1)
    out = blocks[..., 0].copy()
    for x, y, z in zip(*np.nonzero(blocks.min(-1) != blocks.max(-1)), strict=True):
        sub = labels12[x * ds : (x + 1) * ds, y * ds : (y + 1) * ds, z * ds : (z + 1) * ds]
        out[x, y, z] = monoscene_downsample(sub, ds)[0, 0, 0]
    return out


def rle_bytes(origin: list[float], pose: np.ndarray, pairs: list[tuple[int, int]]) -> bytes:
    header = np.array(origin + list(np.asarray(pose).reshape(-1)), dtype="<f4").tobytes()
    return header + np.array(pairs, dtype="<u4").reshape(-1).tobytes()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("nyu_small")
    return write_fake_nyuv2(root, {"train": 3, "test": 2}, SMALL_GRID, seed=3)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One full-size scene: a 240 x 144 x 240 RLE and a 640 x 480 JPEG."""
    root = tmp_path_factory.mktemp("nyu_real")
    written = write_fake_nyuv2(root, {"train": 1}, REAL_GRID, seed=4)
    dataset = NYUv2Dataset(root, "train")
    target = expected_target(written["scenes"]["train"][0]["labels12"])
    return {**written, "dataset": dataset, "sample": dataset[0], "target": target}


@pytest.fixture
def small_copy(small: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """A private copy of the small tree (tests that modify files or caches)."""
    root = tmp_path / "nyu"
    shutil.copytree(small["root"], root, ignore=shutil.ignore_patterns(".occscene_cache"))
    scenes = {
        split: [
            {**s, "bin": root / f"NYU{split}" / s["bin"].name, "color": root / f"NYU{split}" / s["color"].name}
            for s in items
        ]
        for split, items in small["scenes"].items()
    }
    return {**small, "root": root, "scenes": scenes}


# --------------------------------------------------------------------------------------------------------------------
# constants


@pytest.mark.parametrize(("raw", "mapped"), [(0, 0), (1, 1), (4, 4), (5, 11), (6, 5), (16, 9), (17, 8), (36, 11)])
def test_seg_class_map_spot_checks(raw: int, mapped: int) -> None:
    assert SEG_CLASS_MAP[raw] == mapped


def test_constants() -> None:
    assert SEG_CLASS_MAP[255] == 255
    assert sorted(SEG_CLASS_MAP) == [*range(37), 255]
    assert len(NYUV2_CLASSES) == 12 and NYUV2_CLASSES[9] == "tvs" and NYUV2_CLASSES[11] == "objects"
    assert NYUV2_CLASS_WEIGHTS == (0.05,) + (1.0,) * 11
    np.testing.assert_array_equal(NYU_INTRINSICS, [[518.8579, 0, 320], [0, 518.8579, 240], [0, 0, 1]])
    assert NYUv2Dataset.default_grid_size == (60, 60, 36)
    assert NYUv2Dataset.splits == ("train", "test")


# --------------------------------------------------------------------------------------------------------------------
# the SSCNet RLE format


def test_rle_decodes_hand_written_bytes(tmp_path: Path) -> None:
    pose = np.arange(16, dtype=np.float32).reshape(4, 4)
    path = tmp_path / "scene.bin"
    path.write_bytes(rle_bytes([1.5, -2.0, 0.25], pose, [(0, 5), (5, 3), (255, 4), (16, 2), (0, 0), (36, 10)]))
    origin, cam_pose, labels = read_sscnet_bin(path, (2, 3, 4))
    np.testing.assert_array_equal(origin, [1.5, -2.0, 0.25])
    assert cam_pose.dtype == np.float32 and cam_pose[0, 1] == 1.0 and cam_pose[1, 0] == 4.0  # row-major
    assert labels.dtype == np.uint8 and labels.shape == (2, 3, 4)
    flat = [0] * 5 + [11] * 3 + [255] * 4 + [9] * 2 + [11] * 10
    np.testing.assert_array_equal(labels.reshape(-1), flat)
    # C order: flat index = a0 * 12 + a1 * 4 + a2.
    assert (
        labels[1, 0, 0] == 9
        and labels[0, 2, 0] == 255
        and labels[0, 1, 3] == 11
        and labels[0, 1, 0] == 0
        and labels[0, 1, 1] == 11
    )


def test_writer_produces_hand_computed_bytes(tmp_path: Path) -> None:
    labels = np.array([0, 0, 5, 5, 5, 255, 36, 36], dtype=np.uint8).reshape(1, 2, 4)
    pose = np.eye(4, dtype=np.float32)
    path = tmp_path / "out" / "scene.bin"
    write_sscnet_bin(path, np.array([0.5, 1.0, -1.0]), pose, labels)
    assert path.read_bytes() == rle_bytes([0.5, 1.0, -1.0], pose, [(0, 2), (5, 3), (255, 1), (36, 2)])
    assert path.read_bytes() == encode_rle(np.array([0.5, 1.0, -1.0]), pose, labels)
    assert sorted(p.name for p in path.parent.iterdir()) == ["scene.bin"]  # no temporary left behind
    _, _, decoded = read_sscnet_bin(path, (1, 2, 4))
    np.testing.assert_array_equal(decoded.reshape(-1), [0, 0, 11, 11, 11, 255, 11, 11])


def test_writer_round_trips_a_room(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels37 = rng.choice(np.array([0, 0, 0, 2, 3, 9, 16, 255], np.uint8), size=SMALL_FULL)
    pose = fake_camera_pose(np.zeros(3), (4.8, 4.8, 2.4), rng)
    write_sscnet_bin(tmp_path / "a.bin", np.array([1.0, 2.0, 3.0]), pose, labels37)
    origin, cam_pose, labels = read_sscnet_bin(tmp_path / "a.bin", SMALL_FULL)
    np.testing.assert_array_equal(labels, expected_nyu12(labels37))
    np.testing.assert_array_equal(cam_pose, pose)
    np.testing.assert_array_equal(origin, [1.0, 2.0, 3.0])


def test_writer_rejects_non_sscnet_ids(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="0..36 or 255"):
        write_sscnet_bin(tmp_path / "a.bin", np.zeros(3), np.eye(4), np.full((2, 2, 2), 37, np.uint8))
    assert not (tmp_path / "a.bin").exists()


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\x00" * 75, "shorter than the 76-byte header"),
        (rle_bytes([0, 0, 0], np.eye(4), [(0, 24)]) + b"\x00" * 4, "even number of uint32"),
        (rle_bytes([0, 0, 0], np.eye(4), [(0, 24)])[:-2], "even number of uint32"),
        (rle_bytes([0, 0, 0], np.eye(4), [(0, 20), (3, 3)]), "sum to 23 voxels, expected 24"),
        (rle_bytes([0, 0, 0], np.eye(4), [(0, 20), (3, 5)]), "sum to 25 voxels, expected 24"),
        (rle_bytes([0, 0, 0], np.eye(4), []), "sum to 0 voxels"),
        (rle_bytes([0, 0, 0], np.eye(4), [(0, 20), (37, 4)]), "pair 1 has value 37"),
        (rle_bytes([0, 0, 0], np.eye(4), [(254, 20), (0, 4)]), "pair 0 has value 254"),
        (rle_bytes([0, 0, 0], np.eye(4), [(0, 20), (2**32 - 1, 4)]), "value 4294967295"),
    ],
)
def test_rle_errors_name_the_file(tmp_path: Path, payload: bytes, match: str) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=match) as info:
        read_sscnet_bin(path, (2, 3, 4))
    assert str(path) in str(info.value)


def test_rle_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        read_sscnet_bin(tmp_path / "nope.bin")


# --------------------------------------------------------------------------------------------------------------------
# MonoScene's downsampling rule


def random_blocks(rng: np.random.Generator, blocks: tuple[int, int, int], ds: int) -> np.ndarray:
    """Blocks whose semantic count straddles the 5 % threshold, with ties between 0/255 and between classes."""
    n = ds**3
    out = np.empty((*blocks, n), dtype=np.uint8)
    threshold = int(np.floor(0.05 * n))
    for index in np.ndindex(*blocks):
        n_sem = int(rng.choice([0, threshold, threshold + 1, rng.integers(0, n + 1)]))
        n_rest = n - n_sem
        n0 = int(rng.choice([n_rest // 2, (n_rest + 1) // 2, rng.integers(0, n_rest + 1)]))
        classes = rng.choice([1, 2, 7, 11, 254], size=2, replace=False)
        semantic = rng.choice(classes, size=n_sem)
        values = np.concatenate([np.zeros(n0), np.full(n_rest - n0, 255), semantic]).astype(np.uint8)
        out[index] = rng.permutation(values)
    grid = out.reshape(*blocks, ds, ds, ds).transpose(0, 3, 1, 4, 2, 5)
    return grid.reshape(blocks[0] * ds, blocks[1] * ds, blocks[2] * ds)


@pytest.mark.parametrize(("ds", "blocks"), [(2, (6, 5, 4)), (4, (5, 3, 6)), (8, (3, 2, 3)), (16, (2, 1, 2))])
def test_downsample_matches_monoscene_loop(ds: int, blocks: tuple[int, int, int]) -> None:
    labels = random_blocks(np.random.default_rng(ds), blocks, ds)
    expected = monoscene_downsample(labels, ds)
    assert len(np.unique(expected)) > 2  # the fixture reaches empty, ignore and semantic outcomes
    result = downsample_labels(labels, ds)
    assert result.dtype == np.uint8 and result.shape == blocks
    np.testing.assert_array_equal(result, expected)


def test_downsample_matches_monoscene_on_uniform_noise() -> None:
    rng = np.random.default_rng(7)
    labels = rng.choice(np.array([0, 255, 1, 3, 5]), p=[0.6, 0.3, 0.04, 0.03, 0.03], size=(16, 12, 16))
    for ds in (2, 4):
        np.testing.assert_array_equal(downsample_labels(labels, ds), monoscene_downsample(labels, ds))


def block(ds: int, counts: dict[int, int]) -> np.ndarray:
    values = np.concatenate([np.full(c, v, np.uint8) for v, c in counts.items()])
    assert values.size == ds**3
    return np.random.default_rng(0).permutation(values).reshape(ds, ds, ds)


@pytest.mark.parametrize(
    ("ds", "counts", "expected"),
    [
        (8, {3: 26, 0: 486}, 3),  # 486 <= 0.95 * 512 = 486.4: semantic
        (8, {3: 25, 0: 487}, 0),  # 487 > 486.4: empty
        (8, {3: 25, 255: 487}, 255),
        (8, {3: 25, 0: 244, 255: 243}, 0),
        (8, {3: 26, 0: 200, 255: 286}, 3),
        (10, {0: 950, 3: 50}, 3),  # exactly 0.95 * n is not "mostly empty": the comparison is strict
        (10, {0: 951, 3: 49}, 0),
        (2, {0: 8}, 0),  # uniform blocks keep their value
        (2, {255: 8}, 255),
        (2, {4: 8}, 4),
        (2, {0: 4, 255: 4}, 255),  # n0 == n255 -> 255
        (2, {0: 5, 255: 3}, 0),
        (4, {0: 30, 255: 30, 7: 4}, 7),  # 60 <= 60.8
        (4, {0: 31, 255: 30, 7: 3}, 0),
        (2, {7: 4, 5: 4}, 5),  # mode tie -> smallest id
        (4, {0: 60, 9: 2, 4: 2}, 4),
        (4, {0: 50, 9: 5, 4: 4, 2: 5}, 2),
        (4, {255: 40, 11: 8, 1: 16}, 1),
    ],
)
def test_downsample_hand_cases(ds: int, counts: dict[int, int], expected: int) -> None:
    assert downsample_labels(block(ds, counts), ds).item() == expected


def test_downsample_accepts_float_labels_and_rejects_bad_shapes() -> None:
    labels = block(4, {0: 50, 19: 14}).astype(np.float32)  # KITTI's _1_1.npy is float32
    assert downsample_labels(labels, 4).item() == 19
    np.testing.assert_array_equal(downsample_labels(labels, 1), labels.astype(np.uint8))
    with pytest.raises(ValueError, match="divide"):
        downsample_labels(np.zeros((8, 6, 8), np.uint8), 4)
    with pytest.raises(ValueError, match="3D"):
        downsample_labels(np.zeros((8, 8), np.uint8), 4)
    with pytest.raises(ValueError, match="0..255"):
        downsample_labels(np.full((4, 4, 4), 256, np.int32), 4)


def test_downsample_full_grid_matches_the_reference(real: dict[str, Any]) -> None:
    # Timed by benchmarks/bench_data.py (nyuv2_downsample_full_grid_ms).
    result = downsample_labels(real["scenes"]["train"][0]["labels12"], 4)
    assert result.shape == (60, 36, 60) and result.dtype == np.uint8
    np.testing.assert_array_equal(result, real["target"])


# --------------------------------------------------------------------------------------------------------------------
# the dataset: axes, geometry, schema


@pytest.mark.parametrize(
    "file_positions",
    [
        [(4, 8, 20), (5, 9, 21), (6, 10, 22), (7, 11, 23)],  # block (1, 2, 5) in file order [X, Z, Y]
        [(13, 6, 30), (12, 5, 29), (14, 7, 28), (15, 4, 31)],  # block (3, 1, 7)
    ],
)
def test_file_axes_become_x_y_z(tmp_path: Path, file_positions: list[tuple[int, int, int]]) -> None:
    labels37 = np.zeros(SMALL_FULL, dtype=np.uint8)
    for position in file_positions:
        labels37[position] = 16  # tvs
    pose = fake_camera_pose(np.zeros(3), (4.8, 4.8, 2.4), np.random.default_rng(0))
    write_fake_scene(tmp_path / "NYUtest", "NYU0001_0000", labels37, np.zeros(3), pose, np.zeros((48, 64, 3), np.uint8))
    occupancy = NYUv2Dataset(tmp_path, "test", grid_size=SMALL_GRID)[0]["occupancy"]
    assert occupancy.shape == (8, 8, 4) and occupancy.dtype == torch.uint8
    bx, bz, by = (c // 4 for c in file_positions[0])
    assert occupancy[bx, by, bz] == 9
    occupancy[bx, by, bz] = 0
    assert not occupancy.any()


def test_small_samples_follow_the_schema(small: dict[str, Any]) -> None:
    dataset = NYUv2Dataset(small["root"], "train", grid_size=SMALL_GRID)
    scenes = small["scenes"]["train"]
    assert len(dataset) == 3 and [dataset[i]["frame_id"] for i in range(3)] == [s["name"] for s in scenes]
    for index, scene in enumerate(scenes):
        sample = dataset[index]
        assert set(sample) == set(SAMPLE_KEYS)
        expected = monoscene_downsample(scene["labels12"], 4)
        np.testing.assert_array_equal(sample["occupancy"].numpy(), expected.swapaxes(1, 2))
        assert sample["image"].shape == (1, 3, 48, 64) and sample["image"].dtype == torch.float32
        torch.testing.assert_close(sample["voxel_origin"], torch.from_numpy(scene["origin"]))
        assert sample["voxel_size"].item() == pytest.approx(0.6)
        torch.testing.assert_close(
            sample["voxel_to_camera"][0], torch.from_numpy(np.linalg.inv(scene["cam_pose"].astype(np.float64))).float()
        )
        assert sample["prompt"].startswith("an indoor room with ")
    assert len(np.unique(np.concatenate([dataset[i]["occupancy"].numpy().ravel() for i in range(3)]))) >= 5


def test_fixture_intrinsics_are_the_resized_nyu_camera(small: dict[str, Any]) -> None:
    sample = NYUv2Dataset(small["root"], "test", grid_size=SMALL_GRID)[0]
    # 640x480 -> 64x48: f * 0.1, c -> (c + 0.5) * 0.1 - 0.5.
    expected = torch.tensor([[51.88579, 0.0, 31.55], [0.0, 51.88579, 23.55], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(sample["intrinsics"][0], expected)


def test_labelled_voxel_projects_where_a_pinhole_puts_it(tmp_path: Path) -> None:
    origin = np.array([-1.2, 0.4, -0.1], np.float32)
    pose = fake_camera_pose(origin, (4.8, 4.8, 2.4), np.random.default_rng(1))
    labels37 = np.zeros(SMALL_FULL, dtype=np.uint8)
    labels37[16:20, 4:8, 20:24] = 7  # raw bed -> 6, file block (4, 1, 5) = world voxel (x, y, z) = (4, 5, 1)
    write_fake_scene(tmp_path / "NYUtrain", "NYU0007_0000", labels37, origin, pose, np.zeros((48, 64, 3), np.uint8))
    sample = NYUv2Dataset(tmp_path, "train", grid_size=SMALL_GRID)[0]
    index = np.argwhere(sample["occupancy"].numpy() == 6)
    assert index.tolist() == [[4, 5, 1]]
    # By hand: world centre of voxel (4, 5, 1) at 0.6 m, into the camera, through the 64x48 pinhole.
    centre = origin.astype(np.float64) + 0.6 * np.array([4.5, 5.5, 1.5])
    cam = pose[:3, :3].T.astype(np.float64) @ (centre - pose[:3, 3])
    assert cam[2] > 0
    u = 51.88579 * cam[0] / cam[2] + 31.55
    v = 51.88579 * cam[1] / cam[2] + 23.55
    projection = project_voxels(
        SMALL_GRID,
        sample["voxel_origin"][None],
        sample["voxel_size"][None],
        sample["intrinsics"][None],
        sample["voxel_to_camera"][None],
        sample["image"].shape[-2:],
    )
    flat = np.ravel_multi_index(tuple(index[0]), SMALL_GRID)
    np.testing.assert_allclose(projection.pixels[0, 0, flat].numpy(), [u, v], atol=1e-3)
    assert bool(projection.fov_mask[0, 0, flat]) and 0 <= u < 64 and 0 <= v < 48


def test_real_size_scene_loads_into_the_schema(real: dict[str, Any]) -> None:
    sample, scene = real["sample"], real["scenes"]["train"][0]
    assert scene["bin"].stat().st_size > 76 + 8 * 10_000  # realistic: tens of thousands of runs
    assert sample["occupancy"].shape == (60, 60, 36) and sample["occupancy"].dtype == torch.uint8
    assert sample["image"].shape == (1, 3, 480, 640) and sample["image"].dtype == torch.float32
    torch.testing.assert_close(sample["intrinsics"][0], torch.tensor(NYU_K, dtype=torch.float32))
    assert sample["voxel_size"].item() == pytest.approx(0.08)
    target = real["target"]
    assert target.shape == (60, 36, 60)
    np.testing.assert_array_equal(sample["occupancy"].numpy(), target.swapaxes(1, 2))


def test_real_projection_is_monoscene_vox2pix(real: dict[str, Any]) -> None:
    sample, scene = real["sample"], real["scenes"]["train"][0]
    # MonoScene: vox2pix(inv(cam_pose), cam_k, voxel_origin, 0.08, 640, 480, scene_size -> (60, 60, 36)).
    pix, fov, _ = vox2pix(np.linalg.inv(scene["cam_pose"]), NYU_K, scene["origin"], 0.08, 640, 480, REAL_GRID)
    assert 0.05 < fov.mean() < 0.95
    # The sample's own fields, through the same function, give MonoScene's pixels exactly.
    ours_np = vox2pix(
        sample["voxel_to_camera"][0].numpy(),
        sample["intrinsics"][0].numpy(),
        sample["voxel_origin"].numpy(),
        sample["voxel_size"].item(),
        640,
        480,
        sample["occupancy"].shape,
    )
    np.testing.assert_array_equal(ours_np[1], fov)
    np.testing.assert_array_equal(ours_np[0][fov], pix[fov])
    # The batched torch projection the models use agrees up to float32 ties.
    projection = project_voxels(
        REAL_GRID,
        sample["voxel_origin"][None],
        sample["voxel_size"][None],
        sample["intrinsics"][None],
        sample["voxel_to_camera"][None],
        (480, 640),
    )
    ours_fov = projection.fov_mask[0, 0].numpy()
    ours_pix = projection.rounded_pixels[0, 0].numpy()
    # Different float32 operation orders may move a pixel centre across a .5 boundary.
    assert (ours_fov != fov).mean() < 1e-4
    both = ours_fov & fov
    assert np.abs(ours_pix[both] - pix[both]).max() <= 1 and (ours_pix[both] != pix[both]).any(1).mean() < 1e-3
    # MonoScene's frustum masks: moveaxis(mask.reshape(60, 60, 36), [0, 1, 2], [0, 2, 1]) indexes the (60, 36, 60)
    # target; our mask indexes our (X, Y, Z) occupancy directly. Both must see the same labels.
    target = real["target"]
    monoscene_mask = np.moveaxis(fov.reshape(REAL_GRID), [0, 1, 2], [0, 2, 1])
    ours = sample["occupancy"].numpy()[fov.reshape(REAL_GRID)]
    np.testing.assert_array_equal(np.bincount(target[monoscene_mask], minlength=256), np.bincount(ours, minlength=256))
    assert len(np.unique(ours)) >= 4


def test_real_grid_rejects_resized_images(real: dict[str, Any], tmp_path: Path) -> None:
    split_dir = tmp_path / "NYUtrain"
    split_dir.mkdir()
    scene = real["scenes"]["train"][0]
    shutil.copy(scene["bin"], split_dir / scene["bin"].name)
    Image.fromarray(fake_image((240, 320), np.random.default_rng(0))).save(split_dir / scene["color"].name)
    with pytest.raises(ValueError, match="is 320x240, expected 640x480"):
        NYUv2Dataset(tmp_path, "train", cache_dir=tmp_path / "cache")[0]


# --------------------------------------------------------------------------------------------------------------------
# the decode cache


def forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("read_sscnet_bin called although a valid cache/pkl exists")

    monkeypatch.setattr(nyuv2, "read_sscnet_bin", fail)


def test_cache_is_written_and_reused(small_copy: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    root = small_copy["root"]
    first = NYUv2Dataset(root, "train", grid_size=SMALL_GRID)[1]["occupancy"]
    cache_dir = root / ".occscene_cache" / "nyuv2" / "train"
    name = small_copy["scenes"]["train"][1]["name"]
    assert sorted(p.name for p in cache_dir.iterdir()) == [f"{name}.npz"]  # nothing else, no temp files
    forbid_decoding(monkeypatch)
    again = NYUv2Dataset(root, "train", grid_size=SMALL_GRID)[1]["occupancy"]
    assert torch.equal(first, again)
    with pytest.raises(AssertionError, match="read_sscnet_bin called"):
        NYUv2Dataset(root, "train", grid_size=SMALL_GRID)[0]  # not cached yet: proves the patch bites


def test_cache_is_invalidated_when_the_bin_changes(small_copy: dict[str, Any]) -> None:
    root, scene = small_copy["root"], small_copy["scenes"]["train"][0]
    dataset = NYUv2Dataset(root, "train", grid_size=SMALL_GRID)
    before = dataset[0]["occupancy"]
    stat = scene["bin"].stat()
    walls = np.full(SMALL_FULL, 3, dtype=np.uint8)
    scene["bin"].write_bytes(encode_rle(scene["origin"], scene["cam_pose"], walls))
    os.utime(scene["bin"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    after = NYUv2Dataset(root, "train", grid_size=SMALL_GRID)[0]["occupancy"]
    assert not torch.equal(before, after)
    assert (after == 3).all()


def test_cache_is_invalidated_by_mtime_alone(small_copy: dict[str, Any]) -> None:
    # Same size, same mtime would be indistinguishable; a new mtime with same-size new content must be re-read.
    root, scene = small_copy["root"], small_copy["scenes"]["train"][0]
    NYUv2Dataset(root, "train", grid_size=SMALL_GRID)[0]
    data = bytearray(scene["bin"].read_bytes())
    data[0:4] = np.float32(9.5).tobytes()  # the origin's x
    stat = scene["bin"].stat()
    scene["bin"].write_bytes(bytes(data))
    os.utime(scene["bin"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert NYUv2Dataset(root, "train", grid_size=SMALL_GRID)[0]["voxel_origin"][0].item() == 9.5


@pytest.mark.parametrize("garbage", [b"", b"not a zip file", b"PK\x03\x04truncated"])
def test_damaged_cache_is_rebuilt(small_copy: dict[str, Any], garbage: bytes, tmp_path: Path) -> None:
    root, scene = small_copy["root"], small_copy["scenes"]["test"][0]
    cache = tmp_path / "cache"
    (cache / "test").mkdir(parents=True)
    (cache / "test" / f"{scene['name']}.npz").write_bytes(garbage)
    sample = NYUv2Dataset(root, "test", grid_size=SMALL_GRID, cache_dir=cache)[0]
    np.testing.assert_array_equal(
        sample["occupancy"].numpy(), monoscene_downsample(scene["labels12"], 4).swapaxes(1, 2)
    )
    with np.load(cache / "test" / f"{scene['name']}.npz") as npz:
        np.testing.assert_array_equal(npz["target_1_4"].swapaxes(1, 2), sample["occupancy"].numpy())
    assert not (root / ".occscene_cache").exists()  # an explicit cache_dir replaces the default


def test_unwritable_cache_falls_back_with_a_warning(small_copy: dict[str, Any], tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="decoding without a cache"):
        dataset = NYUv2Dataset(small_copy["root"], "test", grid_size=SMALL_GRID, cache_dir=blocker)
    assert dataset.cache_dir is None
    assert dataset[0]["occupancy"].shape == SMALL_GRID


def test_cache_write_failure_warns_and_leaves_no_file(
    small_copy: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(file: Any, **arrays: Any) -> None:
        file.write(b"PK\x03\x04 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nyuv2.np, "savez_compressed", disk_full)
    dataset = NYUv2Dataset(small_copy["root"], "test", grid_size=SMALL_GRID, cache_dir=tmp_path / "cache")
    with pytest.warns(
        UserWarning, match=r"cannot write the cache file .*\.npz .*No space left on device\); caching disabled"
    ):
        occupancy = dataset[0]["occupancy"]
    assert occupancy.shape == SMALL_GRID and dataset.cache_dir is None
    assert list((tmp_path / "cache" / "test").iterdir()) == []  # no partial .npz and no temporary file


# --------------------------------------------------------------------------------------------------------------------
# MonoScene's preprocessed .pkl


def pkl_data(name: str, rng: np.random.Generator) -> dict[str, Any]:
    values = np.array([0, 0, 0, 255, 2, 3, 5, 9, 11], np.uint8)
    pose = np.eye(4, dtype=np.float32)
    pose[:3, 3] = [0.1, -2.0, 1.3]
    return {
        "cam_pose": pose,
        "voxel_origin": np.array([-0.7, 0.2, -0.04], np.float32),
        "name": name,
        "target_1_4": rng.choice(values, size=(8, 4, 8)),
        "target_1_16": rng.choice(values, size=(2, 1, 2)),
    }


def test_preprocessed_pkl_is_read_instead_of_the_bin(
    small: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(5)
    written = {
        s["name"]: write_monoscene_pkl(tmp_path, "test", s["name"], pkl_data(s["name"], rng))
        for s in small["scenes"]["test"]
    }
    forbid_decoding(monkeypatch)
    dataset = NYUv2Dataset(small["root"], "test", grid_size=SMALL_GRID, preprocess_root=tmp_path)
    for index, (name, path) in enumerate(sorted(written.items())):
        with path.open("rb") as handle:
            data = pickle.load(handle)
        sample = dataset[index]
        assert sample["frame_id"] == name
        np.testing.assert_array_equal(sample["occupancy"].numpy(), data["target_1_4"].swapaxes(1, 2))
        np.testing.assert_allclose(sample["voxel_origin"].numpy(), data["voxel_origin"])
        np.testing.assert_allclose(sample["voxel_to_camera"][0].numpy(), np.linalg.inv(data["cam_pose"]), atol=1e-6)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"drop": "target_1_16"}, r"must be a dict with keys \['cam_pose', 'voxel_origin', 'name', 'target_1_4'"),
        ({"drop": "cam_pose"}, "got \\['name', 'target_1_16', 'target_1_4', 'voxel_origin'\\]"),
        (
            {"target_1_4": np.zeros((60, 36, 60), np.uint8)},
            r"target_1_4 has shape \(60, 36, 60\), expected \(8, 4, 8\)",
        ),
        ({"target_1_4": np.full((8, 4, 8), 12, np.uint8)}, "outside 0..11 and 255"),
        ({"name": "NYU9999_0000"}, "is for scene 'NYU9999_0000'"),
        ({"cam_pose": np.eye(3)}, r"cam_pose \(4, 4\)"),
    ],
)
def test_bad_pkl_errors_name_the_file(
    small: dict[str, Any], tmp_path: Path, change: dict[str, Any], match: str
) -> None:
    name = small["scenes"]["test"][0]["name"]
    data = pkl_data(name, np.random.default_rng(0))
    if "drop" in change:
        del data[change["drop"]]
    else:
        data.update(change)
    for scene in small["scenes"]["test"]:
        write_monoscene_pkl(
            tmp_path,
            "test",
            scene["name"],
            data if scene["name"] == name else pkl_data(scene["name"], np.random.default_rng(1)),
        )
    dataset = NYUv2Dataset(small["root"], "test", grid_size=SMALL_GRID, preprocess_root=tmp_path)
    with pytest.raises(ValueError, match=match) as info:
        dataset[0]
    assert f"{name}.pkl" in str(info.value)


def test_missing_pkl_fails_at_construction(small: dict[str, Any], tmp_path: Path) -> None:
    first = small["scenes"]["test"][0]["name"]
    write_monoscene_pkl(tmp_path, "test", first, pkl_data(first, np.random.default_rng(0)))
    missing = small["scenes"]["test"][1]["name"]
    with pytest.raises(FileNotFoundError, match=f"base/NYUtest/{missing}.pkl"):
        NYUv2Dataset(small["root"], "test", grid_size=SMALL_GRID, preprocess_root=tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# errors


def test_missing_split_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="NYUtrain"):
        NYUv2Dataset(tmp_path / "nowhere", "train")


def test_unknown_split(small: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="unknown split 'val'"):
        NYUv2Dataset(small["root"], "val", grid_size=SMALL_GRID)


def test_grid_must_be_square(small: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="X must equal Y"):
        NYUv2Dataset(small["root"], "train", grid_size=(8, 6, 4))


def test_empty_split_and_missing_colour_image(small_copy: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "empty" / "NYUtrain").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="contains no \\*.bin"):
        NYUv2Dataset(tmp_path / "empty", "train", grid_size=SMALL_GRID)
    scene = small_copy["scenes"]["train"][1]
    (small_copy["root"] / "NYUtrain" / scene["color"].name).unlink()
    with pytest.raises(FileNotFoundError, match=f"{scene['name']}_color.jpg does not exist"):
        NYUv2Dataset(small_copy["root"], "train", grid_size=SMALL_GRID)


@pytest.mark.parametrize(
    ("cut", "match"),
    [(lambda data: data[:40], "shorter than the 76-byte header"), (lambda data: data[:-8], "expected 16384")],
)
def test_damaged_bin_fails_at_load(small_copy: dict[str, Any], cut: Any, match: str) -> None:
    scene = small_copy["scenes"]["train"][2]
    path = small_copy["root"] / "NYUtrain" / scene["bin"].name
    path.write_bytes(cut(path.read_bytes()))
    dataset = NYUv2Dataset(small_copy["root"], "train", grid_size=SMALL_GRID)
    with pytest.raises(ValueError, match=match):
        dataset[2]
    assert dataset[0]["occupancy"].shape == SMALL_GRID


def test_wrong_grid_for_the_file_names_the_counts(small: dict[str, Any], tmp_path: Path) -> None:
    dataset = NYUv2Dataset(small["root"], "train", grid_size=(10, 10, 6), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="sum to 16384 voxels, expected 38400"):
        dataset[0]


# --------------------------------------------------------------------------------------------------------------------
# the DataModule


def test_datamodule_batches(small: dict[str, Any]) -> None:
    module = NYUv2DataModule(
        root=str(small["root"]), grid_size=SMALL_GRID, image_size=(48, 64), batch_size=2, color_jitter=0.4
    )
    assert module.val_split == "test" and module.test_split == "test" and module.predict_split == "test"
    assert module.num_classes == 12 and module.class_names == list(NYUV2_CLASSES) and module.grid_size == SMALL_GRID
    module.setup("fit")
    assert len(module.datasets["train"]) == 3 and len(module.datasets["val"]) == 2
    batch = next(iter(module.train_dataloader()))
    assert set(batch) == set(SAMPLE_KEYS) | set(OPTIONAL_SAMPLE_KEYS)
    assert batch["image"].shape == (2, 1, 3, 48, 64) and batch["image"].dtype == torch.float32
    assert batch["perceiver_image"].shape == batch["image"].shape
    assert batch["occupancy"].shape == (2, 8, 8, 4) and batch["occupancy"].dtype == torch.uint8
    assert batch["intrinsics"].shape == (2, 1, 3, 3) and batch["voxel_to_camera"].shape == (2, 1, 4, 4)
    assert batch["voxel_origin"].shape == (2, 3) and batch["voxel_size"].shape == (2,)
    assert all(isinstance(p, str) and p.startswith("an indoor room") for p in batch["prompt"])
    assert len(batch["frame_id"]) == 2
    val = next(iter(module.val_dataloader()))
    assert set(val) == set(SAMPLE_KEYS)  # no jitter in validation, hence no perceiver copy
    assert val["frame_id"] == [s["name"] for s in small["scenes"]["test"]]
    module.setup("test")
    assert len(module.datasets["test"]) == 2


def test_datamodule_rejects_val_split(small: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="val_split='val'"):
        NYUv2DataModule(root=str(small["root"]), val_split="val")
