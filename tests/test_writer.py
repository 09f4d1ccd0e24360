"""GenerationWriter: files, contents, atomicity, resume/overwrite, naming, errors, native export round trips."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import occscene_pl
from occscene_pl import writer
from occscene_pl.data.nuscenes_occupancy import CAMERA_NAMES, POINT_CLOUD_RANGE, NuScenesOccupancyDataset
from occscene_pl.data.semantic_kitti import SemanticKittiDataset
from occscene_pl.files import atomic_write
from occscene_pl.native_export import NuScenesOccupancyExporter, SemanticKittiExporter
from occscene_pl.samples import GeneratedSample
from occscene_pl.writer import GenerationWriter, check_frame_id
from tests.fakes.semantic_kitti import KITTI_00_P2, KITTI_00_TR

GRID = (32, 32, 4)  # the KITTI extent at 1.6 m voxels
WIDTH, HEIGHT = 40, 24
KITTI_ORIGIN = (0.0, -25.6, -2.0)


def make_sample(
    frame_id: str,
    views: int = 1,
    condition: bool = False,
    probabilities: bool = False,
    seed: int = 0,
    origin: tuple[float, float, float] = KITTI_ORIGIN,
    focal_scale: float = 1.0,
    **changes: Any,
) -> GeneratedSample:
    """A predict_step sample: KITTI rig scaled to 40 x 24, random labels incl. 255; ``changes`` replace fields."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 20, GRID, generator=g, dtype=torch.uint8)
    labels[torch.rand(GRID, generator=g) < 0.5] = 0
    labels[torch.rand(GRID, generator=g) < 0.1] = 255
    k = torch.tensor(KITTI_00_P2[:, :3], dtype=torch.float32)
    k[:2] *= WIDTH / 1241 * focal_scale
    fields = {
        "frame_id": frame_id,
        "prompt": f"a driving scene {seed}",
        "seed": seed,
        "mode": "layout" if condition else "text",
        "images": torch.rand(views, 3, HEIGHT, WIDTH, generator=g),
        "labels": labels,
        "probabilities": torch.rand(20, *GRID, generator=g).half() if probabilities else None,
        "condition": torch.randint(0, 20, GRID, generator=g, dtype=torch.uint8) if condition else None,
        "intrinsics": k.expand(views, 3, 3).clone(),
        "voxel_to_camera": torch.tensor(KITTI_00_TR, dtype=torch.float32).expand(views, 4, 4).clone(),
        "voxel_origin": torch.tensor(origin),
        "voxel_size": 1.6,
        "meta": {"sampler": "ddim", "num_inference_steps": 2, "guidance_scale": torch.tensor(7.5)},
    }
    return GeneratedSample(**(fields | changes))


def fake_trainer(root: Path, **kwargs: Any) -> Any:
    fields = {
        "default_root_dir": str(root),
        "ckpt_path": "runs/last.ckpt",
        "is_global_zero": True,
        "progress_bar_callback": None,
        "predict_dataloaders": None,
        "world_size": 1,
    }
    return SimpleNamespace(**(fields | kwargs))


def write(w: GenerationWriter, trainer: Any, samples: list[GeneratedSample]) -> None:
    w.write_on_batch_end(trainer, None, samples, None, None, 0, 0)  # type: ignore[arg-type]


def ready(tmp_path: Path, **kwargs: Any) -> tuple[GenerationWriter, Any]:
    w = GenerationWriter(progress=False, **kwargs)
    trainer = fake_trainer(tmp_path)
    w.setup(trainer, SimpleNamespace(predict_step=lambda batch: None), "predict")  # type: ignore[arg-type]
    return w, trainer


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*.tmp"))


