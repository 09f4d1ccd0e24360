"""SemanticKITTI SSC reader: byte formats, label mapping, calibration, camera, splits and errors."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from occscene_pl.data.base import OPTIONAL_SAMPLE_KEYS, SAMPLE_KEYS
from occscene_pl.data.semantic_kitti import (
    LEARNING_MAP,
    LEARNING_MAP_INV,
    SEMANTIC_KITTI_CLASSES,
    SemanticKittiDataModule,
    SemanticKittiDataset,
    class_weights,
    pack_bits,
    read_calib,
    read_packed_mask,
    read_voxel_labels,
    ssc_label_lut,
    train_to_raw,
    unpack_bits,
    write_calib,
    write_voxel_frame,
)
from occscene_pl.geometry import project_points, project_voxels, vox2pix
from tests.fakes.semantic_kitti import (
    KITTI_00_CALIB_TXT,
    KITTI_00_P2,
    KITTI_00_TR,
    expected_train_ids,
    random_raw_labels,
    write_fake_semantic_kitti,
)

SMALL_GRID = (32, 32, 4)  # the KITTI extent at 1.6 m voxels
SMALL_IMAGE = (70, 44)  # (W, H)
SMALL_CROP = (64, 40)
ALL_LABELLED = {f"{s:02d}": 1 for s in range(11)} | {"00": 3, "08": 2, "11": 1}


@pytest.fixture(scope="module")
def kitti(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("kitti")
    written = write_fake_semantic_kitti(root, ALL_LABELLED, SMALL_GRID, SMALL_IMAGE, seed=1)
    return {"root": root, **written}


@pytest.fixture(scope="module")
def kitti_real_camera(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One frame with the real sequence-00 rig and full-size 1241x376 image, at MonoScene's 1:2 grid (0.4 m)."""
    root = tmp_path_factory.mktemp("kitti_real_camera")
    written = write_fake_semantic_kitti(root, {"00": 1}, (128, 128, 16), (1241, 376), seed=2)
    return {"root": root, **written}


def _small(root: Path, split: str = "train", **kwargs: Any) -> SemanticKittiDataset:
    return SemanticKittiDataset(root, split, grid_size=SMALL_GRID, crop_size=SMALL_CROP, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Label mapping and class constants
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "train"),
    [(0, 0), (1, 255), (52, 255), (99, 255), (10, 1), (255, 8), (259, 5), (60, 9), (300, 255), (81, 19), (358, 255)],
)
def test_ssc_lut_spot_checks(raw: int, train: int) -> None:
    lut = ssc_label_lut()
    assert lut.shape == (359,) and lut.dtype == np.uint8
    assert lut[raw] == train


def test_class_constants_match_monoscene() -> None:
    assert len(SEMANTIC_KITTI_CLASSES) == 20
    assert SEMANTIC_KITTI_CLASSES[0] == "empty" and SEMANTIC_KITTI_CLASSES[19] == "traffic-sign"
    assert SEMANTIC_KITTI_CLASSES[8] == "motorcyclist" and SEMANTIC_KITTI_CLASSES[13] == "building"
    weights = class_weights()
    assert weights.shape == (20,)
    # docs/design.md §8.1, rounded to 6 d.p.
    for index, value in [(0, 0.044617), (1, 0.060334), (8, 0.081769), (15, 0.052964), (19, 0.078620)]:
        assert round(float(weights[index]), 6) == value
    inverse = [0, 10, 11, 15, 18, 20, 30, 31, 32, 40, 44, 48, 49, 50, 51, 70, 71, 72, 80, 81]  # docs/design.md §8.1
    assert list(LEARNING_MAP_INV) == list(range(20)) and list(LEARNING_MAP_INV.values()) == inverse
    assert len(LEARNING_MAP) == 34 and LEARNING_MAP[13] == 5 and LEARNING_MAP[258] == 4


def test_train_to_raw_round_trips_through_the_lut() -> None:
    train = np.array([[0, 1, 9], [19, 255, 8]], dtype=np.uint8)
    raw = train_to_raw(train)
    assert raw.dtype == np.uint16 and raw.shape == (2, 3)
    assert raw.tolist() == [[0, 10, 40], [81, 1, 32]]  # ignore -> raw 1 "outlier", never raw 0 "empty"
    every = np.array([*range(20), 255])
    assert np.array_equal(ssc_label_lut()[train_to_raw(every)], every)
    with pytest.raises(ValueError, match=r"invalid train ids \[20\]"):
        train_to_raw(np.array([3, 20]))
    with pytest.raises(ValueError, match="integer"):
        train_to_raw(np.array([1.0]))


