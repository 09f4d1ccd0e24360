"""nuScenes-Occupancy reader: sparse ground truth, info pickles, camera rig, crop, errors and the DataModule."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from occscene_pl.data.base import OPTIONAL_SAMPLE_KEYS, SAMPLE_KEYS, collate_samples
from occscene_pl.data.nuscenes_occupancy import (
    CAMERA_NAMES,
    NUSCENES_OCCUPANCY_CLASSES,
    NuScenesOccupancyDataModule,
    NuScenesOccupancyDataset,
    class_weights,
    load_infos,
    read_sparse_occupancy,
    resolve_data_path,
    write_sparse_occupancy,
)
from occscene_pl.geometry import project_points, project_voxels
from tests.fakes.nuscenes_occupancy import CAMERA_COLORS, write_fake_nuscenes_occupancy

GRID = (64, 64, 5)  # cubic 1.6 m voxels over the 102.4 x 102.4 x 8 m range

# Hand-written rows [z, y, x, cls] on a (4, 5, 6) grid and the dense grid they must give, indexed [x, y, z].
ROWS = np.array(
    [
        [0, 1, 2, 4],  # car at x=2, y=1, z=0
        [3, 0, 1, 0],  # noise -> 255
        [5, 4, 3, 4],  # (3, 4, 5): car, car, driveable surface -> majority car
        [5, 4, 3, 11],
        [5, 4, 3, 4],
        [0, 0, 0, 11],  # (0, 0, 0): one driveable surface, one car -> tie -> smaller label (car)
        [0, 0, 0, 4],
        [1, 1, 1, 0],  # (1, 1, 1): noise (255 after the remap) vs vegetation -> tie -> vegetation
        [1, 1, 1, 16],
        [7, -1, 9, 13],  # out of range: x 9 -> 3, y -1 -> 0, z 7 -> 5 (clipped like the original)
    ],
    dtype=np.int64,
)
SMALL_GRID = (4, 5, 6)


def _expected_small() -> np.ndarray:
    dense = np.zeros(SMALL_GRID, np.uint8)
    dense[2, 1, 0] = 4
    dense[1, 0, 3] = 255
    dense[3, 4, 5] = 4
    dense[0, 0, 0] = 4
    dense[1, 1, 1] = 16
    dense[3, 0, 5] = 13
    return dense


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("nusc") / "data"
    written = write_fake_nuscenes_occupancy(
        base / "nuscenes", base / "nuScenes-Occupancy", {"train": 4, "val": 2}, grid_size=GRID, seed=3
    )
    written["root"] = base / "nuscenes"
    return written


def _dataset(fake: dict[str, Any], split: str = "train", **kwargs: Any) -> NuScenesOccupancyDataset:
    return NuScenesOccupancyDataset(fake["root"], split=split, grid_size=GRID, crop_box=None, **kwargs)


def test_class_table_and_weights() -> None:
    assert len(NUSCENES_OCCUPANCY_CLASSES) == 17
    assert NUSCENES_OCCUPANCY_CLASSES[0] == "empty" and NUSCENES_OCCUPANCY_CLASSES[16] == "vegetation"
    weights = class_weights()
    assert weights.shape == (17,)
    # docs/design.md §8.3: 1 / ln(frequency + 0.001)
    np.testing.assert_allclose(weights[[0, 2, 11, 16]], [0.035163, 0.070122, 0.046433, 0.047019], atol=1e-6)


@pytest.mark.parametrize("variant", ["int64", "int32", "float64", "velocity"])
def test_sparse_to_dense_hand_written(tmp_path: Path, variant: str) -> None:
    rows = ROWS
    if variant == "velocity":  # [z, y, x, vx, vy, vz, cls]: the label is the last column
        velocity = np.full((len(ROWS), 3), 99, dtype=np.int64)
        rows = np.concatenate([ROWS[:, :3], velocity, ROWS[:, 3:]], axis=1)
    elif variant != "int64":
        rows = ROWS.astype(variant)
    np.save(tmp_path / "gt.npy", rows)
    dense = read_sparse_occupancy(tmp_path / "gt.npy", SMALL_GRID)
    assert dense.dtype == np.uint8 and dense.shape == SMALL_GRID
    np.testing.assert_array_equal(dense, _expected_small())


def test_duplicate_vote_does_not_depend_on_row_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for trial in range(3):
        np.save(tmp_path / f"gt{trial}.npy", ROWS[rng.permutation(len(ROWS))])
        np.testing.assert_array_equal(read_sparse_occupancy(tmp_path / f"gt{trial}.npy", SMALL_GRID), _expected_small())


def test_empty_file_is_all_free(tmp_path: Path) -> None:
    np.save(tmp_path / "gt.npy", np.zeros((0, 4), np.int64))
    dense = read_sparse_occupancy(tmp_path / "gt.npy", SMALL_GRID)
    assert dense.shape == SMALL_GRID and not dense.any()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (np.zeros((5,), np.int64), r"shape \(5,\)"),
        (np.zeros((5, 3), np.int64), r"shape \(5, 3\)"),
        (np.zeros((2, 4, 1), np.int64), r"shape \(2, 4, 1\)"),
        (np.full((2, 4), 0.5), "non-integral"),
        (np.zeros((2, 4), bool), "bool"),
        (np.array([[0, 0, 0, 17]]), r"labels \[17\]"),
    ],
)
def test_bad_sparse_file_raises(tmp_path: Path, content: np.ndarray, match: str) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, content)
    with pytest.raises(ValueError, match=match) as info:
        read_sparse_occupancy(path, SMALL_GRID)
    assert "bad.npy" in str(info.value)


def test_missing_and_truncated_sparse_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        read_sparse_occupancy(tmp_path / "nope.npy")
    np.save(tmp_path / "cut.npy", ROWS)
    data = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-20])
    with pytest.raises(ValueError, match="cut.npy"):
        read_sparse_occupancy(tmp_path / "cut.npy", SMALL_GRID)


def test_writer_format_and_round_trip(tmp_path: Path) -> None:
    dense = np.zeros(SMALL_GRID, np.uint8)
    dense[3, 1, 2] = 7
    dense[0, 4, 5] = 255
    path = tmp_path / "out" / "gt.npy"
    write_sparse_occupancy(path, dense)
    rows = np.load(path)
    assert rows.dtype == np.int64
    # one row per non-free voxel, [z, y, x, cls], noise written back as 0
    assert sorted(map(tuple, rows.tolist())) == [(2, 1, 3, 7), (5, 4, 0, 0)]
    assert [p.name for p in path.parent.iterdir()] == ["gt.npy"]  # no temporary left behind

    rng = np.random.default_rng(1)
    labels = np.array([0] * 30 + list(range(1, 17)) + [255], np.uint8)
    random_dense = rng.choice(labels, size=(8, 8, 3))
    write_sparse_occupancy(path, random_dense)
    np.testing.assert_array_equal(read_sparse_occupancy(path, (8, 8, 3)), random_dense)
    with pytest.raises(ValueError, match="outside"):
        write_sparse_occupancy(path, np.full((2, 2, 2), 40, np.uint8))


def test_infos_sorted_by_timestamp(fake: dict[str, Any]) -> None:
    with fake["info_paths"]["train"].open("rb") as handle:
        raw = pickle.load(handle)
    raw_times = [info["timestamp"] for info in raw["infos"]]
    assert raw_times != sorted(raw_times)  # the pickle is shuffled, so sorting is exercised
    infos = load_infos(fake["info_paths"]["train"])
    assert [info["timestamp"] for info in infos] == sorted(raw_times)
    dataset = _dataset(fake)
    assert len(dataset) == 4
    assert [dataset[i]["frame_id"] for i in range(4)] == [info["token"] for info in fake["infos"]["train"]]


def test_sample_schema_occupancy_and_camera_order(fake: dict[str, Any]) -> None:
    dataset = _dataset(fake, split="val")
    sample = dataset[1]
    assert set(sample) == set(SAMPLE_KEYS)
    assert sample["image"].shape == (6, 3, 90, 160) and sample["image"].dtype == torch.float32
    assert sample["occupancy"].dtype == torch.uint8
    np.testing.assert_array_equal(sample["occupancy"].numpy(), fake["occupancy"]["val"][1])
    np.testing.assert_allclose(sample["voxel_origin"].numpy(), [-51.2, -51.2, -5.0])
    assert sample["voxel_size"].item() == pytest.approx(1.6)
    assert sample["prompt"].startswith("a driving scene in a city with ")
    # Views come in the pipeline order FL, F, FR, BL, B, BR whatever the pickle's dict order.
    assert list(fake["infos"]["val"][1]["cams"])[:2] == ["CAM_FRONT", "CAM_FRONT_RIGHT"]
    colours = sample["image"].mean(dim=(2, 3)).numpy() * 255
    np.testing.assert_allclose(colours, [CAMERA_COLORS[name] for name in CAMERA_NAMES], atol=3)
    for v, name in enumerate(CAMERA_NAMES):
        np.testing.assert_allclose(
            sample["intrinsics"][v].numpy(), fake["infos"]["val"][1]["cams"][name]["cam_intrinsic"], rtol=1e-6
        )


def test_voxel_to_camera_inverts_sensor2lidar(fake: dict[str, Any]) -> None:
    dataset = _dataset(fake)
    sample = dataset[0]
    cam = fake["infos"]["train"][0]["cams"]["CAM_BACK_LEFT"]
    point_cam = np.array([0.3, -0.7, 6.0])
    point_lidar = point_cam @ np.asarray(cam["sensor2lidar_rotation"]).T + cam["sensor2lidar_translation"]
    transform = sample["voxel_to_camera"][CAMERA_NAMES.index("CAM_BACK_LEFT")].double().numpy()
    np.testing.assert_allclose(transform[:3, :3] @ point_lidar + transform[:3, 3], point_cam, atol=1e-5)
    np.testing.assert_allclose(transform[3], [0, 0, 0, 1])


def test_point_ahead_of_front_camera(fake: dict[str, Any]) -> None:
    sample = _dataset(fake)[0]
    # CAM_FRONT sits at ego (1.70079, 0.01594, 1.51095), LIDAR_TOP at ego (0.943713, 0, 1.84023); LiDAR axes are
    # x = ego right, y = ego forward. So the camera is at LiDAR (-0.01594, 0.75708, -0.32928), looking along +y.
    point = torch.tensor([[[-0.01594, 20.75708, -0.32928]]], dtype=torch.float64)
    pixels, depth = project_points(point, sample["intrinsics"][None].double(), sample["voxel_to_camera"][None].double())
    front, back = CAMERA_NAMES.index("CAM_FRONT"), CAMERA_NAMES.index("CAM_BACK")
    cx, cy = sample["intrinsics"][front, 0, 2].item(), sample["intrinsics"][front, 1, 2].item()
    assert depth[0, front, 0].item() == pytest.approx(20.0, abs=0.3)  # the ego moves a few cm between sensors
    np.testing.assert_allclose(pixels[0, front, 0].numpy(), [cx, cy], atol=1.0)
    assert abs(pixels[0, front, 0, 0].item() - 80) < 5 and abs(pixels[0, front, 0, 1].item() - 45) < 5
    assert depth[0, back, 0].item() < -15
    # Through the voxel projection: the voxel holding that point is seen by CAM_FRONT only, not by CAM_BACK.
    projection = project_voxels(
        GRID, sample["voxel_origin"][None], sample["voxel_size"], sample["intrinsics"][None],
        sample["voxel_to_camera"][None], sample["image"].shape[-2:],
    )  # fmt: skip
    i, j, k = ((point[0, 0].numpy() - np.array([-51.2, -51.2, -5.0])) // 1.6).astype(int)
    flat = np.ravel_multi_index((i, j, k), GRID)
    assert projection.fov_mask[0, front, flat] and not projection.fov_mask[0, back, flat]
    assert projection.depth[0, back, flat] < 0


@pytest.mark.parametrize(
    ("data_path", "expected"),
    [
        ("./data/nuscenes/samples/CAM_FRONT/a.jpg", "samples/CAM_FRONT/a.jpg"),
        ("samples/CAM_FRONT/a.jpg", "samples/CAM_FRONT/a.jpg"),
        ("/elsewhere/machine/nuscenes/sweeps/CAM_BACK/b.jpg", "sweeps/CAM_BACK/b.jpg"),
        ("data\\nuscenes\\samples\\CAM_FRONT\\a.jpg", "samples/CAM_FRONT/a.jpg"),
        ("extra/c.jpg", "extra/c.jpg"),
    ],
)
def test_data_path_resolution(tmp_path: Path, data_path: str, expected: str) -> None:
    root = tmp_path / "nuscenes"
    for name in ("samples/CAM_FRONT/a.jpg", "sweeps/CAM_BACK/b.jpg", "extra/c.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    assert resolve_data_path(root, data_path) == root / expected


def test_absolute_existing_path_is_used_and_missing_names_the_tried_path(tmp_path: Path) -> None:
    image = tmp_path / "anywhere" / "samples" / "CAM_FRONT" / "x.jpg"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"")
    assert resolve_data_path(tmp_path / "root", str(image)) == image
    with pytest.raises(FileNotFoundError) as info:
        resolve_data_path(tmp_path / "root", "./data/nuscenes/samples/CAM_FRONT/y.jpg")
    message = str(info.value)
    assert "./data/nuscenes/samples/CAM_FRONT/y.jpg" in message
    assert str(tmp_path / "root" / "samples" / "CAM_FRONT" / "y.jpg") in message


def test_full_size_frame_crop_and_grid(tmp_path: Path) -> None:
    written = write_fake_nuscenes_occupancy(
        tmp_path / "nuscenes", tmp_path / "occ", {"val": 1}, grid_size=(512, 512, 40), image_size=(1600, 900)
    )
    dataset = NuScenesOccupancyDataset(tmp_path / "nuscenes", tmp_path / "occ", split="val")
    assert dataset.grid_size == (512, 512, 40) and dataset.voxel_size == pytest.approx(0.2)
    sample = dataset[0]
    assert sample["image"].shape == (6, 3, 896, 1600)
    assert sample["occupancy"].shape == (512, 512, 40) and sample["occupancy"].dtype == torch.uint8
    np.testing.assert_array_equal(sample["occupancy"].numpy(), written["occupancy"]["val"][0])
    assert sample["voxel_size"].item() == pytest.approx(0.2)
    info = written["infos"]["val"][0]
    for v, name in enumerate(CAMERA_NAMES):
        k = info["cams"][name]["cam_intrinsic"]
        assert sample["intrinsics"][v, 1, 2].item() == pytest.approx(k[1, 2] - 4, abs=1e-3)  # top 4 rows dropped
        assert sample["intrinsics"][v, 0, 2].item() == pytest.approx(k[0, 2], abs=1e-3)
        assert sample["intrinsics"][v, 0, 0].item() == pytest.approx(k[0, 0], abs=1e-3)


def test_default_occupancy_root_is_sibling_of_root(fake: dict[str, Any]) -> None:
    dataset = NuScenesOccupancyDataset(fake["root"], split="val", grid_size=GRID, crop_box=None)
    assert dataset.occupancy_path(0) == fake["root"] / ".." / "nuScenes-Occupancy" / Path(
        *fake["occupancy_paths"]["val"][0].parts[-3:]
    )
    np.testing.assert_array_equal(dataset[0]["occupancy"].numpy(), fake["occupancy"]["val"][0])


def _rewrite_pickle(fake: dict[str, Any], tmp_path: Path, edit: Any) -> Path:
    """Copy the train pickle into a fresh root with ``edit(infos)`` applied; images stay in the fake root."""
    with fake["info_paths"]["train"].open("rb") as handle:
        data = pickle.load(handle)
    edit(data["infos"])
    root = tmp_path / "nuscenes"
    root.mkdir()
    with (root / "nuscenes_occ_infos_train.pkl").open("wb") as handle:
        pickle.dump(data, handle)
    return root


def _drop_cams(infos: list[dict[str, Any]]) -> None:
    del infos[2]["cams"]


def _drop_intrinsic(infos: list[dict[str, Any]]) -> None:
    del infos[1]["cams"]["CAM_BACK_RIGHT"]["cam_intrinsic"]


def _drop_camera(infos: list[dict[str, Any]]) -> None:
    del infos[0]["cams"]["CAM_FRONT_LEFT"]


def _drop_lidar_token(infos: list[dict[str, Any]]) -> None:
    del infos[3]["lidar_token"]


@pytest.mark.parametrize(
    ("edit", "index", "key"),
    [
        (_drop_cams, 2, "'cams'"),
        (_drop_intrinsic, 1, "'cam_intrinsic'"),
        (_drop_camera, 0, "'CAM_FRONT_LEFT'"),
        (_drop_lidar_token, 3, "'lidar_token'"),
    ],
)
def test_bad_pickle_names_file_info_and_key(
    fake: dict[str, Any], tmp_path: Path, edit: Any, index: int, key: str
) -> None:
    root = _rewrite_pickle(fake, tmp_path, edit)
    with fake["info_paths"]["train"].open("rb") as handle:
        token = pickle.load(handle)["infos"][index]["token"]
    with pytest.raises(ValueError) as info:
        NuScenesOccupancyDataset(root, split="train", grid_size=GRID, crop_box=None)
    message = str(info.value)
    assert "nuscenes_occ_infos_train.pkl" in message and key in message
    assert f"info {index} " in message and token in message
    if key == "'cam_intrinsic'":
        assert "CAM_BACK_RIGHT" in message


@pytest.mark.parametrize("content", [[1, 2, 3], {"data_list": []}])
def test_pickle_of_wrong_form(tmp_path: Path, content: Any) -> None:
    with (tmp_path / "nuscenes_occ_infos_val.pkl").open("wb") as handle:
        pickle.dump(content, handle)
    with pytest.raises(ValueError, match=r"nuscenes_occ_infos_val\.pkl must hold a dict"):
        load_infos(tmp_path / "nuscenes_occ_infos_val.pkl")


def test_missing_pickle_and_unknown_split(fake: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(FileNotFoundError, match="nuscenes_occ_infos_train.pkl"):
        NuScenesOccupancyDataset(tmp_path / "empty_root", split="train", grid_size=GRID)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        NuScenesOccupancyDataset(fake["root"], split="test", grid_size=GRID)
    with pytest.raises(FileNotFoundError, match="no_such_root"):
        NuScenesOccupancyDataset(tmp_path / "no_such_root", split="train", grid_size=GRID)


@pytest.mark.parametrize("grid_size", [(16, 16, 4), (64, 32, 5), (64, 64)])
def test_non_cubic_or_malformed_grid_raises(fake: dict[str, Any], grid_size: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="grid_size"):
        NuScenesOccupancyDataset(fake["root"], split="train", grid_size=grid_size)


def test_missing_ground_truth_names_expected_path(fake: dict[str, Any], tmp_path: Path) -> None:
    dataset = NuScenesOccupancyDataset(fake["root"], tmp_path / "occ", split="val", grid_size=GRID, crop_box=None)
    expected = dataset.occupancy_path(0)
    assert expected.parent.name == "occupancy" and expected.parent.parent.name.startswith("scene_")
    with pytest.raises(FileNotFoundError) as info:
        dataset[0]
    assert str(expected) in str(info.value)


def test_bad_ground_truth_shape_in_dataset(fake: dict[str, Any], tmp_path: Path) -> None:
    dataset = NuScenesOccupancyDataset(fake["root"], tmp_path / "occ", split="val", grid_size=GRID, crop_box=None)
    path = dataset.occupancy_path(0)
    path.parent.mkdir(parents=True)
    np.save(path, np.zeros((10, 3), np.int64))
    with pytest.raises(ValueError, match=r"shape \(10, 3\)") as info:
        dataset[0]
    assert str(path) in str(info.value)


def test_missing_image_and_crop_that_does_not_fit(fake: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        NuScenesOccupancyDataset(fake["root"], split="val", grid_size=GRID)[0]  # 1600x900 crop of 160x90 images
    image = fake["root"] / fake["infos"]["val"][0]["cams"]["CAM_BACK"]["data_path"].split("nuscenes/")[1]
    backup = image.read_bytes()
    image.unlink()
    try:
        with pytest.raises(FileNotFoundError, match=re.escape(str(image))) as info:
            _dataset(fake, split="val")[0]
        assert "nuscenes_occ_infos_val.pkl" in str(info.value) and "CAM_BACK" in str(info.value)
    finally:
        image.write_bytes(backup)
    assert Image.open(image).size == (160, 90)


def test_datamodule_batch(fake: dict[str, Any]) -> None:
    module = NuScenesOccupancyDataModule(
        root=str(fake["root"]), crop_box=None, grid_size=GRID, image_size=(32, 64), batch_size=2
    )
    assert module.num_classes == 17 and module.grid_size == GRID and module.test_split == "val"
    module.setup("fit")
    assert len(module.datasets["train"]) == 4 and len(module.datasets["val"]) == 2
    batch = next(iter(module.train_dataloader()))
    assert set(batch) == set(SAMPLE_KEYS) | set(OPTIONAL_SAMPLE_KEYS)  # default colour jitter 0.4 in training
    assert batch["image"].shape == (2, 6, 3, 32, 64) and batch["image"].dtype == torch.float32
    assert batch["perceiver_image"].shape == (2, 6, 3, 32, 64) and batch["perceiver_image"].dtype == torch.float32
    assert batch["occupancy"].shape == (2, *GRID) and batch["occupancy"].dtype == torch.uint8
    assert batch["intrinsics"].shape == (2, 6, 3, 3) and batch["intrinsics"].dtype == torch.float32
    assert batch["voxel_to_camera"].shape == (2, 6, 4, 4) and batch["voxel_to_camera"].dtype == torch.float32
    assert batch["voxel_origin"].shape == (2, 3) and batch["voxel_size"].shape == (2,)
    assert isinstance(batch["prompt"], list) and len(batch["prompt"]) == 2
    assert isinstance(batch["frame_id"], list) and len(batch["frame_id"]) == 2
    val_batch = next(iter(module.val_dataloader()))
    assert set(val_batch) == set(SAMPLE_KEYS)  # no jitter in validation, hence no perceiver copy
    expected = collate_samples([module.datasets["val"][0], module.datasets["val"][1]])
    for key in SAMPLE_KEYS:
        value = val_batch[key]
        assert torch.equal(value, expected[key]) if isinstance(value, torch.Tensor) else value == expected[key]
    # resized 160x90 -> 64x32: fx scales by 0.4 and 0.3556 (no crop, no flip in validation)
    k = fake["infos"]["val"][0]["cams"]["CAM_FRONT"]["cam_intrinsic"]
    assert val_batch["intrinsics"][0, 1, 0, 0].item() == pytest.approx(k[0, 0] * 64 / 160, rel=1e-5)
    assert val_batch["intrinsics"][0, 1, 1, 1].item() == pytest.approx(k[1, 1] * 32 / 90, rel=1e-5)
    with pytest.raises(ValueError, match="test"):
        NuScenesOccupancyDataModule(root=str(fake["root"]), test_split="test")