def test_files_and_contents(tmp_path: Path) -> None:
    w, trainer = ready(tmp_path, save_probabilities=True, class_names=[f"c{i}" for i in range(20)])
    sample = make_sample("scene_0", condition=True, probabilities=True, seed=3)
    assert not w.is_complete("scene_0")
    write(w, trainer, [sample])
    out = tmp_path / "predictions" / "scene_0"
    assert w.root == tmp_path / "predictions" and w.is_complete("scene_0")
    assert sorted(p.name for p in out.iterdir()) == ["image.png", "meta.json", "occupancy.npz", "occupancy.png"]

    pixels = np.asarray(Image.open(out / "image.png"))
    expected = np.round(sample.images[0].transpose(1, 2, 0) * 255).astype(np.uint8)
    np.testing.assert_array_equal(pixels, expected)

    with np.load(out / "occupancy.npz") as npz:
        assert set(npz.files) == {
            "labels",
            "condition",
            "probabilities",
            "voxel_origin",
            "voxel_size",
            "intrinsics",
            "voxel_to_camera",
            "class_names",
        }
        assert npz["labels"].dtype == np.uint8 and npz["probabilities"].dtype == np.float16
        np.testing.assert_array_equal(npz["labels"], sample.labels)
        np.testing.assert_array_equal(npz["condition"], sample.condition)
        np.testing.assert_array_equal(npz["probabilities"], sample.probabilities)
        np.testing.assert_allclose(npz["intrinsics"], sample.intrinsics)
        np.testing.assert_allclose(npz["voxel_to_camera"], sample.voxel_to_camera)
        np.testing.assert_allclose(npz["voxel_origin"], KITTI_ORIGIN, rtol=1e-6)
        assert float(npz["voxel_size"]) == pytest.approx(1.6)
        assert npz["class_names"].tolist()[:2] == ["c0", "c1"]

    figure = np.asarray(Image.open(out / "occupancy.png"))
    row = max(HEIGHT, GRID[0])  # the bird's-eye view is X pixels tall
    assert figure.shape[0] == 2 * row + 4  # the condition's row sits below the generated one
    np.testing.assert_array_equal(figure[:HEIGHT, :WIDTH], pixels)  # the image is the first panel

    meta = json.loads((out / "meta.json").read_text())
    assert meta["frame_id"] == "scene_0" and meta["prompt"] == "a driving scene 3" and meta["seed"] == 3
    assert meta["mode"] == "layout"
    assert meta["meta"] == {"sampler": "ddim", "num_inference_steps": 2, "guidance_scale": 7.5}
    assert meta["files"] == ["image.png", "occupancy.npz", "occupancy.png"]
    assert meta["checkpoint"] == "runs/last.ckpt" and meta["package_version"] == occscene_pl.__version__
    assert meta["created_at"] and meta["exports"] == {} and meta["grid_size"] == list(GRID)
    assert leftovers(tmp_path) == []


def test_optional_outputs_off(tmp_path: Path) -> None:
    w, trainer = ready(tmp_path, render=False, output_dir=str(tmp_path / "custom"))
    write(w, trainer, [make_sample("a", probabilities=True)])
    out = tmp_path / "custom" / "a"
    assert sorted(p.name for p in out.iterdir()) == ["image.png", "meta.json", "occupancy.npz"]
    with np.load(out / "occupancy.npz") as npz:
        assert "probabilities" not in npz.files and "condition" not in npz.files
    assert not (tmp_path / "predictions").exists()


def test_six_views_are_numbered(tmp_path: Path) -> None:
    w, trainer = ready(tmp_path)
    write(w, trainer, [make_sample("multi", views=6)])
    out = tmp_path / "predictions" / "multi"
    names = sorted(p.name for p in out.glob("image*.png"))
    assert names == [f"image_{v}.png" for v in range(6)]
    assert json.loads((out / "meta.json").read_text())["num_views"] == 6
    row = max(HEIGHT, GRID[0])  # the bird's-eye view is X pixels tall
    assert np.asarray(Image.open(out / "occupancy.png")).shape[0] == row


def test_skip_on_rerun_and_overwrite(tmp_path: Path) -> None:
    w, trainer = ready(tmp_path)
    write(w, trainer, [make_sample("a", seed=1), make_sample("b", seed=2)])
    assert (w.written, w.skipped) == (2, 0)
    meta_path = tmp_path / "predictions" / "a" / "meta.json"
    before = meta_path.read_bytes()
    write(w, trainer, [make_sample("a", seed=9), make_sample("b", seed=9)])
    assert (w.written, w.skipped) == (2, 2) and meta_path.read_bytes() == before
    assert w.should_skip("a") and not w.should_skip("never_written")

    again, _ = ready(tmp_path, overwrite=True)
    assert not again.should_skip("a")
    write(again, trainer, [make_sample("a", seed=9)])
    assert json.loads(meta_path.read_text())["seed"] == 9 and again.written == 1


def test_incomplete_when_a_listed_file_is_missing(tmp_path: Path) -> None:
    w, trainer = ready(tmp_path)
    write(w, trainer, [make_sample("a")])
    (tmp_path / "predictions" / "a" / "occupancy.png").unlink()
    assert not w.is_complete("a")
    (tmp_path / "predictions" / "a" / "meta.json").write_text("{not json")
    assert not w.is_complete("a")
    write(w, trainer, [make_sample("a")])
    assert w.is_complete("a") and w.written == 2


def test_failure_mid_sample_leaves_nothing_under_final_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w, trainer = ready(tmp_path)
    write(w, trainer, [make_sample("a")])  # complete; the failing overwrite below must un-complete it first

    def broken_npz(f: Any, arrays: Any, stored: Any = ()) -> None:
        f.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(writer, "write_npz", broken_npz)
    for frame_id, overwrite in (("b", False), ("a", True)):
        w.overwrite = overwrite
        with pytest.raises(OSError, match="disk full"):
            write(w, trainer, [make_sample(frame_id)])
        out = tmp_path / "predictions" / frame_id
        assert not (out / "meta.json").exists() and not w.is_complete(frame_id)
        assert leftovers(tmp_path) == []
    assert not (tmp_path / "predictions" / "b" / "occupancy.npz").exists()
    monkeypatch.undo()
    write(w, trainer, [make_sample("a"), make_sample("b")])
    assert w.is_complete("a") and w.is_complete("b")


