"""End-to-end CLI runs: every shipped config composed with the tiny overlay, on fake data in the real formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from occscene_pl.cli import main

REPO = Path(__file__).parents[1]
TINY = str(REPO / "tests" / "configs" / "tiny.yaml")


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
def dataset_args(request: pytest.FixtureRequest) -> tuple[str, list[str]]:
    name = request.param
    if name == "kitti":
        root = request.getfixturevalue("kitti_root")
        return "kitti.yaml", [
            f"--data.root={root}",
            "--data.grid_size=[32, 32, 4]",
            "--data.crop_size=[96, 40]",
            "--data.image_size=[32, 96]",
        ]
    if name == "nyuv2":
        root = request.getfixturevalue("nyuv2_root")
        return "nyuv2.yaml", [f"--data.root={root}", "--data.grid_size=[8, 8, 4]", "--data.image_size=[48, 64]"]
    root, occupancy_root = request.getfixturevalue("nuscenes_roots")
    return "nuscenes_occupancy.yaml", [
        f"--data.root={root}",
        f"--data.occupancy_root={occupancy_root}",
        "--data.grid_size=[64, 64, 5]",
        "--data.crop_box=[0, 0, 160, 90]",
        "--data.image_size=[32, 48]",
    ]


@pytest.mark.parametrize("dataset_args", ["kitti", "nyuv2", "nuscenes"], indirect=True)
def test_fit_test_predict(dataset_args: tuple[str, list[str]], tmp_path: Path) -> None:
    config, args = dataset_args
    _run("fit", config, tmp_path, *args)
    checkpoints = sorted(tmp_path.rglob("last.ckpt"))
    assert checkpoints, f"fit wrote no last.ckpt under {tmp_path}"
    assert sorted(tmp_path.rglob("config.yaml")), "fit did not save its resolved config"
    _run("test", config, tmp_path, *args, f"--ckpt_path={checkpoints[0]}")
    _run("validate", config, tmp_path, *args, f"--ckpt_path={checkpoints[0]}")
    _run("predict", config, tmp_path, *args, f"--ckpt_path={checkpoints[0]}")


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
