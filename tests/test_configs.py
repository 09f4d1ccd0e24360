"""Every shipped config parses and resolves (``--print_config``) without instantiating anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from occscene_pl.cli import main

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_all_four_configs_ship() -> None:
    assert {p.name for p in CONFIGS} >= {"kitti.yaml", "nyuv2.yaml", "nuscenes_occupancy.yaml", "demo.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_print_config(config: Path, subcommand: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["data"]["class_path"].startswith("occscene_pl.data.")
    assert not Path(resolved["data"]["init_args"]["root"]).is_absolute()  # relative roots only
    assert "model" in resolved and "trainer" in resolved


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_header_names_dataset_grid_and_classes(config: Path) -> None:
    header = "\n".join(line for line in config.read_text().splitlines() if line.startswith("#")).lower()
    assert "grid" in header and "classes" in header


def test_root_override_and_composition(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("data:\n  init_args:\n    batch_size: 3\n")
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                "configs/kitti.yaml",
                "--config",
                str(overlay),
                "--data.root",
                "elsewhere",
                "--print_config",
            ]
        )
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["data"]["init_args"]["batch_size"] == 3
    assert resolved["data"]["init_args"]["root"] == "elsewhere"


def test_unknown_argument_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/kitti.yaml", "--data.no_such_option", "1", "--print_config"])
    assert exit_info.value.code != 0
    assert "no_such_option" in capsys.readouterr().err