# ---------------------------------------------------------------------------------------------------------------
# Bit packing and voxel files (hand-written bytes)
# ---------------------------------------------------------------------------------------------------------------


def test_unpack_bits_is_msb_first() -> None:
    assert unpack_bits(np.array([0b10000001], dtype=np.uint8)).tolist() == [1, 0, 0, 0, 0, 0, 0, 1]
    assert unpack_bits(np.array([0b01000000, 0b00000010], dtype=np.uint8)).tolist() == [0, 1] + [0] * 12 + [1, 0]
    assert pack_bits(np.array([1, 0, 0, 0, 0, 0, 0, 1], dtype=bool)).tolist() == [0b10000001]
    assert pack_bits(np.array([0, 0, 1])).tolist() == [0b00100000]  # zero padded
    data = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8)
    assert np.array_equal(unpack_bits(data), np.unpackbits(data))
    assert np.array_equal(pack_bits(unpack_bits(data)), data)
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(np.array([1, 2], dtype=np.int64))


def test_read_packed_mask_from_hand_written_bytes(tmp_path: Path) -> None:
    path = tmp_path / "000000.invalid"
    path.write_bytes(bytes([0b10000001, 0b00000010]))  # flat voxels 0, 7 and 14 of a (2, 2, 4) grid
    mask = read_packed_mask(path, (2, 2, 4))
    expected = np.zeros((2, 2, 4), dtype=bool)
    expected[0, 0, 0] = expected[0, 1, 3] = expected[1, 1, 2] = True  # flat = x*8 + y*4 + z
    assert mask.dtype == bool
    assert np.array_equal(mask, expected)


@pytest.mark.parametrize("xyz", [(0, 0, 0), (3, 2, 1), (1, 0, 1), (2, 1, 0)])
def test_voxel_label_lands_at_xyz(tmp_path: Path, xyz: tuple[int, int, int]) -> None:
    grid = (4, 3, 2)
    data = bytearray(2 * 24)
    x, y, z = xyz
    flat = x * 3 * 2 + y * 2 + z
    data[2 * flat : 2 * flat + 2] = bytes([10, 0])  # raw 10 "car", little-endian uint16
    other = (flat + 5) % 24
    data[2 * other : 2 * other + 2] = bytes([0x03, 0x01])  # raw 259 = 0x0103 "moving-other-vehicle"
    (tmp_path / "f.label").write_bytes(bytes(data))
    labels = read_voxel_labels(tmp_path / "f.label", None, grid)
    expected = np.zeros(grid, dtype=np.uint8)
    expected[x, y, z] = 1
    expected.reshape(-1)[other] = 5
    assert labels.dtype == np.uint8 and labels.shape == grid
    assert np.array_equal(labels, expected)


def test_invalid_voxels_become_ignore(tmp_path: Path) -> None:
    grid = (2, 2, 4)
    (tmp_path / "f.label").write_bytes(bytes([40, 0]) * 16)  # all road
    (tmp_path / "f.invalid").write_bytes(bytes([0b10000000, 0b00000001]))  # flat 0 and 15
    labels = read_voxel_labels(tmp_path / "f.label", tmp_path / "f.invalid", grid)
    flat = labels.reshape(-1)
    assert flat[0] == 255 and flat[15] == 255
    assert (flat[1:15] == 9).all()
    assert (read_voxel_labels(tmp_path / "f.label", None, grid) == 9).all()


