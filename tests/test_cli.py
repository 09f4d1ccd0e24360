"""End-to-end CLI runs: every shipped config composed with the tiny overlay, on fake data in the real formats."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from occscene_pl.cli import main
from tests.conftest import REPO, TINY, csv_logger


def _logged(save_dir: Path) -> dict[str, list[float]]:
    """Every metric a CSVLogger wrote under ``save_dir``: name -> its logged values."""
    values: dict[str, list[float]] = {}
    for path in save_dir.rglob("metrics.csv"):
        with path.open(newline="") as file:
            for row in csv.DictReader(file):
                for key, value in row.items():
                    if value not in ("", None):
                        values.setdefault(key, []).append(float(value))
    return values


def _check_predictions(folder: Path, grid_size: tuple[int, int, int]) -> None:
    """Layout-mode predict output: per sample the image(s), occupancy.npz, occupancy.png and meta.json."""
    samples = [d for d in folder.iterdir() if d.is_dir()]
    assert len(samples) == 1, f"expected one sample folder (limit_predict_batches=1) in {folder}"
    sample = samples[0]
    meta = json.loads((sample / "meta.json").read_text())
    views = meta["num_views"]
    images = ["image.png"] if views == 1 else [f"image_{v}.png" for v in range(views)]
    assert sorted(meta["files"]) == sorted([*images, "occupancy.npz", "occupancy.png"])
    for name in meta["files"]:
        assert (sample / name).is_file(), f"{sample.name} lacks {name}"
    with np.load(sample / "occupancy.npz") as arrays:
        assert arrays["labels"].shape == grid_size and arrays["condition"].shape == grid_size
        assert arrays["intrinsics"].shape == (views, 3, 3)
    assert meta["frame_id"] == sample.name and meta["mode"] == "layout" and meta["prompt"]
    assert 0.0 <= meta["meta"]["cotrained_consistency_miou"] <= 1.0


def _run(subcommand: str, config: str, tmp_path: Path, *extra: str) -> None:
    main(
        [
            subcommand,
            "--config",
            str(REPO / "configs" / config),
            "--config",
            TINY,
            f"--trainer.default_root_dir={tmp_path}",
            *extra,
        ]
    )


@pytest.fixture
def dataset_args(request: pytest.FixtureRequest) -> tuple[str, list[str], tuple[int, int, int]]:
    name = request.param
    if name == "kitti":
        root = request.getfixturevalue("kitti_root")
        args = [
            f"--data.root={root}",
            "--data.grid_size=[32, 32, 4]",
            "--data.crop_size=[96, 40]",
            "--data.image_size=[32, 96]",
        ]
        return "kitti.yaml", args, (32, 32, 4)
    if name == "nyuv2":
        root = request.getfixturevalue("nyuv2_root")
        args = [f"--data.root={root}", "--data.grid_size=[8, 8, 4]", "--data.image_size=[48, 64]"]
        return "nyuv2.yaml", args, (8, 8, 4)
    root, occupancy_root = request.getfixturevalue("nuscenes_roots")
    return (
        "nuscenes_occupancy.yaml",
        [
            f"--data.root={root}",
            f"--data.occupancy_root={occupancy_root}",
            "--data.grid_size=[64, 64, 5]",
            "--data.crop_box=[0, 0, 160, 90]",
            "--data.image_size=[32, 48]",
        ],
        (64, 64, 5),
    )


@pytest.mark.parametrize("dataset_args", ["kitti", "nyuv2", "nuscenes"], indirect=True)
def test_fit_test_predict(dataset_args: tuple[str, list[str], tuple[int, int, int]], tmp_path: Path) -> None:
    """fit logs the perceiver's val/miou and the generation's val/cotrained_consistency_miou; test logs both too;
    validate runs; predict over the split writes every output file of a layout-controlled sample."""
    config, args, grid_size = dataset_args
    _run("fit", config, tmp_path, *args, csv_logger(tmp_path / "fit_logs"))
    checkpoints = sorted(tmp_path.rglob("last.ckpt"))
    assert checkpoints, f"fit wrote no last.ckpt under {tmp_path}"
    assert sorted(tmp_path.rglob("config.yaml")), "fit did not save its resolved config"
    logged = _logged(tmp_path / "fit_logs")
    for key in ("val/miou", "val/iou", "val/cotrained_consistency_miou", "train/loss"):
        assert key in logged, f"fit did not log {key}; logged: {sorted(logged)}"
        assert all(math.isfinite(v) for v in logged[key])
    assert all(0.0 <= v <= 1.0 for v in logged["val/miou"] + logged["val/cotrained_consistency_miou"])
    assert sorted((tmp_path / "fit_logs").rglob("samples/val_step*.png")), "no validation picture was logged"
    _run("test", config, tmp_path, *args, f"--ckpt_path={checkpoints[0]}", csv_logger(tmp_path / "test_logs"))
    logged = _logged(tmp_path / "test_logs")
    assert {"test/miou", "test/cotrained_consistency_miou"} <= set(logged), sorted(logged)
    _run("validate", config, tmp_path, *args, f"--ckpt_path={checkpoints[0]}")
    _run("predict", config, tmp_path, *args, f"--ckpt_path={checkpoints[0]}")
    _check_predictions(tmp_path / "predictions", grid_size)


def test_demo_config_generates_and_trains(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    _run(
        "fit",
        "demo.yaml",
        tmp_path,
        f"--data.root={root}",
        "--data.num_train=4",
        "--data.num_val=2",
        "--data.num_workers=0",
        "--data.image_size=[32, 96]",
    )
    assert (root / "dataset" / "sequences" / "00" / "calib.txt").is_file()
    assert sorted(tmp_path.rglob("last.ckpt"))


def test_missing_root_is_one_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _run("fit", "kitti.yaml", tmp_path, f"--data.root={missing}")
