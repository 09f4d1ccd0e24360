"""Our native exports, read by the peers' own reading logic (MonoScene, OpenOccupancy), not only by our readers.

The peer code lives in :mod:`tests.peers` (faithful transcriptions under Apache-2.0, sources and commits in their
headers). Each test writes generated samples through :class:`~occscene_pl.writer.GenerationWriter`, runs the peer's
loader on the export exactly as its configs do, and checks labels, pixels and camera geometry against the samples.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from occscene_pl.data.nuscenes_occupancy import CAMERA_NAMES, POINT_CLOUD_RANGE
from occscene_pl.native_export import NUSCENES_CAMERA_KEYS, NUSCENES_INFO_KEYS
from occscene_pl.samples import GeneratedSample
from occscene_pl.writer import GenerationWriter
from tests.fakes.semantic_kitti import KITTI_00_P2, KITTI_00_TR
from tests.peers import monoscene, openoccupancy
from tests.test_writer import NU_GRID, NU_ORIGIN, fake_trainer, make_surround_sample, write

KITTI_GRID = (256, 256, 32)  # MonoScene's preprocess.py reshapes to exactly this
GEN_W, GEN_H = 1024, 320  # the KITTI paper config's generated size


def _writer(tmp_path: Path, **kwargs: Any) -> tuple[GenerationWriter, Any]:
    w = GenerationWriter(progress=False, render=False, **kwargs)
    trainer = fake_trainer(tmp_path)
    w.setup(trainer, SimpleNamespace(predict_step=lambda batch: None), "predict")  # type: ignore[arg-type]
    return w, trainer


def _gradient_image(width: int, height: int) -> np.ndarray:
    """A smooth (3, H, W) image in [0, 1]: red follows u, green follows v, so resampling barely changes it."""
    u = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :].repeat(height, 0)
    v = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None].repeat(width, 1)
    return np.stack([u, v, 0.5 * (u + v)])


def _kitti_sample(frame_id: str, seed: int) -> GeneratedSample:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 20, KITTI_GRID, dtype=np.uint8)
    labels[rng.random(KITTI_GRID) < 0.6] = 0
    labels[rng.random(KITTI_GRID) < 0.1] = 255
    k = KITTI_00_P2[:, :3].copy()
    k[:2] *= GEN_W / 1241  # the KITTI camera at the generated width
    return GeneratedSample(
        frame_id=frame_id,
        prompt="a driving scene",
        seed=seed,
        mode="text",
        images=_gradient_image(GEN_W, GEN_H)[None],
        labels=labels,
        intrinsics=k[None].astype(np.float32),
        voxel_to_camera=KITTI_00_TR[None].astype(np.float32),
        voxel_origin=np.array([0.0, -25.6, -2.0], dtype=np.float32),
        voxel_size=0.2,
    )


def _project(points: np.ndarray, k: np.ndarray, transform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cam = points @ transform[:3, :3].T + transform[:3, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = cam[:, :2] / cam[:, 2:3] * np.diag(k)[:2] + k[:2, 2]
    return uv, cam[:, 2]


def test_monoscene_reads_train_split_at_its_image_size(tmp_path: Path) -> None:
    """1024 x 320 samples exported for MonoScene's training split at 1220 x 370: its preprocess + KittiDataset
    read every frame, the targets equal the samples' labels, and its vox2pix / FOV masks hit the same content."""
    w, trainer = _writer(
        tmp_path, export=["semantic_kitti"], export_split="train", semantic_kitti_image_size=[1220, 370]
    )
    samples = [_kitti_sample(f"scene{i}", seed=i) for i in range(2)]
    write(w, trainer, samples)
    root = tmp_path / "predictions" / "semantic_kitti"
    preprocess_root = tmp_path / "monoscene_preprocess"
    written = monoscene.preprocess(str(root), str(preprocess_root))
    assert len(written) == 2 and all("/labels/00/" in path for path in written)

    dataset = monoscene.KittiDataset("train", str(root), str(preprocess_root))
    assert len(dataset) == 2 and not (root / "dataset" / "sequences" / "08").exists()
    assert {scan["sequence"] for scan in dataset.scans} == {"00"}  # 01-07, 09, 10: placeholder calibs, no frames
    stems = {w._exporter("semantic_kitti").lookup(s.frame_id): s for s in samples}  # type: ignore[attr-defined]
    index = np.stack(np.meshgrid(*[np.arange(n) for n in KITTI_GRID], indexing="ij"), -1).reshape(-1, 3)
    centres = (index + 0.5) * 0.2 + np.array([0.0, -25.6, -2.0])
    for i in range(len(dataset)):
        item = dataset[i]
        sample = stems[item["frame_id"]]
        np.testing.assert_array_equal(item["target"], sample.labels.astype(np.float32))
        assert item["img"].shape == (370, 1220, 3)  # the crop keeps a full image

        # MonoScene's projection at scale 1 vs the sample's camera at the generated size, mapped by the resize
        # (1220 / 1024, 381 / 320) and the centred crop (5 rows off the top).
        k0 = sample.intrinsics[0].astype(np.float64)
        uv, depth = _project(centres, k0, sample.voxel_to_camera[0].astype(np.float64))
        expected = np.stack([(uv[:, 0] + 0.5) * 1220 / GEN_W - 0.5, (uv[:, 1] + 0.5) * 381 / GEN_H - 0.5 - 5], -1)
        fov, pix = item["fov_mask_1"], item["projected_pix_1"]
        assert fov.sum() > 100_000
        assert np.abs(pix[fov] - expected[fov]).max() <= 0.51 + 1e-3  # cam2pix rounds to the nearest pixel
        inside = (expected[:, 0] > 0.5) & (expected[:, 0] < 1218.5) & (expected[:, 1] > 0.5) & (expected[:, 1] < 368.5)
        np.testing.assert_array_equal(fov[inside & (depth > 0)], True)
        # The pixels MonoScene samples show the content the sample's camera sees there (red = u, green = v).
        picked = item["img"][pix[fov, 1], pix[fov, 0]]
        np.testing.assert_allclose(picked[:, 0], np.clip(uv[fov, 0] / (GEN_W - 1), 0, 1), atol=0.01)
        np.testing.assert_allclose(picked[:, 1], np.clip(uv[fov, 1] / (GEN_H - 1), 0, 1), atol=0.02)