def test_write_voxel_frame_writes_voxelizer_bytes(tmp_path: Path) -> None:
    raw = np.zeros((2, 2, 4), dtype=np.int64)
    raw[0, 1, 3] = 259  # flat 7
    invalid = np.zeros((2, 2, 4), dtype=bool)
    invalid[1, 1, 2] = True  # flat 14
    write_voxel_frame(tmp_path / "voxels", "5", raw, invalid=invalid)
    voxels = tmp_path / "voxels"
    assert sorted(os.listdir(voxels)) == ["000005.bin", "000005.invalid", "000005.label", "000005.occluded"]
    label = (voxels / "000005.label").read_bytes()
    assert label == bytes(14) + bytes([0x03, 0x01]) + bytes(16)
    assert (voxels / "000005.bin").read_bytes() == bytes([0b00000001, 0])  # defaults to raw != 0
    assert (voxels / "000005.invalid").read_bytes() == bytes([0, 0b00000010])
    assert (voxels / "000005.occluded").read_bytes() == bytes(2)  # missing mask -> all zero
    scan = np.ones((2, 2, 4), dtype=bool)
    write_voxel_frame(voxels, 5, raw, scan=scan)  # overwrites in place
    assert (voxels / "000005.bin").read_bytes() == bytes([255, 255])
    assert (voxels / "000005.invalid").read_bytes() == bytes(2)
    assert len(os.listdir(voxels)) == 4  # no temp files left behind


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"raw_labels": np.zeros((2, 8), dtype=np.uint16)}, "shape"),
        ({"raw_labels": np.zeros((2, 2, 2), dtype=np.float32)}, "integer"),
        ({"raw_labels": np.full((2, 2, 2), 70000)}, "0..65535"),
        ({"raw_labels": np.zeros((2, 2, 2), dtype=np.uint16), "invalid": np.zeros((2, 2, 3), bool)}, "invalid mask"),
        ({"raw_labels": np.zeros((2, 2, 2), dtype=np.uint16), "frame": "a1"}, "frame"),
    ],
)
def test_write_voxel_frame_rejects_bad_input(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    arguments = {"voxels_dir": tmp_path, "frame": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        write_voxel_frame(**arguments)


# ---------------------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------------------


def test_read_calib_parses_the_real_kitti_file(tmp_path: Path) -> None:
    path = tmp_path / "calib.txt"
    # MonoScene stops at the first empty line: what follows must not be parsed.
    path.write_text(KITTI_00_CALIB_TXT + "\nTr: not numbers\n")
    calib = read_calib(path)
    assert sorted(calib) == ["P0", "P1", "P2", "P3", "Tr"]
    assert calib["P2"].shape == (3, 4) and calib["Tr"].shape == (4, 4)
    assert calib["P2"][0, 0] == 718.856 and calib["P2"][0, 2] == 607.1928 and calib["P2"][1, 2] == 185.2157
    assert calib["P2"][0, 3] == 45.38225 and calib["P1"][0, 3] == -386.1448
    assert calib["Tr"][0, 0] == 4.276802385584e-04 and calib["Tr"][2, 3] == -2.921968648686e-01
    assert calib["Tr"][3].tolist() == [0.0, 0.0, 0.0, 1.0]


def test_write_calib_round_trips_in_kitti_format(tmp_path: Path) -> None:
    path = tmp_path / "seq" / "calib.txt"
    write_calib(path, KITTI_00_P2, KITTI_00_TR)
    lines = path.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["P0", "P1", "P2", "P3", "Tr"]
    assert all(len(line.split()) == 13 for line in lines)
    assert lines[2].startswith("P2: 7.188560000000e+02 0.000000000000e+00 6.071928000000e+02 4.538225000000e+01")
    calib = read_calib(path)
    np.testing.assert_array_equal(calib["P2"], KITTI_00_P2)
    np.testing.assert_array_equal(calib["Tr"], KITTI_00_TR)
    # P1 and P3 sit 0.54 m to the right of P0 and P2, as in the real file (-386.1448 = -718.856 * 0.5372).
    assert calib["P3"][0, 3] == pytest.approx(KITTI_00_P2[0, 3] - 718.856 * 0.54)
    write_calib(path, KITTI_00_P2, KITTI_00_TR[:3])
    np.testing.assert_array_equal(read_calib(path)["Tr"], KITTI_00_TR)
    with pytest.raises(ValueError, match="P2"):
        write_calib(path, KITTI_00_P2[:, :3], KITTI_00_TR)


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        (KITTI_00_CALIB_TXT.replace("P2:", "PX:"), ValueError, "lacks P2"),
        ("\n".join(KITTI_00_CALIB_TXT.splitlines()[:4]), ValueError, "lacks Tr"),
        (KITTI_00_CALIB_TXT.replace("P2: 7.188560000000e+02 ", "P2: "), ValueError, "P2 has 11 values"),
        (KITTI_00_CALIB_TXT.replace("P2: 7.188560000000e+02", "P2: abc"), ValueError, "not a list of numbers"),
        (None, FileNotFoundError, "does not exist"),
    ],
)
def test_read_calib_errors_name_the_file(tmp_path: Path, text: str | None, error: type[Exception], match: str) -> None:
    path = tmp_path / "calib.txt"
    if text is not None:
        path.write_text(text)
    with pytest.raises(error, match=match) as info:
        read_calib(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------------


def test_dataset_reads_frames_labels_and_camera(kitti: dict[str, Any]) -> None:
    dataset = _small(kitti["root"], sequences=["00"])
    assert len(dataset) == 3
    assert [dataset.frame_id(i) for i in range(3)] == ["00_000000", "00_000005", "00_000010"]
    assert dataset.voxel_size == pytest.approx(1.6)
    for index in range(3):
        sample = dataset[index]
        truth = kitti["frames"][sample["frame_id"]]
        assert set(sample) == set(SAMPLE_KEYS)
        assert sample["occupancy"].dtype == torch.uint8
        assert np.array_equal(sample["occupancy"].numpy(), truth["expected"])
        assert sample["image"].shape == (1, 3, 40, 64) and sample["image"].dtype == torch.float32
        crop = torch.from_numpy(truth["image"][:40, :64]).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(sample["image"][0], crop)
        torch.testing.assert_close(sample["intrinsics"][0], torch.tensor(KITTI_00_P2[:, :3], dtype=torch.float32))
        torch.testing.assert_close(sample["voxel_to_camera"][0], torch.tensor(KITTI_00_TR, dtype=torch.float32))
        assert sample["voxel_origin"].tolist() == pytest.approx([0.0, -25.6, -2.0])
        assert float(sample["voxel_size"]) == pytest.approx(1.6)
        assert sample["prompt"].startswith("a driving scene with ")


@pytest.mark.parametrize(
    ("split", "sequences"), [("train", ["00", "01", "02", "03", "04", "05", "06", "07", "09", "10"]), ("val", ["08"])]
)
def test_default_split_sequences(kitti: dict[str, Any], split: str, sequences: list[str]) -> None:
    dataset = _small(kitti["root"], split)
    assert sorted({dataset.frames[i][0] for i in range(len(dataset))}) == sequences
    assert list(dataset.calibs) == sequences


def test_sequences_override_and_dataset_folder_as_root(kitti: dict[str, Any]) -> None:
    dataset = _small(kitti["root"] / "dataset", "val", sequences=[8, "00"])  # ints are zero padded
    assert [dataset.frame_id(i) for i in range(len(dataset))] == [
        "08_000000",
        "08_000005",
        "00_000000",
        "00_000005",
        "00_000010",
    ]


def test_test_split_has_no_occupancy(kitti: dict[str, Any]) -> None:
    dataset = _small(kitti["root"], "test", sequences=["11"])
    assert len(dataset) == 1
    sample = dataset[0]
    assert sample["frame_id"] == "11_000000"
    assert sample["occupancy"].shape == SMALL_GRID and bool((sample["occupancy"] == 255).all())
    assert sample["prompt"] == "a driving scene"
    assert dataset.load(0).occupancy is None


def test_preprocessed_labels(tmp_path: Path) -> None:
    written = write_fake_semantic_kitti(
        tmp_path / "kitti", {"08": 2}, SMALL_GRID, SMALL_IMAGE, preprocess_root=tmp_path / "pre"
    )
    label_dir = tmp_path / "pre" / "labels" / "08"
    assert sorted(os.listdir(label_dir)) == ["000000_1_1.npy", "000005_1_1.npy"]
    # A target that differs from the .label file, so the test sees which one was read.
    target = np.zeros(SMALL_GRID, dtype=np.float32)
    target[3, 4, 1], target[0, 0, 0] = 13.0, 255.0
    np.save(label_dir / "000005_1_1.npy", target)
    dataset = _small(tmp_path / "kitti", "val", preprocess_root=tmp_path / "pre")
    assert np.array_equal(dataset[0]["occupancy"].numpy(), written["frames"]["08_000000"]["expected"])
    assert np.array_equal(dataset[1]["occupancy"].numpy(), target.astype(np.uint8))
    np.save(label_dir / "000005_1_1.npy", target.astype(np.uint8))  # uint8 targets are accepted too
    assert np.array_equal(dataset[1]["occupancy"].numpy(), target.astype(np.uint8))
    for bad, match in [
        (np.full(SMALL_GRID, 42.0, np.float32), "values other than"),
        (np.zeros((8, 8, 1), np.float32), "shape"),
    ]:
        np.save(label_dir / "000005_1_1.npy", bad)
        with pytest.raises(ValueError, match=match):
            dataset[1]
    (label_dir / "000005_1_1.npy").unlink()
    with pytest.raises(FileNotFoundError, match="000005_1_1.npy"):
        dataset[1]


def test_crop_keeps_intrinsics_and_projects_a_known_point(tmp_path: Path) -> None:
    # velodyne (x fwd, y left, z up) -> camera (x right, y down, z fwd); P2's 4th column must be ignored.
    p2 = np.array([[500.0, 0.0, 600.0, 45.0], [0.0, 500.0, 180.0, 0.1], [0.0, 0.0, 1.0, 0.004]])
    tr = np.array([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    write_fake_semantic_kitti(tmp_path, {"00": 1}, SMALL_GRID, (1241, 376), p2=p2, tr=tr)
    png = tmp_path / "dataset" / "sequences" / "00" / "image_2" / "000000.png"
    pixels = np.zeros((376, 1241, 3), dtype=np.uint8)
    # Point (10, 2, 1) m -> camera (-2, -1, 10) -> u = 500 * -0.2 + 600 = 500, v = 500 * -0.1 + 180 = 130.
    pixels[130, 500] = (255, 0, 0)
    pixels[372, 1230] = (0, 255, 0)  # outside the 1220x370 crop
    Image.fromarray(pixels).save(png)
    sample = SemanticKittiDataset(tmp_path, "train", grid_size=SMALL_GRID, sequences=["00"])[0]
    assert sample["image"].shape == (1, 3, 370, 1220)
    torch.testing.assert_close(sample["intrinsics"][0], torch.tensor(p2[:, :3], dtype=torch.float32))
    uv, depth = project_points(
        torch.tensor([[[10.0, 2.0, 1.0]]]), sample["intrinsics"][None], sample["voxel_to_camera"][None]
    )
    torch.testing.assert_close(uv[0, 0, 0], torch.tensor([500.0, 130.0]))
    assert float(depth[0, 0, 0]) == pytest.approx(10.0)
    assert sample["image"][0, :, 130, 500].tolist() == [1.0, 0.0, 0.0]
    assert float(sample["image"][0, 1].sum()) == 0.0  # the green marker was cropped away


def test_flip_mirrors_every_voxel_projection(kitti_real_camera: dict[str, Any]) -> None:
    kwargs = {"grid_size": (128, 128, 16), "sequences": ["00"]}
    plain = SemanticKittiDataset(kitti_real_camera["root"], "train", **kwargs)[0]
    flipped = SemanticKittiDataset(kitti_real_camera["root"], "train", flip_prob=1.0, **kwargs)[0]
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["occupancy"], plain["occupancy"])  # the 3D target is never flipped

    def project(sample: dict[str, Any]) -> Any:
        return project_voxels(
            (128, 128, 16),
            sample["voxel_origin"][None].double(),
            sample["voxel_size"].double(),
            sample["intrinsics"][None].double(),
            sample["voxel_to_camera"][None].double(),
            (370, 1220),
        )

    a, b = project(plain), project(flipped)
    fov = a.fov_mask[0, 0]
    assert 0.05 < float(fov.float().mean()) < 0.9
    assert torch.equal(b.fov_mask[0, 0], fov)
    ua, ub = a.rounded_pixels[0, 0][fov], b.rounded_pixels[0, 0][fov]
    assert torch.equal(ub[:, 0], 1219 - ua[:, 0])
    assert torch.equal(ub[:, 1], ua[:, 1])


def test_monoscene_vox2pix_agrees_with_project_voxels(kitti_real_camera: dict[str, Any]) -> None:
    dataset = SemanticKittiDataset(kitti_real_camera["root"], "train", grid_size=(128, 128, 16), sequences=["00"])
    k, tr = dataset.calibs["00"]
    np.testing.assert_array_equal(k, KITTI_00_P2[:, :3])
    np.testing.assert_array_equal(tr, KITTI_00_TR)
    # MonoScene's FLoSP projection: scale 2 = 0.4 m voxels over the 1220x370 crop.
    pix, fov, _ = vox2pix(tr, k, np.array(dataset.VOXEL_ORIGIN), dataset.voxel_size, 1220, 370, (128, 128, 16))
    sample = dataset[0]
    proj = project_voxels(
        (128, 128, 16),
        sample["voxel_origin"][None],
        sample["voxel_size"],
        sample["intrinsics"][None],
        sample["voxel_to_camera"][None],
        tuple(sample["image"].shape[-2:]),
    )
    assert dataset.voxel_size == pytest.approx(0.4)
    assert 0.05 < fov.mean() < 0.9
    assert np.array_equal(proj.fov_mask[0, 0].numpy(), fov)
    ours, continuous = proj.rounded_pixels[0, 0].numpy()[fov], proj.pixels[0, 0].numpy()[fov]
    differ = ours != pix[fov]
    # Both round half-to-even in float32 but in a different operation order: they may only disagree, by one pixel,
    # where the continuous coordinate is a float32 tie away from x.5 (2 of 176,719 voxels on this rig).
    assert differ.sum() <= 1e-4 * differ.size
    assert np.abs(ours - pix[fov]).max() <= 1
    assert (np.abs(continuous[differ] % 1.0 - 0.5) < 1e-3).all()


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def test_missing_calib_of_a_split_sequence(tmp_path: Path) -> None:
    write_fake_semantic_kitti(tmp_path, {"00": 1, "08": 1}, SMALL_GRID, SMALL_IMAGE)
    with pytest.raises(FileNotFoundError, match=r"sequences/01/calib\.txt"):
        _small(tmp_path, "train")
    (tmp_path / "dataset" / "sequences" / "08" / "calib.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"sequences/08/calib\.txt"):
        _small(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="neither dataset/sequences nor sequences"):
        _small(tmp_path / "nowhere", "val")


@pytest.mark.parametrize(
    ("suffix", "size", "expected"),
    [(".label", 8191, 8192), (".label", 4096, 8192), (".invalid", 513, 512), (".invalid", 511, 512)],
)
def test_wrong_size_voxel_files(tmp_path: Path, suffix: str, size: int, expected: int) -> None:
    write_fake_semantic_kitti(tmp_path, {"00": 1}, SMALL_GRID, SMALL_IMAGE)
    path = tmp_path / "dataset" / "sequences" / "00" / "voxels" / f"000000{suffix}"
    data = path.read_bytes()
    path.write_bytes((data + bytes(8))[:size])
    dataset = _small(tmp_path, sequences=["00"])
    with pytest.raises(ValueError, match=f"has {size} bytes, expected exactly {expected} bytes") as info:
        dataset[0]
    assert str(path) in str(info.value)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=f"000000{suffix}"):
        dataset[0]


def test_unknown_split_and_bad_arguments(kitti: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="unknown split 'training'"):
        _small(kitti["root"], "training")
    with pytest.raises(ValueError, match="crop_size"):
        SemanticKittiDataset(kitti["root"], "val", grid_size=SMALL_GRID, crop_size=(64,))


@pytest.mark.parametrize("grid", [(16, 16, 4), (32, 16, 4), (256, 256, 16), (256, 128, 32)])
def test_grid_must_be_isotropic(kitti: dict[str, Any], grid: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="isotropic"):
        SemanticKittiDataset(kitti["root"], "val", grid_size=grid, crop_size=SMALL_CROP)


def test_image_smaller_than_the_crop(kitti: dict[str, Any]) -> None:
    dataset = SemanticKittiDataset(kitti["root"], "val", grid_size=SMALL_GRID, crop_size=(71, 40))
    with pytest.raises(ValueError, match=r"000000\.png is 70x44, smaller than the 71x40 crop"):
        dataset[0]


# ---------------------------------------------------------------------------------------------------------------
# Real-size frame and DataModule
# ---------------------------------------------------------------------------------------------------------------


def test_real_size_frame(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    seq = tmp_path / "dataset" / "sequences" / "08"
    write_calib(seq / "calib.txt", KITTI_00_P2, KITTI_00_TR)
    raw = random_raw_labels(rng, (256, 256, 32))
    invalid = rng.random((256, 256, 32)) < 0.1
    write_voxel_frame(seq / "voxels", 0, raw, invalid=invalid)
    (seq / "image_2").mkdir()
    Image.fromarray(rng.integers(0, 256, (376, 1241, 3), dtype=np.uint8)).save(seq / "image_2" / "000000.png")
    assert (seq / "voxels" / "000000.label").stat().st_size == 4_194_304
    for suffix in ("bin", "invalid", "occluded"):
        assert (seq / "voxels" / f"000000.{suffix}").stat().st_size == 262_144

    dataset = SemanticKittiDataset(tmp_path, "val")
    start = time.perf_counter()
    sample = dataset[0]
    elapsed = time.perf_counter() - start
    print(f"\nSemanticKITTI full-size sample (256x256x32 labels, 1241x376 PNG): {elapsed * 1000:.1f} ms")
    assert sample["image"].shape == (1, 3, 370, 1220) and sample["image"].dtype == torch.float32
    assert sample["occupancy"].shape == (256, 256, 32) and sample["occupancy"].dtype == torch.uint8
    assert np.array_equal(sample["occupancy"].numpy(), expected_train_ids(raw, invalid))
    assert sample["intrinsics"].shape == (1, 3, 3) and sample["intrinsics"].dtype == torch.float32
    assert sample["voxel_to_camera"].shape == (1, 4, 4) and sample["voxel_to_camera"].dtype == torch.float32
    assert sample["voxel_origin"].shape == (3,) and sample["voxel_origin"].dtype == torch.float32
    assert sample["voxel_size"].shape == () and float(sample["voxel_size"]) == pytest.approx(0.2)
    assert sample["frame_id"] == "08_000000"


def test_datamodule_train_batch(kitti: dict[str, Any]) -> None:
    datamodule = SemanticKittiDataModule(
        root=str(kitti["root"]), crop_size=SMALL_CROP, grid_size=SMALL_GRID, image_size=(32, 96), batch_size=2
    )
    assert datamodule.num_classes == 20 and datamodule.grid_size == SMALL_GRID
    assert datamodule.test_split == "val" and datamodule.predict_split == "val"
    datamodule.setup("fit")
    assert len(datamodule.datasets["train"]) == 12 and len(datamodule.datasets["val"]) == 2
    assert datamodule.datasets["train"].transform.flip_prob == 0.5
    assert datamodule.datasets["val"].transform.flip_prob == 0.0
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == set(SAMPLE_KEYS) | set(OPTIONAL_SAMPLE_KEYS)  # default colour jitter 0.4 in training
    assert batch["image"].shape == (2, 1, 3, 32, 96) and batch["image"].dtype == torch.float32
    assert batch["perceiver_image"].shape == batch["image"].shape
    assert set(datamodule.datasets["val"][0]) == set(SAMPLE_KEYS)
    assert batch["occupancy"].shape == (2, *SMALL_GRID) and batch["occupancy"].dtype == torch.uint8
    assert batch["intrinsics"].shape == (2, 1, 3, 3) and batch["intrinsics"].dtype == torch.float32
    assert batch["voxel_to_camera"].shape == (2, 1, 4, 4) and batch["voxel_to_camera"].dtype == torch.float32
    assert batch["voxel_origin"].shape == (2, 3) and batch["voxel_size"].shape == (2,)
    assert isinstance(batch["prompt"], list) and len(batch["prompt"]) == 2
    assert isinstance(batch["frame_id"], list) and len(batch["frame_id"]) == 2
    # The 64x40 crop resized to 96x32: fy scales by 0.8 (fx too, up to the flip's sign-free mirror).
    torch.testing.assert_close(batch["intrinsics"][:, 0, 1, 1], torch.full((2,), 718.856 * 0.8))
    torch.testing.assert_close(batch["intrinsics"][:, 0, 0, 0], torch.full((2,), 718.856 * 1.5))


def test_datamodule_rejects_unlabelled_evaluation_split() -> None:
    with pytest.raises(ValueError, match="test_split='test' has no labels"):
        SemanticKittiDataModule(root="unused", test_split="test")