def test_atomic_write_keeps_old_content_on_error(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    atomic_write(target, b"old")

    def fail(f: Any) -> None:
        f.write(b"new but partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["file.bin"]


@pytest.mark.parametrize("frame_id", ["a/b", "a\\b", "..", ".hidden", "", "semantic_kitti", "x\0y", 7])
def test_bad_frame_id(tmp_path: Path, frame_id: Any) -> None:
    w, trainer = ready(tmp_path)
    with pytest.raises(ValueError, match="frame_id") as info:  # refused by GeneratedSample or by the writer
        write(w, trainer, [make_sample(frame_id)])
    assert repr(frame_id) in str(info.value)
    with pytest.raises(ValueError, match="frame_id"):
        w.is_complete(frame_id)
    assert check_frame_id("08_000005") == "08_000005"


def test_malformed_predictions(tmp_path: Path) -> None:
    w, trainer = ready(tmp_path, class_names=["empty", "car"])
    with pytest.raises(ValueError, match=r"'a': labels has label \d+ but only 2 class_names"):
        write(w, trainer, [make_sample("a")])
    with pytest.raises(ValueError, match=r"'a': condition has label \d+ but only 2 class_names"):
        write(w, trainer, [make_sample("a", condition=True, labels=torch.zeros(GRID, dtype=torch.uint8))])
    with pytest.raises(TypeError, match="list of GeneratedSample"):
        write(w, trainer, make_sample("a"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a GeneratedSample, got dict"):
        write(w, trainer, [{"frame_id": "a"}])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="takes a GeneratedSample"):
        w.write_sample({"frame_id": "a"})  # type: ignore[arg-type]
    assert not (tmp_path / "predictions" / "a").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt": 3}, "prompt must be a string"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"mode": "sketch"}, r"mode must be one of \['text', 'layout'\]"),
        ({"images": torch.rand(1, 4, HEIGHT, WIDTH)}, r"images must be \(V, 3, H, W\)"),
        ({"images": torch.rand(3, HEIGHT, WIDTH)}, r"images must be \(V, 3, H, W\)"),
        ({"labels": torch.zeros(GRID)}, "labels must be .* uint8 train ids"),
        ({"labels": torch.full(GRID, 256)}, "labels must be .* uint8 train ids"),
        ({"labels": torch.zeros(32, 32)}, "labels must be"),
        ({"condition": torch.zeros(32, 32, 8, dtype=torch.uint8)}, "condition must have the labels' shape"),
        ({"condition": torch.full(GRID, -1)}, "condition must be .* uint8 train ids"),
        ({"probabilities": torch.rand(20, 32, 32, 8)}, r"probabilities must be \(C, 32, 32, 4\)"),
        ({"intrinsics": torch.eye(3)[None].repeat(2, 1, 1)}, r"intrinsics must be \(1, 3, 3\) for 1 view"),
        ({"voxel_to_camera": torch.eye(4)}, r"voxel_to_camera must be \(1, 4, 4\)"),
        ({"voxel_origin": torch.zeros(2)}, r"voxel_origin must be \(3,\)"),
        ({"voxel_size": 0.0}, "voxel_size must be one positive number"),
        ({"voxel_size": [1.6, 1.6]}, "voxel_size must be one positive number"),
        ({"meta": ["sampler"]}, "meta must be a dict"),
    ],
)
def test_generated_sample_validation(change: dict[str, Any], message: str) -> None:
    """Malformed fields fail on construction (also through ``dataclasses.replace``), naming the frame and the field."""
    with pytest.raises(ValueError, match=f"GeneratedSample 'a': {message}"):
        dataclasses.replace(make_sample("a"), **change)


@pytest.mark.parametrize("frame_id", ["a/b", "..", ".hidden", "", "x\0y", 7])
def test_generated_sample_refuses_unsafe_frame_ids(frame_id: Any) -> None:
    with pytest.raises(ValueError, match="frame_id") as info:
        make_sample(frame_id)
    assert repr(frame_id) in str(info.value)


def test_generated_sample_normalises_its_fields() -> None:
    """Tensors become NumPy arrays of the documented dtypes; the camera and pixels derive from the fields."""
    made = make_sample("a", views=2, condition=True, probabilities=True, meta=None, voxel_size=torch.tensor(1.6))
    sample = dataclasses.replace(made, seed=np.int64(4))
    assert isinstance(sample.seed, int) and sample.seed == 4 and sample.meta == {}
    assert sample.images.dtype == np.float32 and sample.images.shape == (2, 3, HEIGHT, WIDTH)
    assert sample.labels.dtype == np.uint8 and sample.condition is not None and sample.condition.dtype == np.uint8
    assert sample.probabilities is not None and sample.probabilities.dtype == np.float16
    assert sample.intrinsics.dtype == sample.voxel_to_camera.dtype == sample.voxel_origin.dtype == np.float32
    assert isinstance(sample.voxel_size, float) and sample.voxel_size == pytest.approx(1.6)
    assert (sample.views, sample.image_size, sample.grid_size) == (2, (HEIGHT, WIDTH), GRID)
    assert sample.pixels.shape == (2, HEIGHT, WIDTH, 3) and sample.pixels.dtype == np.uint8
    assert sample.pixels is sample.pixels  # computed once, again after new images
    sample.images = np.zeros_like(sample.images)
    assert not sample.pixels.any()
    camera = sample.camera()
    assert (camera.batch_size, camera.views, camera.image_size) == (1, 2, (HEIGHT, WIDTH))
    torch.testing.assert_close(camera.intrinsics[0], torch.from_numpy(sample.intrinsics))
    with pytest.raises(TypeError, match="images"):
        GeneratedSample(frame_id="a", prompt="p", seed=0, mode="text")  # type: ignore[call-arg]


def test_constructor_and_output_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown export.*'nuscenes'.*semantic_kitti"):
        GenerationWriter(export=["nuscenes"])
    unresolved = GenerationWriter()
    with pytest.raises(RuntimeError, match="output folder"):
        unresolved.is_complete("a")
    assert unresolved.resolve_output_dir(fake_trainer(tmp_path)) == tmp_path / "predictions"
    assert not unresolved.is_complete("a")
    assert GenerationWriter(output_dir=str(tmp_path)).is_complete("a") is False  # usable before setup


def test_jsonargparse_signature() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(GenerationWriter, "writer")
    cfg = parser.parse_args(["--writer.export=[semantic_kitti]", "--writer.output_dir=out", "--writer.overwrite=true"])
    built = GenerationWriter(**cfg.writer.as_dict())
    assert built.export == ["semantic_kitti"] and built.overwrite and built.output_dir == "out"


# ---------------------------------------------------------------------------------------------------------------
# SemanticKITTI export
# ---------------------------------------------------------------------------------------------------------------


def read_back(root: Path, **kwargs: Any) -> dict[str, dict[str, Any]]:
    dataset = SemanticKittiDataset(root, grid_size=GRID, crop_size=(WIDTH, HEIGHT), **kwargs)
    return {dataset.frame_id(i): dataset[i] for i in range(len(dataset))}


def test_semantic_kitti_round_trip(tmp_path: Path) -> None:
    w, trainer = ready(tmp_path, export=["semantic_kitti"])
    samples = [make_sample(f"prompt{i:05d}_sample00", seed=i) for i in range(3)]
    write(w, trainer, samples)
    out = tmp_path / "predictions"
    items = read_back(out / "semantic_kitti", split="val")
    assert len(items) == 3
    for sample in samples:
        meta = json.loads((out / sample.frame_id / "meta.json").read_text())
        export = meta["exports"]["semantic_kitti"]
        assert export["crop_size"] == [WIDTH, HEIGHT]
        assert export["sequence"] == "08" and export["stem"] == SemanticKittiExporter(out / "semantic_kitti").lookup(
            sample.frame_id
        )
        assert (out / "semantic_kitti" / "frame_ids" / f"{export['stem']}.txt").read_text() == sample.frame_id
        item = items[f"08_{export['stem']}"]
        np.testing.assert_array_equal(item["occupancy"].numpy(), sample.labels)
        np.testing.assert_allclose(item["intrinsics"], sample.intrinsics, rtol=1e-6)
        np.testing.assert_allclose(item["voxel_to_camera"], sample.voxel_to_camera, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(item["voxel_origin"], sample.voxel_origin)
        assert float(item["voxel_size"]) == pytest.approx(1.6)
        np.testing.assert_allclose(item["image"], sample.images, atol=0.5 / 255 + 1e-6)
        assert all((out / path).is_file() for path in export["files"])
    assert w.is_complete(samples[0].frame_id)
    # A writer without the export considers the samples complete; one with it needs the export listed.
    assert GenerationWriter(output_dir=str(out)).is_complete(samples[0].frame_id)

    # Re-writing keeps each frame_id's stem: no duplicate frames.
    again, _ = ready(tmp_path, export=["semantic_kitti"], overwrite=True)
    write(again, trainer, samples[:1])
    assert len(read_back(out / "semantic_kitti", split="val")) == 3
    assert leftovers(tmp_path) == []


def test_semantic_kitti_other_origin_and_cameras(tmp_path: Path) -> None:
    """A shifted voxel origin is folded into Tr; a second camera gets sequence 22 and moves a re-written frame."""
    w, trainer = ready(tmp_path, export=["semantic_kitti"])
    shifted = make_sample("shifted", origin=(1.6, -24.0, -1.6))
    other_camera = make_sample("zoomed", focal_scale=1.5)
    write(w, trainer, [shifted, other_camera])
    root = tmp_path / "predictions" / "semantic_kitti"
    item = next(iter(read_back(root, split="val").values()))
    np.testing.assert_array_equal(item["occupancy"].numpy(), shifted.labels)
    # Voxel centres land on the same camera points: reader frame vs the sample's frame.
    index = np.stack(np.meshgrid(*[np.arange(n) for n in GRID], indexing="ij"), -1).reshape(-1, 3) + 0.5
    ours = shifted.voxel_to_camera[0].astype(np.float64)
    theirs = item["voxel_to_camera"][0].double().numpy()
    points = np.c_[index * 1.6 + np.array([1.6, -24.0, -1.6]), np.ones(len(index))]
    points_reader = np.c_[index * 1.6 + np.array(KITTI_ORIGIN), np.ones(len(index))]
    np.testing.assert_allclose(points_reader @ theirs.T, points @ ours.T, atol=1e-4)

    zoomed = read_back(root, split="val", sequences=["22"])
    assert len(zoomed) == 1
    np.testing.assert_allclose(next(iter(zoomed.values()))["intrinsics"], other_camera.intrinsics, rtol=1e-6)

    # The same frame_id re-written through camera 08 leaves sequence 22.
    w.overwrite = True
    write(w, trainer, [make_sample("zoomed", origin=(1.6, -24.0, -1.6))])
    assert len(read_back(root, split="val")) == 2
    assert read_back(root, split="val", sequences=["22"]) == {}


def test_semantic_kitti_stem_collisions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SemanticKittiExporter, "stem_hash", staticmethod(lambda frame_id: 999_999))
    w, trainer = ready(tmp_path, export=["semantic_kitti"])
    write(w, trainer, [make_sample("first"), make_sample("second"), make_sample("first", seed=5)])
    exporter = SemanticKittiExporter(tmp_path / "predictions" / "semantic_kitti")
    assert (exporter.lookup("first"), exporter.lookup("second"), exporter.lookup("third")) == ("999999", "000000", None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"views": 6}, "one camera"),
        ({"labels": torch.zeros(32, 32, 8, dtype=torch.uint8)}, "X == Y == 8"),
        ({"voxel_size": 0.2}, "voxel_size"),
        ({"labels": torch.full(GRID, 25, dtype=torch.uint8)}, "invalid train ids"),
    ],
)
def test_semantic_kitti_rejects_unfit_samples(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    w, trainer = ready(tmp_path, export=["semantic_kitti"])
    sample = make_sample("unfit", **change)
    with pytest.raises(ValueError, match=f"'unfit'.*{message}"):
        write(w, trainer, [sample])
    assert not (tmp_path / "predictions" / "unfit").exists()


# ---------------------------------------------------------------------------------------------------------------
# nuScenes-Occupancy export
# ---------------------------------------------------------------------------------------------------------------

NU_GRID = (64, 64, 5)  # the OpenOccupancy range at 1.6 m voxels
NU_ORIGIN = tuple(POINT_CLOUD_RANGE[:3])


def make_surround_sample(
    frame_id: str, seed: int = 0, origin: tuple[float, ...] = NU_ORIGIN, **changes: Any
) -> GeneratedSample:
    """Six views with distinct rigid lidar->camera transforms, nuScenes train ids 0..16 and 255."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 17, NU_GRID, generator=g, dtype=torch.uint8)
    labels[torch.rand(NU_GRID, generator=g) < 0.5] = 0
    labels[torch.rand(NU_GRID, generator=g) < 0.1] = 255
    rng = np.random.default_rng(seed)
    transforms = []
    for _ in CAMERA_NAMES:
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        t = np.eye(4)
        t[:3, :3], t[:3, 3] = q, rng.normal(size=3)
        transforms.append(t)
    k = torch.tensor([[30.0, 0.0, WIDTH / 2], [0.0, 30.0, HEIGHT / 2], [0.0, 0.0, 1.0]]).repeat(len(CAMERA_NAMES), 1, 1)
    k[:, :2, :2] *= torch.linspace(1.0, 1.5, len(CAMERA_NAMES))[:, None, None]  # a different focal length per view
    fields = {
        "labels": labels,
        "intrinsics": k,
        "voxel_to_camera": torch.tensor(np.stack(transforms), dtype=torch.float32),
        "voxel_origin": torch.tensor(origin),
    }
    return make_sample(frame_id, views=len(CAMERA_NAMES), seed=seed, **(fields | changes))


def test_nuscenes_occupancy_round_trip(tmp_path: Path) -> None:
    w, trainer = ready(tmp_path, export=["nuscenes_occupancy"])
    samples = [make_surround_sample(f"prompt{i:05d}_sample00", seed=i) for i in range(3)]
    write(w, trainer, samples)
    root = tmp_path / "predictions" / "nuscenes_occupancy"
    assert not (root / "nuscenes" / "nuscenes_occ_infos_val.pkl").exists()  # gathered when predict ends
    w.on_predict_end(trainer, None)  # type: ignore[arg-type]
    dataset = NuScenesOccupancyDataset(root / "nuscenes", split="val", grid_size=NU_GRID, crop_box=None)
    items = {dataset[i]["frame_id"]: dataset[i] for i in range(len(dataset))}
    assert len(items) == 3
    for sample in samples:
        meta = json.loads((tmp_path / "predictions" / sample.frame_id / "meta.json").read_text())
        export = meta["exports"]["nuscenes_occupancy"]
        assert export["token"] == NuScenesOccupancyExporter.token(sample.frame_id) and export["split"] == "val"
        assert len(export["files"]) == 16 and all((tmp_path / "predictions" / f).is_file() for f in export["files"])
        item = items[export["token"]]
        np.testing.assert_array_equal(item["occupancy"].numpy(), sample.labels)
        np.testing.assert_allclose(item["image"], sample.images, atol=0.5 / 255 + 1e-6)
        np.testing.assert_allclose(item["intrinsics"], sample.intrinsics, rtol=1e-6)
        np.testing.assert_allclose(item["voxel_to_camera"], sample.voxel_to_camera, rtol=1e-5, atol=1e-5)
        assert float(item["voxel_size"]) == pytest.approx(1.6)
    # Re-writing a frame keeps one info per frame_id.
    again, _ = ready(tmp_path, export=["nuscenes_occupancy"], overwrite=True)
    write(again, trainer, samples[:1])
    again.finalize()
    assert len(NuScenesOccupancyDataset(root / "nuscenes", split="val", grid_size=NU_GRID, crop_box=None)) == 3
    assert leftovers(tmp_path) == []


def test_nuscenes_occupancy_other_origin(tmp_path: Path) -> None:
    w, trainer = ready(tmp_path, export=["nuscenes_occupancy"])
    shifted_origin = (-49.6, -51.2, -3.4)
    sample = make_surround_sample("shifted", origin=shifted_origin)
    write(w, trainer, [sample])
    w.finalize()
    root = tmp_path / "predictions" / "nuscenes_occupancy" / "nuscenes"
    item = NuScenesOccupancyDataset(root, split="val", grid_size=NU_GRID, crop_box=None)[0]
    index = np.stack(np.meshgrid(*[np.arange(n) for n in NU_GRID], indexing="ij"), -1).reshape(-1, 3) + 0.5
    ones = np.ones((len(index), 1))
    for view in range(len(CAMERA_NAMES)):
        ours = sample.voxel_to_camera[view].astype(np.float64)
        theirs = item["voxel_to_camera"][view].double().numpy()
        sample_points = np.c_[index * 1.6 + np.array(shifted_origin), ones]
        reader_points = np.c_[index * 1.6 + np.array(NU_ORIGIN), ones]
        np.testing.assert_allclose(reader_points @ theirs.T, sample_points @ ours.T, atol=1e-3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"views": 1}, "6 cameras"),
        ({"labels": torch.zeros(64, 64, 8, dtype=torch.uint8)}, "cubic voxels"),
        ({"voxel_size": 0.2}, "cubic voxels"),
        ({"labels": torch.full(NU_GRID, 17, dtype=torch.uint8)}, "not a nuScenes-Occupancy train id"),
    ],
)
def test_nuscenes_occupancy_rejects_unfit_samples(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    w, trainer = ready(tmp_path, export=["nuscenes_occupancy"])
    views = change.pop("views", len(CAMERA_NAMES))
    sample = make_surround_sample("unfit", **change)
    if views != len(CAMERA_NAMES):
        sample = make_sample("unfit", labels=sample.labels)
    with pytest.raises(ValueError, match=f"'unfit'.*{message}"):
        write(w, trainer, [sample])
    assert not (tmp_path / "predictions" / "unfit").exists()


# ---------------------------------------------------------------------------------------------------------------
# Inside a real Trainer
# ---------------------------------------------------------------------------------------------------------------


class TinyGenerator(pl.LightningModule):
    """predict_step of the contract: generates every row of the batch it gets (the writer removed finished ones)."""

    def __init__(self, surround: bool = False) -> None:
        super().__init__()
        self.generated: list[str] = []
        self.surround = surround

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[GeneratedSample]:
        samples = []
        for frame_id, index in zip(batch["frame_id"], batch["index"].tolist(), strict=True):
            self.generated.append(frame_id)
            samples.append(
                make_surround_sample(frame_id, index) if self.surround else make_sample(frame_id, seed=index)
            )
        return samples


def prompt_loader(count: int, batch_size: int = 2) -> DataLoader[Any]:
    """Collated batches ``{"frame_id": [...], "index": (B,) tensor}``, as a predict dataset gives."""
    rows = [{"frame_id": f"prompt{i:05d}_sample00", "index": i} for i in range(count)]
    return DataLoader(rows, batch_size=batch_size)  # type: ignore[arg-type]


def test_inside_lightning_trainer(tmp_path: Path) -> None:
    def run() -> tuple[TinyGenerator, GenerationWriter]:
        w = GenerationWriter(progress=True)
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
            callbacks=[w], enable_model_summary=False,
        )  # fmt: skip
        model = TinyGenerator()
        trainer.predict(model, prompt_loader(3), return_predictions=False)
        return model, w

    model, w = run()
    assert model.generated == [f"prompt{i:05d}_sample00" for i in range(3)] and (w.written, w.skipped) == (3, 0)
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == model.generated
    model, w = run()
    assert model.generated == [] and (w.written, w.skipped) == (0, 3)
    (tmp_path / "predictions" / "prompt00001_sample00" / "meta.json").unlink()  # one interrupted sample
    model, w = run()
    assert model.generated == ["prompt00001_sample00"] and (w.written, w.skipped) == (1, 2)


def test_resume_filters_the_batch_in_place(tmp_path: Path) -> None:
    """Before predict_step the writer drops completed rows from every list and batch tensor; other values stay."""
    w, trainer = ready(tmp_path)
    write(w, trainer, [make_sample("a"), make_sample("c")])
    batch = {"frame_id": ["a", "b", "c"], "seed": torch.tensor([1, 2, 3]), "image_size": torch.tensor([[4, 5]] * 3)}
    batch |= {"prompt": ["pa", "pb", "pc"], "note": "kept"}
    w.on_predict_batch_start(trainer, None, batch, 0)  # type: ignore[arg-type]
    assert batch["frame_id"] == ["b"] and batch["prompt"] == ["pb"] and batch["note"] == "kept"
    assert batch["seed"].tolist() == [2] and batch["image_size"].tolist() == [[4, 5]] and w.skipped == 2
    everything = {"frame_id": ["a", "c"], "seed": torch.tensor([1, 3])}
    w.on_predict_batch_start(trainer, None, everything, 1)  # type: ignore[arg-type]
    assert everything["frame_id"] == [] and everything["seed"].shape == (0,)
    tensor = torch.arange(3)
    w.on_predict_batch_start(trainer, None, tensor, 2)  # type: ignore[arg-type]  # not a dict: left alone
    again, _ = ready(tmp_path, overwrite=True)
    untouched = {"frame_id": ["a", "b"]}
    again.on_predict_batch_start(trainer, None, untouched, 0)  # type: ignore[arg-type]
    assert untouched == {"frame_id": ["a", "b"]} and again.skipped == 0


def test_nuscenes_info_file_is_built_when_predict_ends(tmp_path: Path) -> None:
    w = GenerationWriter(progress=False, export=["nuscenes_occupancy"])
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
        callbacks=[w], enable_model_summary=False, enable_progress_bar=False,
    )  # fmt: skip
    trainer.predict(TinyGenerator(surround=True), prompt_loader(3), return_predictions=False)
    root = tmp_path / "predictions" / "nuscenes_occupancy" / "nuscenes"
    dataset = NuScenesOccupancyDataset(root, split="val", grid_size=NU_GRID, crop_box=None)
    tokens = {NuScenesOccupancyExporter.token(f"prompt{i:05d}_sample00") for i in range(3)}
    assert {info["token"] for info in dataset.infos} == tokens


def test_class_names_taken_from_the_module(tmp_path: Path) -> None:
    w = GenerationWriter(progress=False)
    module = SimpleNamespace(predict_step=lambda batch: None, class_names=["empty", "car", "road"])
    w.setup(fake_trainer(tmp_path), module, "predict")  # type: ignore[arg-type]
    assert w.class_names == ["empty", "car", "road"] and w.colors is not None and len(w.colors) == 3
    given = GenerationWriter(progress=False, class_names=["a", "b"])
    given.setup(fake_trainer(tmp_path), module, "predict")  # type: ignore[arg-type]
    assert given.class_names == ["a", "b"]


# ---------------------------------------------------------------------------------------------------------------
# Export options: split, sequences, image size
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"export": ["semantic_kitti"], "export_split": "test"}, "export_split must be one of"),
        ({"export": ["semantic_kitti"], "export_split": "train", "semantic_kitti_sequences": ["08"]}, "08 belongs"),
        ({"export": ["semantic_kitti"], "export_split": "val", "semantic_kitti_sequences": ["00"]}, "train split"),
        ({"export": ["semantic_kitti"], "semantic_kitti_sequences": ["15"]}, "test split"),
        ({"export": ["semantic_kitti"], "semantic_kitti_sequences": ["x1"]}, "not a sequence number"),
        ({"export": ["semantic_kitti"], "semantic_kitti_sequences": ["22", "22"]}, "listed twice"),
        ({"export": ["semantic_kitti"], "semantic_kitti_sequences": []}, "at least one sequence"),
        ({"export": ["semantic_kitti"], "semantic_kitti_image_size": [1220]}, "semantic_kitti_image_size must be"),
        ({"export": ["semantic_kitti"], "semantic_kitti_image_size": [0, 370]}, "semantic_kitti_image_size must be"),
        ({"semantic_kitti_image_size": [1220, 370]}, "semantic_kitti_image_size is set but export"),
        ({"export": ["semantic_kitti"], "nuscenes_occupancy_image_size": [1600, 900]}, "nuscenes_occupancy_image_size"),
    ],
)
def test_export_option_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GenerationWriter(**kwargs)


def test_semantic_kitti_train_split_and_sequences(tmp_path: Path) -> None:
    """Train exports fill the chosen sequences (one per camera), our reader's train split reads them, and a third
    camera with only two sequences given is refused naming the option."""
    w, trainer = ready(tmp_path, export=["semantic_kitti"], export_split="train", semantic_kitti_sequences=["3", "22"])
    write(w, trainer, [make_sample("a"), make_sample("b", focal_scale=1.5)])
    root = tmp_path / "predictions" / "semantic_kitti"
    metas = [json.loads((tmp_path / "predictions" / f / "meta.json").read_text()) for f in "ab"]
    assert [m["exports"]["semantic_kitti"]["sequence"] for m in metas] == ["03", "22"]
    assert all(m["exports"]["semantic_kitti"]["split"] == "train" for m in metas)
    assert len(read_back(root, split="train")) == 1  # 00-07, 09, 10: 03 has the frame, the rest placeholders
    assert len(read_back(root, split="train", sequences=["22"])) == 1
    assert not (root / "dataset" / "sequences" / "08").exists()
    with pytest.raises(ValueError, match=r"sequences=\['03', '22'\].*list more sequences"):
        write(w, trainer, [make_sample("c", focal_scale=2.0)])


def test_changing_export_options_re_exports(tmp_path: Path) -> None:
    """A sample exported to val is not complete for a train writer: re-written, it leaves sequence 08."""
    w, trainer = ready(tmp_path, export=["semantic_kitti"])
    write(w, trainer, [make_sample("a")])
    root = tmp_path / "predictions" / "semantic_kitti"
    assert len(read_back(root, split="val")) == 1
    train, _ = ready(tmp_path, export=["semantic_kitti"], export_split="train")
    assert not train.is_complete("a") and w.is_complete("a")
    write(train, trainer, [make_sample("a")])
    assert train.written == 1 and train.is_complete("a")
    assert len(read_back(root, split="val")) == 0 and len(read_back(root, split="train")) == 1
    resized, _ = ready(tmp_path, export=["semantic_kitti"], export_split="train", semantic_kitti_image_size=[80, 40])
    assert not resized.is_complete("a")


def test_semantic_kitti_image_size_round_trip(tmp_path: Path) -> None:
    """Images resampled to image_size read back through our reader with the adjusted intrinsics."""
    w, trainer = ready(tmp_path, export=["semantic_kitti"], semantic_kitti_image_size=[80, 40])
    sample = make_sample("big")
    write(w, trainer, [sample])
    export = json.loads((tmp_path / "predictions" / "big" / "meta.json").read_text())["exports"]["semantic_kitti"]
    assert export["crop_size"] == [80, 40] and export["image_size"] == [80, 40]
    root = tmp_path / "predictions" / "semantic_kitti"
    item = next(iter(SemanticKittiDataset(root, split="val", grid_size=GRID, crop_size=(80, 40))))
    k = sample.intrinsics[0].astype(np.float64)  # 40 x 24 -> scale 2 to 80 x 48 -> rows 4..44
    expected = k.copy()
    expected[:2, :2] *= 2
    expected[0, 2], expected[1, 2] = (k[0, 2] + 0.5) * 2 - 0.5, (k[1, 2] + 0.5) * 2 - 0.5 - 4
    np.testing.assert_allclose(item["intrinsics"][0], expected, rtol=1e-6)


def test_nuscenes_split_move_and_placeholders(tmp_path: Path) -> None:
    """Every peer key is in the info (placeholders for LiDAR-only data); moving a frame to train empties val."""
    from occscene_pl.native_export import NUSCENES_INFO_KEYS, load_info_pickle

    w, trainer = ready(tmp_path, export=["nuscenes_occupancy"])
    write(w, trainer, [make_surround_sample("a")])
    w.finalize()
    root = tmp_path / "predictions" / "nuscenes_occupancy" / "nuscenes"
    info = load_info_pickle(root / "nuscenes_occ_infos_val.pkl")["infos"][0]
    assert set(NUSCENES_INFO_KEYS) <= set(info) and info["sweeps"] == [] and info["can_bus"].shape == (18,)
    assert info["lidar2ego_rotation"] == [1.0, 0.0, 0.0, 0.0] and info["gt_boxes"].shape == (0, 7)
    train, _ = ready(tmp_path, export=["nuscenes_occupancy"], export_split="train")
    assert not train.is_complete("a")
    write(train, trainer, [make_surround_sample("a")])
    assert train._exporter("nuscenes_occupancy").finalize() == root / "nuscenes_occ_infos_train.pkl"
    assert not (root / "nuscenes_occ_infos_val.pkl").exists()
    assert len(NuScenesOccupancyDataset(root, split="train", grid_size=NU_GRID, crop_box=None)) == 1


def test_quaternion_and_restricted_unpickler(tmp_path: Path) -> None:
    import pickle

    from occscene_pl.native_export import load_info_pickle, quaternion_wxyz
    from tests.peers.openoccupancy import quaternion_rotation_matrix

    rng = np.random.default_rng(0)
    for _ in range(20):
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))
        q[:, 0] *= np.sign(np.linalg.det(q))
        np.testing.assert_allclose(quaternion_rotation_matrix(*quaternion_wxyz(q)), q, atol=1e-12)
    np.testing.assert_allclose(quaternion_wxyz(np.diag([1.0, -1.0, -1.0])), [0.0, 1.0, 0.0, 0.0], atol=1e-12)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(SimpleNamespace(a=1)))
    with pytest.raises(ValueError, match=r"evil\.pkl.*refusing to unpickle types\.SimpleNamespace"):
        load_info_pickle(evil)