def test_monoscene_fov_masks_need_its_image_size(tmp_path: Path) -> None:
    """Without image_size the export keeps 1024 x 320, and MonoScene's FOV masks (computed for 1220 x 370) then
    point past the image: why ``semantic_kitti_image_size=[1220, 370]`` exists."""
    w, trainer = _writer(tmp_path, export=["semantic_kitti"], export_split="val")
    write(w, trainer, [_kitti_sample("plain", seed=0)])
    root = tmp_path / "predictions" / "semantic_kitti"
    monoscene.preprocess(str(root), str(tmp_path / "pre"))
    item = monoscene.KittiDataset("val", str(root), str(tmp_path / "pre"))[0]
    assert item["img"].shape == (GEN_H, GEN_W, 3)
    pix = item["projected_pix_1"][item["fov_mask_1"]]
    assert (pix[:, 0] >= GEN_W).any() and (pix[:, 1] >= GEN_H).any()


@pytest.mark.parametrize("split", ["train", "val"])
def test_openoccupancy_reads_every_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, split: str) -> None:
    """The export root used as OpenOccupancy's ``data/``: NuscOCCDataset, the BEVDet image loader (with depth_gt),
    LoadOccupancy and mmdet3d's annotation reader run on every frame and give back the samples."""
    size = (96, 54)
    w, trainer = _writer(
        tmp_path, export=["nuscenes_occupancy"], export_split=split, nuscenes_occupancy_image_size=size
    )
    samples = {NuScenesTokens.of(f"frame{i}"): make_surround_sample(f"frame{i}", seed=i) for i in range(2)}
    write(w, trainer, list(samples.values()))
    w.finalize()
    workdir = tmp_path / "openoccupancy"
    workdir.mkdir()
    os.symlink(tmp_path / "predictions" / "nuscenes_occupancy", workdir / "data")
    monkeypatch.chdir(workdir)

    ann_file = openoccupancy.TRAIN_ANN_FILE if split == "train" else openoccupancy.VAL_ANN_FILE
    other = openoccupancy.VAL_ANN_FILE if split == "train" else openoccupancy.TRAIN_ANN_FILE
    assert not Path(other).exists()
    dataset = openoccupancy.NuscOCCDataset(list(NU_GRID), list(POINT_CLOUD_RANGE), openoccupancy.OCC_PATH, ann_file)
    assert len(dataset) == 2
    index = np.stack(np.meshgrid(*[np.arange(n) for n in NU_GRID], indexing="ij"), -1).reshape(-1, 3)
    centres = (index + 0.5) * 1.6 + np.array(NU_ORIGIN)
    for i in range(len(dataset)):
        info = dataset.data_infos[i]
        assert set(NUSCENES_INFO_KEYS) <= set(info)
        assert all(set(NUSCENES_CAMERA_KEYS) <= set(cam) for cam in info["cams"].values())
        results = dataset.get_data_info(i)
        sample = samples[results["sample_idx"]]
        assert results["sweeps"] == [] and results["prev_idx"] == "" and results["next_idx"] == ""
        assert results["can_bus"].shape == (18,) and not results["can_bus"].any()
        assert Path(results["pts_filename"]).is_file() and Path(results["pts_filename"]).stat().st_size == 0
        assert openoccupancy.get_ann_info(info)["gt_bboxes_3d"].shape == (0, 9)

        results = openoccupancy.load_multiview_images(results)
        inputs = results["img_inputs"]
        results = openoccupancy.load_occupancy(results, grid_size=NU_GRID, pc_range=POINT_CLOUD_RANGE)
        np.testing.assert_array_equal(results["gt_occ"], sample.labels)
        for view, camera in enumerate(openoccupancy.DATA_CONFIG_CAMS):
            assert camera == CAMERA_NAMES[view]
            assert inputs["imgs"][view].shape == (size[1], size[0], 3)
            assert inputs["gt_depths"][view].shape == (0, 3)  # placeholder: no LiDAR points
            # lidar2img of the info vs the sample's camera, mapped by the resize (2.4) and the crop (2 rows).
            lidar2img = results["lidar2img"][list(info["cams"]).index(camera)]
            projected = np.c_[centres, np.ones(len(centres))] @ lidar2img.T
            ours = projected[:, :2] / projected[:, 2:3]
            uv, depth = _project(
                centres, sample.intrinsics[view].astype(np.float64), sample.voxel_to_camera[view].astype(np.float64)
            )
            expected = np.stack([(uv[:, 0] + 0.5) * 96 / 40 - 0.5, (uv[:, 1] + 0.5) * 58 / 24 - 0.5 - 2], -1)
            front = depth > 0.5
            np.testing.assert_allclose(ours[front], expected[front], rtol=1e-4, atol=1e-3)
            # Sequential mode's quaternion keys give the same camera -> LiDAR transform.
            sensor2lidar = openoccupancy.get_sensor2lidar_transformation(info, camera, info)
            np.testing.assert_allclose(sensor2lidar[:3, :3], inputs["rots"][view], atol=1e-5)
            np.testing.assert_allclose(sensor2lidar[:3, 3], inputs["trans"][view], atol=1e-5)


class NuScenesTokens:
    """The export token of a frame_id (the sample_idx OpenOccupancy reports)."""

    @staticmethod
    def of(frame_id: str) -> str:
        from occscene_pl.native_export import NuScenesOccupancyExporter

        return NuScenesOccupancyExporter.token(frame_id)
