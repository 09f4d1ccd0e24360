"""Every shipped config parses and resolves (``--print_config``); configs compose (``__base__``, overlays) field by
field, the network options are typed (``--help``, one-field overrides, misspelt fields fail), and every config and
overlay instantiates its model at tiny size."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from occscene_pl.cli import OccSceneCLI, main
from occscene_pl.config_files import PARSER_MODE, read_config
from occscene_pl.data.base import OccupancyDataModule
from occscene_pl.module import OccSceneModule

REPO_ROOT = Path(__file__).parents[1]
CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
RUNNABLE = [p for p in CONFIGS if p.name != "base.yaml"]  # base.yaml is only extended (no data section)


def test_all_four_configs_ship() -> None:
    assert {p.name for p in CONFIGS} >= {"kitti.yaml", "nyuv2.yaml", "nuscenes_occupancy.yaml", "demo.yaml"}


@pytest.mark.parametrize("config", RUNNABLE, ids=lambda p: p.name)
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


# ------------------------------------------------------------------------------- composition and typed networks
OVERLAYS = sorted((REPO_ROOT / "configs" / "overlays").glob("*.yaml"))
TINY_OVERLAY = str(REPO_ROOT / "tests" / "configs" / "tiny.yaml")


def _resolved(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return cast(dict[str, Any], yaml.safe_load(capsys.readouterr().out))


def _tiny_cli(config: Path, overlays: Sequence[Path] = (), flags: Sequence[str] = ()) -> OccSceneCLI:
    """``OccSceneCLI`` over ``config``, ``overlays``, the tiny test overlay and ``flags``: built, not run."""
    return OccSceneCLI(
        OccSceneModule,
        OccupancyDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        parser_kwargs={"parser_mode": PARSER_MODE},
        run=False,
        args=[
            "--config",
            str(config),
            *(arg for overlay in overlays for arg in ("--config", str(overlay))),
            "--config",
            TINY_OVERLAY,
            "--trainer.logger=false",
            *flags,
        ],
    )


def test_debug_overlay_ships() -> None:
    assert "debug.yaml" in {p.name for p in OVERLAYS}


@pytest.mark.parametrize("overlay", [None, *OVERLAYS], ids=lambda p: "plain" if p is None else p.name)
@pytest.mark.parametrize("config", RUNNABLE, ids=lambda p: p.name)
def test_config_and_overlay_instantiate_the_model_at_tiny_size(config: Path, overlay: Path | None) -> None:
    """Each config (alone and with each overlay), made tiny by the test overlay, builds its DataModule and model."""
    cli = _tiny_cli(config, [overlay] if overlay else [])
    model = cli.model
    assert isinstance(model, OccSceneModule)
    assert model.num_classes == cli.datamodule.num_classes
    assert model.aligner is not None and model.aligner.embed_dim == 4  # the tiny overlay's value, merged


def test_base_is_merged_field_by_field(capsys: pytest.CaptureFixture[str]) -> None:
    kitti = _resolved(capsys, "--config", "configs/kitti.yaml")
    nyuv2 = _resolved(capsys, "--config", "configs/nyuv2.yaml")
    base = read_config(REPO_ROOT / "configs" / "base.yaml")
    for resolved in (kitti, nyuv2):
        # From base.yaml, unless the dataset file overrides it.
        assert resolved["model"]["generator"]["pretrained"] == base["model"]["generator"]["pretrained"]
        assert resolved["model"]["aligner"]["depth_bins"] == base["model"]["aligner"]["depth_bins"] == 32
        assert resolved["trainer"]["precision"] == "bf16-mixed"
    assert kitti["model"]["aligner"]["depth_range"] == [2.0, 52.0]
    assert nyuv2["model"]["aligner"]["depth_range"] == [0.3, 8.0]
    assert (kitti["model"]["perceiver"]["feature_dim"], nyuv2["model"]["perceiver"]["feature_dim"]) == (64, 200)


def test_tiny_overlay_merges_into_the_typed_groups(capsys: pytest.CaptureFixture[str]) -> None:
    resolved = _resolved(capsys, "--config", "configs/kitti.yaml", "--config", TINY_OVERLAY)
    aligner = resolved["model"]["aligner"]
    assert aligner["embed_dim"] == 4 and aligner["depth_bins"] == 4  # the overlay's fields
    assert resolved["model"]["perceiver"]["lift_scales"] == [1, 2, 4, 8]  # a default nobody set


def test_help_lists_the_network_fields_with_their_docs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/kitti.yaml", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--model.aligner.depth_bins DEPTH_BINS Depth samples per latent pixel; divisible by" in text
    for field in ("generator.sampler", "text_encoder.padding", "perceiver.feature_dim", "generator.unet"):
        assert f"--model.{field}" in text


def test_one_field_override_changes_only_that_field(capsys: pytest.CaptureFixture[str]) -> None:
    plain = _resolved(capsys, "--config", "configs/kitti.yaml")
    changed = _resolved(capsys, "--config", "configs/kitti.yaml", "--model.aligner.depth_bins", "16")
    assert changed["model"]["aligner"].pop("depth_bins") == 16
    assert plain["model"]["aligner"].pop("depth_bins") == 32
    assert changed == plain


@pytest.mark.parametrize("how", ["flag", "overlay"])
def test_misspelt_network_field_fails_naming_it(how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if how == "flag":
        extra = ["--model.aligner.depht_bins", "16"]
    else:
        overlay = tmp_path / "typo.yaml"
        overlay.write_text("model:\n  aligner:\n    depht_bins: 16\n")
        extra = ["--config", str(overlay)]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/kitti.yaml", *extra, "--print_config"])
    assert exit_info.value.code != 0
    assert "depht_bins" in capsys.readouterr().err


def test_invalid_network_value_fails_naming_the_option() -> None:
    with pytest.raises(ValueError, match=r"^model\.aligner\.depth_bins must be divisible by patch_size\[0\], got 3$"):
        _tiny_cli(REPO_ROOT / "configs" / "kitti.yaml", flags=["--model.aligner.depth_bins=3"])


def test_base_key_chain_list_interpolation_and_errors(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("a: 1\nnested: {x: 1, y: 2}\nlist: [1, 2]\nref: ${a}\n")
    (tmp_path / "sub" / "mid.yaml").write_text("__base__: ../root.yaml\nnested: {y: 3}\n")
    (tmp_path / "other.yaml").write_text("b: 2\n")
    (tmp_path / "top.yaml").write_text("__base__: [sub/mid.yaml, other.yaml]\na: 5\nlist: [9]\n")
    assert read_config(tmp_path / "top.yaml") == {
        "a": 5,
        "nested": {"x": 1, "y": 3},
        "list": [9],
        "ref": 5,  # interpolation resolved after the merge
        "b": 2,
    }
    (tmp_path / "loop.yaml").write_text("__base__: loop.yaml\n")
    with pytest.raises(ValueError, match="includes itself"):
        read_config(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("__base__: nowhere.yaml\n")
    with pytest.raises(ValueError, match=r"__base__: config file .*nowhere\.yaml does not exist"):
        read_config(tmp_path / "missing.yaml")
