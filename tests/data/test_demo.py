"""The demo dataset: procedural scenes, the SemanticKITTI-layout writer, atomic regeneration and the DataModule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from occscene_pl.data import demo
from occscene_pl.data.base import SAMPLE_KEYS
from occscene_pl.data.demo import (
    DEMO_COLORS,
    DemoDataModule,
    demo_calibration,
    generate_demo_dataset,
    generate_street_scene,
    writer,
)
from occscene_pl.data.semantic_kitti import SEMANTIC_KITTI_CLASSES, read_calib

C = {name: index for index, name in enumerate(SEMANTIC_KITTI_CLASSES)}
GRID = (64, 64, 8)
VOXELS = 64 * 64 * 8
GROUND = 0  # z = -1.73 m lies in the first 0.8 m layer (-2.0 .. -1.2 m)
SEEDS = range(6)
SMALL_IMAGE = (32, 96)
# Real KITTI sequence-00 Tr (velodyne -> camera 0), as in its calib.txt.
KITTI_00_TR_ROWS = (
    "4.276802385584e-04 -9.999672484946e-01 -8.084491683471e-03 -1.198459927713e-02 "
    "-7.210626507497e-03 8.081198471645e-03 -9.999413164504e-01 -5.403984729748e-02 "
    "9.999738645903e-01 4.859485810390e-04 -7.206933692422e-03 -2.921968648686e-01"
)


def _scene(seed: int) -> np.ndarray:
    return generate_street_scene(np.random.default_rng(seed), GRID)


@pytest.fixture(scope="module")
def scenes() -> list[np.ndarray]:
    return [_scene(seed) for seed in SEEDS]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", num_train=4, num_val=2, num_workers=1)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------------


def test_scene_is_deterministic_per_seed() -> None:
    a, b, c = _scene(3), _scene(3), _scene(4)
    assert a.shape == GRID and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("seed", SEEDS)
def test_scene_layout_is_physically_sensible(scenes: list[np.ndarray], seed: int) -> None:
    labels = scenes[seed]
    assert set(np.unique(labels)) <= set(range(20))
    # A closed ground layer: every column has a ground-class or building voxel at the road height.
    ground_classes = {C[n] for n in ("road", "parking", "sidewalk", "other-ground", "terrain", "building")}
    assert set(np.unique(labels[:, :, GROUND])) <= ground_classes
    # Flat ground: road, sidewalk, parking and terrain only on the ground layer.
    for name in ("road", "parking", "sidewalk", "terrain", "other-ground"):
        assert not (labels[:, :, GROUND + 1 :] == C[name]).any(), name
    # The ego car stands on the road at the origin (x < 4 m, |y| < 1.2 m) with free space above.
    ego = labels[:5, 30:34]
    assert (ego[:, :, GROUND] == C["road"]).all()
    assert (ego[:, :, GROUND + 1 :] == 0).all()
    # Vehicles, people, trunks, poles and buildings stand on the ground: every such column is filled from the layer
    # above the ground up to its top with no gap (nothing floats; tree canopies rest on trunks).
    for name in ("car", "truck", "person", "bicyclist", "trunk", "pole", "building"):
        mask = labels == C[name]
        columns = mask.any(axis=2)
        if not columns.any():
            continue
        lowest = np.argmax(mask, axis=2)[columns]
        assert (lowest <= GROUND + 1).all(), name
    signs = np.argwhere(labels == C["traffic-sign"])
    for i, j, k in signs:
        assert labels[i, j, k - 1] in (C["pole"], C["traffic-sign"])
    cars = labels == C["car"]
    assert not (cars[:, :, GROUND + 3 :]).any()  # cars are at most ~2 m tall
    under_cars = labels[:, :, GROUND][cars[:, :, GROUND + 1]]
    assert set(np.unique(under_cars)) <= {C["road"], C["parking"]}


def test_class_fractions_are_plausible(scenes: list[np.ndarray]) -> None:
    counts = np.stack([np.bincount(s.reshape(-1), minlength=20) for s in scenes]) / VOXELS  # (seeds, 20)
    ground = np.stack([np.bincount(s[:, :, GROUND].reshape(-1), minlength=20) for s in scenes]) / (64 * 64)
    assert (counts[:, C["empty"]] > 0.5).all() and (counts[:, C["empty"]] < 0.9).all()
    assert (ground[:, C["road"]] > 0.08).all() and (ground[:, C["road"]] < 0.5).all()
    assert (counts[:, C["car"]] > 0).mean() >= 0.5
    assert (counts[:, C["pole"]] > 0).all()
    for name in ("sidewalk", "building", "vegetation", "terrain"):
        assert (counts[:, C[name]] > 0).any(), name
    assert counts[:, C["building"]].max() < 0.45
    # Layouts vary, so the templated prompts do too.
    assert len({tuple(np.argsort(-c)[:4]) for c in counts}) >= 3


@pytest.mark.parametrize("grid", [(32, 32, 4), (256, 256, 32)])
def test_other_kitti_grids(grid: tuple[int, int, int]) -> None:
    labels = generate_street_scene(np.random.default_rng(0), grid)
    assert labels.shape == grid
    ground = int(np.floor((-1.73 + 2.0) / (51.2 / grid[0])))
    assert (labels[:, :, ground] != 0).all()
    assert (labels[:, :, :ground] == 0).all()


@pytest.mark.parametrize("grid", [(64, 64, 4), (64, 32, 8), (8, 8, 1)])
def test_grid_must_be_isotropic_kitti(grid: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="X == Y == 8 \\* Z"):
        generate_street_scene(np.random.default_rng(0), grid)


def test_demo_calibration_keeps_kitti_field_of_view() -> None:
    p2, tr = demo_calibration((128, 384))
    scale = 384 / 1241
    assert p2[0, 0] == pytest.approx(718.856 * scale)
    assert p2[1, 1] == pytest.approx(p2[0, 0])
    # Principal point at the same relative position (pixel centres at integers).
    assert (p2[0, 2] + 0.5) / 384 == pytest.approx((607.1928 + 0.5) / 1241)
    assert (p2[1, 2] + 0.5) / 128 == pytest.approx((185.2157 + 0.5) / 376)
    np.testing.assert_allclose(tr[:3].reshape(-1), [float(v) for v in KITTI_00_TR_ROWS.split()])
    # The camera sits ~0.27 m ahead of and ~0.08 m below the LiDAR, looking along +x.
    centre = -tr[:3, :3].T @ tr[:3, 3]
    np.testing.assert_allclose(centre, [0.27, 0.0, -0.08], atol=0.03)


# ---------------------------------------------------------------------------------------------------------------
# The dataset on disk
# ---------------------------------------------------------------------------------------------------------------


def test_writes_the_semantic_kitti_layout(tiny: Path) -> None:
    sequences = tiny / "dataset" / "sequences"
    assert sorted(p.name for p in sequences.iterdir()) == ["00", "08"]
    for sequence, count in (("00", 4), ("08", 2)):
        folder = sequences / sequence
        frames = [f"{5 * i:06d}" for i in range(count)]
        assert sorted(p.stem for p in (folder / "image_2").iterdir()) == frames
        expected = sorted(f"{f}.{s}" for f in frames for s in ("bin", "invalid", "label", "occluded"))
        assert sorted(p.name for p in (folder / "voxels").iterdir()) == expected
        for frame in frames:
            voxels = folder / "voxels"
            assert (voxels / f"{frame}.label").stat().st_size == 2 * VOXELS
            for suffix in ("bin", "invalid", "occluded"):
                assert (voxels / f"{frame}.{suffix}").stat().st_size == VOXELS // 8
            with Image.open(folder / "image_2" / f"{frame}.png") as image:
                assert image.format == "PNG" and image.mode == "RGB" and image.size == (384, 128)
        calib = read_calib(folder / "calib.txt")
        p2, tr = demo_calibration((128, 384))
        np.testing.assert_allclose(calib["P2"], p2, rtol=1e-10)
        np.testing.assert_allclose(calib["Tr"], tr, rtol=1e-10)
    manifest = json.loads((tiny / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["num_train"] == 4 and manifest["num_val"] == 2
    assert manifest["grid_size"] == [64, 64, 8] and manifest["image_size"] == [128, 384]
    assert [p.name for p in tiny.parent.iterdir()] == ["demo"]  # no staging folder left behind


def test_voxel_files_hold_raw_ids_and_kitti_masks(tiny: Path) -> None:
    voxels = tiny / "dataset" / "sequences" / "00" / "voxels"
    raw = np.fromfile(voxels / "000005.label", dtype="<u2").reshape(GRID)
    expected = generate_street_scene(demo.frame_rng(0, 0, 1), GRID)
    # Raw SemanticKITTI ids: road 40, sidewalk 48, building 50, car 10 (learning_map_inv).
    for train, raw_id in ((9, 40), (11, 48), (13, 50), (1, 10), (0, 0)):
        assert np.array_equal(raw == raw_id, expected == train), train
    invalid = np.unpackbits(np.fromfile(voxels / "000005.invalid", dtype=np.uint8)).reshape(GRID).astype(bool)
    scan = np.unpackbits(np.fromfile(voxels / "000005.bin", dtype=np.uint8)).reshape(GRID).astype(bool)
    # Building interiors are never observed; the single scan only sees solid voxels, none inside buildings.
    interior = (expected[1:-1, 1:-1, 1:-1] == 13) & (expected[:-2, 1:-1, 1:-1] == 13) & (expected[2:, 1:-1, 1:-1] == 13)
    interior &= (expected[1:-1, :-2, 1:-1] == 13) & (expected[1:-1, 2:, 1:-1] == 13)
    interior &= (expected[1:-1, 1:-1, :-2] == 13) & (expected[1:-1, 1:-1, 2:] == 13)
    assert interior.any() and invalid[1:-1, 1:-1, 1:-1][interior].all()
    assert scan.any() and (expected[scan] != 0).all()
    assert not scan[1:-1, 1:-1, 1:-1][interior].any()
    # The ground right around the LiDAR is within the scanner's view and hit.
    assert scan[:8, 28:36, GROUND].sum() > 10


def test_same_seed_gives_identical_bytes_on_any_worker_count(tiny: Path, tmp_path: Path) -> None:
    again = generate_demo_dataset(tmp_path / "demo", num_train=4, num_val=2, num_workers=2)
    assert _files(again) == _files(tiny)


def test_mismatched_manifest_regenerates_and_a_match_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = {"image_size": SMALL_IMAGE, "num_workers": 1}
    root = generate_demo_dataset(tmp_path / "demo", num_train=2, num_val=1, seed=0, **small)
    first = _files(root)
    generate_demo_dataset(root, num_train=2, num_val=1, seed=1, **small)
    second = _files(root)
    assert json.loads(second["manifest.json"])["seed"] == 1
    assert second["dataset/sequences/00/voxels/000000.label"] != first["dataset/sequences/00/voxels/000000.label"]
    generate_demo_dataset(root, num_train=3, num_val=1, seed=1, **small)
    assert "dataset/sequences/00/voxels/000010.bin" in _files(root)

    def fail(job: Any) -> None:
        raise AssertionError("a matching dataset must be reused, not regenerated")

    monkeypatch.setattr(writer, "_write_frame", fail)
    assert generate_demo_dataset(root, num_train=3, num_val=1, seed=1, **small) == root
    with pytest.raises(AssertionError, match="must be reused"):
        generate_demo_dataset(root, num_train=3, num_val=1, seed=1, overwrite=True, **small)
    with pytest.raises(AssertionError, match="must be reused"):
        generate_demo_dataset(root, num_train=3, num_val=1, seed=1, image_size=(64, 192), num_workers=1)
    assert json.loads((root / "manifest.json").read_text())["num_train"] == 3  # the failed overwrite kept it


@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_generation_leaves_no_partial_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    root = tmp_path / "demo"
    if existing:
        generate_demo_dataset(root, num_train=1, num_val=1, image_size=SMALL_IMAGE, num_workers=1)
    before = _files(root) if existing else None
    calls = []
    write_frame = writer._write_frame

    def flaky(job: Any) -> None:
        calls.append(job)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        write_frame(job)

    monkeypatch.setattr(writer, "_write_frame", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_demo_dataset(root, num_train=4, num_val=2, seed=5, image_size=SMALL_IMAGE, num_workers=1)
    assert len(calls) == 3
    if existing:
        assert _files(root) == before  # the previous complete dataset is untouched
    else:
        assert not root.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["demo"] if existing else [])


def test_refuses_to_replace_a_folder_that_is_not_a_demo_dataset(tmp_path: Path) -> None:
    root = tmp_path / "kitti"
    (root / "dataset").mkdir(parents=True)
    (root / "dataset" / "precious.txt").write_text("real data")
    with pytest.raises(FileExistsError, match="no manifest.json"):
        generate_demo_dataset(root, num_train=1, num_val=1, overwrite=True)
    assert (root / "dataset" / "precious.txt").read_text() == "real data"


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        generate_demo_dataset(tmp_path / "a", 1, 1, image_size=(0, 10))
    with pytest.raises(ValueError, match="num_train"):
        generate_demo_dataset(tmp_path / "a", -1, 1)
    with pytest.raises(ValueError, match="render_size"):
        DemoDataModule(root=str(tmp_path / "a"), render_size=(128,))
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------------------------------------------------
# DataModule: generation on demand and the full SemanticKITTI read path
# ---------------------------------------------------------------------------------------------------------------


def _visible(point: np.ndarray, camera: np.ndarray, labels: np.ndarray) -> bool:
    """Whether the segment camera -> point crosses only empty voxels (dense sampling, not the renderer's traversal)."""
    t = np.linspace(0.0, 1.0, 400)[:-8]  # stop short of the surface point itself
    samples = camera + t[:, None] * (point - camera)
    index = np.floor((samples - np.array([0.0, -25.6, -2.0])) / 0.8).astype(int)
    inside = ((index >= 0) & (index < np.array(GRID))).all(axis=1)
    return bool((labels[tuple(index[inside].T)] == 0).all())


def test_datamodule_generates_and_reads_back_through_the_kitti_reader(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    dm = DemoDataModule(root=str(root), num_train=4, num_val=2, batch_size=2, color_jitter=0.0, flip_prob=0.0)
    assert dm.crop_size == (384, 128) and dm.grid_size == GRID and dm.num_classes == 20
    dm.prepare_data()
    assert (root / "manifest.json").is_file()
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 4 and len(dm.datasets["val"]) == 2
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == set(SAMPLE_KEYS)
    assert batch["image"].shape == (2, 1, 3, 128, 384) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
    assert batch["occupancy"].shape == (2, *GRID) and batch["occupancy"].dtype == torch.uint8
    values = set(torch.unique(batch["occupancy"]).tolist())
    assert {0, 9, 255} <= values <= set(range(20)) | {255}
    p2, tr = demo_calibration((128, 384))
    torch.testing.assert_close(batch["intrinsics"][0, 0], torch.tensor(p2[:, :3], dtype=torch.float32))
    torch.testing.assert_close(batch["voxel_to_camera"][1, 0], torch.tensor(tr, dtype=torch.float32))
    torch.testing.assert_close(batch["voxel_origin"][0], torch.tensor([0.0, -25.6, -2.0]))
    torch.testing.assert_close(batch["voxel_size"], torch.tensor([0.8, 0.8]))
    assert set(batch["frame_id"]) <= {"00_000000", "00_000005", "00_000010", "00_000015"}  # shuffled
    assert all(p.startswith("a driving scene with ") and "road" in p for p in batch["prompt"])

    # Image-occupancy agreement through the whole read path: the top face of visible ground voxels and the front
    # face of visible buildings have their class's colour (up to shading brightness) at their projected pixel.
    checked = 0
    for sample in (dm.datasets["val"][0], dm.datasets["val"][1]):
        labels = generate_street_scene(demo.frame_rng(0, 1, int(sample["frame_id"][-6:]) // 5), GRID)
        image = (sample["image"][0].permute(1, 2, 0).numpy() * 255).astype(np.float64)
        k = sample["intrinsics"][0].double().numpy()
        t = sample["voxel_to_camera"][0].double().numpy()
        camera = -t[:3, :3].T @ t[:3, 3]
        chroma = DEMO_COLORS[1:] / DEMO_COLORS[1:].sum(axis=1, keepdims=True)
        for (i, j, kz), name in _surface_points(labels):
            point = np.array([0.8 * i + 0.4, -25.6 + 0.8 * j + 0.4, -2.0 + 0.8 * kz])
            if name == "building":  # the face towards the camera, half-way up the voxel
                point = np.array([0.8 * i, -25.6 + 0.8 * j + 0.4, -2.0 + 0.8 * kz + 0.4])
            cam = t[:3, :3] @ point + t[:3, 3]
            u, v = np.round(k[0, 0] * cam[0] / cam[2] + k[0, 2]), np.round(k[1, 1] * cam[1] / cam[2] + k[1, 2])
            if not (cam[2] > 0 and 1 <= u < 383 and 1 <= v < 127) or not _visible(point, camera, labels):
                continue
            pixel = image[int(v), int(u)]
            nearest = int(np.argmin(np.abs(chroma - pixel / pixel.sum()).sum(axis=1))) + 1
            assert nearest == C[name], (sample["frame_id"], (i, j, kz), name, pixel)
            checked += 1
    assert checked >= 20


def _surface_points(labels: np.ndarray) -> list[tuple[tuple[int, int, int], str]]:
    """A spread of ground-top voxel faces (road/sidewalk/terrain) within 20 m and building faces, away from edges."""
    points = []
    for name in ("road", "sidewalk", "terrain"):
        for i, j in np.argwhere(labels[:, :, GROUND] == C[name])[::7]:
            neighbourhood = labels[max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2]
            if 3 <= i < 25 and (neighbourhood[:, :, GROUND] == C[name]).all() and (neighbourhood[:, :, 1:] == 0).all():
                points.append(((int(i), int(j), GROUND + 1), name))
    building = labels == C["building"]
    front = building & np.concatenate([np.zeros((1, *GRID[1:]), bool), ~building[:-1]], axis=0)
    for i, j, kz in np.argwhere(front[:, :, 1:4])[::5]:
        if 2 <= i < 30 and 0 < j < GRID[1] - 1 and building[i, j - 1 : j + 2, kz + 1].all():
            points.append(((int(i), int(j), int(kz) + 1), "building"))
    return points


def test_test_and_predict_stages_read_the_val_sequence(tiny: Path) -> None:
    dm = DemoDataModule(root=str(tiny), num_train=4, num_val=2, image_size=(64, 192))
    dm.prepare_data()  # the manifest matches: nothing is regenerated
    dm.setup("test")
    sample = dm.datasets["test"][1]
    assert sample["frame_id"] == "08_000005"
    assert sample["image"].shape == (1, 3, 64, 192)
    assert (sample["occupancy"] != 255).any()
    p2, _ = demo_calibration((128, 384))
    assert sample["intrinsics"][0, 0, 0].item() == pytest.approx(p2[0, 0] / 2, rel=1e-5)
    assert len(dm.build_dataset("test", augment=False)) == 2
