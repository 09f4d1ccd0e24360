"""Self-contained checkpoints: ``validate``/``test``/``predict --ckpt_path`` without the files the fit started from.

A joint fit through the real CLI starts from a local diffusers folder (tiny UNet + VAE, non-default noise schedule),
an open_clip weights file, a timm backbone weights file and an ``init_from`` checkpoint, all under one folder. That
folder is then moved away: predict and test with the new checkpoint must still run and give exactly the outputs of
an older-style checkpoint (no stored architecture) evaluated with the files in place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image

from occscene_pl.checkpoint_architecture import (
    ARCHITECTURE_KEY,
    ArchitectureError,
    generator_architecture,
    read_architecture,
    self_contained_model_config,
)
from occscene_pl.models import OccupancyPerceiver, SceneGenerator
from occscene_pl.models.text_encoder import register_tiny_config
from tests.conftest import csv_logger
from tests.test_module_cli import GRID
from tests.test_module_cli import run as run_tiny_nyuv2

pytestmark = [
    # Two fit steps in one epoch; the checkpoint callback monitors val/miou, which the tiny fit logs once.
    pytest.mark.filterwarnings("ignore:`ModelCheckpoint\\(monitor='val/miou'\\)` could not find the monitored key"),
]

NUM_CLASSES = 12  # NYUv2: empty + 11
UNET = {
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 4,
}
VAE = {
    "block_out_channels": [8, 8],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "norm_num_groups": 4,
    "latent_channels": 4,
    "layers_per_block": 1,
}
# Not the DDPMScheduler defaults: the rebuilt schedule must be the folder's, not a default one.
SCHEDULER = {"prediction_type": "v_prediction", "beta_schedule": "scaled_linear", "beta_end": 0.012}
PERCEIVER = {
    "backbone": "mobilenetv3_small_050",
    "feature_dim": 4,
    "decoder_dim": 16,
    "project_scale": 1,
    "context_prior": False,
}


def write_fit_files(folder: Path) -> dict[str, Path]:
    """The fit-time files: diffusers folder, open_clip weights, timm backbone weights, stage-1 ``init_from``."""
    torch.manual_seed(1)
    files = {
        "diffusers": folder / "diffusers",
        "open_clip": folder / "open_clip.pt",
        "timm": folder / "backbone.pth",
        "init_from": folder / "perception.ckpt",
    }
    SceneGenerator(unet=UNET, vae=VAE, scheduler=SCHEDULER).save_pretrained(files["diffusers"])
    torch.save(open_clip.create_model(register_tiny_config(), pretrained=None).state_dict(), files["open_clip"])
    torch.save(timm.create_model(PERCEIVER["backbone"], pretrained=False).state_dict(), files["timm"])
    stage1 = OccupancyPerceiver(NUM_CLASSES, GRID, **PERCEIVER)
    torch.save({"state_dict": {f"perceiver.{k}": v for k, v in stage1.state_dict().items()}}, files["init_from"])
    return files


def model_args(files: dict[str, Path]) -> list[str]:
    """Model options naming every fit-time file (dict options replace the tiny overlay's whole group)."""
    # Typed groups merge field by field: the tiny overlay's `unet` must be cleared for `pretrained` to be used.
    generator = {"pretrained": str(files["diffusers"]), "unet": None, "sampler": "ddim"}
    text_encoder = {"model_name": "occscene-tiny-clip", "pretrained": str(files["open_clip"])}
    perceiver = {**PERCEIVER, "pretrained": str(files["timm"])}
    return [
        f"--model.generator={json.dumps(generator)}",
        f"--model.text_encoder={json.dumps(text_encoder)}",
        f"--model.perceiver={json.dumps(perceiver)}",
        f"--model.init_from={files['init_from']}",
    ]


def run(subcommand: str, nyuv2_root: Path, root: Path, files: dict[str, Path], *extra: str) -> None:
    """``occscene-pl <subcommand>`` on the NYUv2 config + tiny overlay + the fit-time files, writing under ``root``."""
    run_tiny_nyuv2(subcommand, nyuv2_root, root, *model_args(files), *extra)


def logged(save_dir: Path) -> dict[str, str]:
    """The one row of metrics a test run's CSVLogger wrote under ``save_dir``."""
    (path,) = save_dir.rglob("metrics.csv")
    header, row = path.read_text().splitlines()
    return {k: v for k, v in zip(header.split(","), row.split(","), strict=True) if v}


def predictions(root: Path) -> dict[str, np.ndarray]:
    """Every array of the predict run under ``root``: the images and everything in occupancy.npz."""
    (sample,) = [d for d in (root / "predictions").iterdir() if d.is_dir()]
    arrays = {"image": np.asarray(Image.open(sample / "image.png"))}
    with np.load(sample / "occupancy.npz") as npz:
        arrays.update({k: npz[k] for k in npz.files})
    return arrays


@pytest.fixture(scope="module")
def fitted(nyuv2_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 2-step joint fit from the fit-time files: its ``last.ckpt``, an old-style copy without the stored
    architecture, and the outputs of predict and test with the old-style copy while the files are in place."""
    base = tmp_path_factory.mktemp("self_contained")
    files = write_fit_files(base / "pretrained")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["occscene-pl"])
        torch.manual_seed(0)
        run("fit", nyuv2_root, base / "fit", files)
        (checkpoint,) = (base / "fit").rglob("last.ckpt")
        old_style = base / "old_style.ckpt"
        content = torch.load(checkpoint, map_location="cpu", weights_only=True)
        content.pop(ARCHITECTURE_KEY)
        torch.save(content, old_style)
        # Older checkpoints keep working while the files exist: these are the reference outputs.
        run("predict", nyuv2_root, base / "predict_old", files, f"--ckpt_path={old_style}")
        run("test", nyuv2_root, base / "test_old", files, f"--ckpt_path={old_style}", csv_logger(base / "test_old"))
    return {
        "base": base,
        "files": files,
        "checkpoint": checkpoint,
        "old_style": old_style,
        "predictions": predictions(base / "predict_old"),
        "test": logged(base / "test_old"),
    }


def test_checkpoint_stores_the_generator_architecture(fitted: dict[str, Any]) -> None:
    """The checkpoint carries the folder's UNet, VAE and schedule as plain values that ``weights_only`` reads."""
    stored = read_architecture(fitted["checkpoint"])
    assert stored is not None and set(stored["generator"]) == {"unet", "vae", "scheduler"}
    folder = SceneGenerator(pretrained=str(fitted["files"]["diffusers"]))
    assert stored["generator"] == generator_architecture(folder)
    arch = stored["generator"]
    assert arch["unet"]["block_out_channels"] == UNET["block_out_channels"] and arch["unet"]["in_channels"] == 4
    assert arch["vae"]["latent_channels"] == 4
    assert {k: arch["scheduler"][k] for k in SCHEDULER} == SCHEDULER
    assert not any(key.startswith("_") for part in arch.values() for key in part)
    assert read_architecture(fitted["old_style"]) is None


def test_predict_and_test_without_the_fit_files(
    fitted: dict[str, Any], nyuv2_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files moved away: predict and test with the checkpoint run and match the old-style runs with the files."""
    files: dict[str, Path] = fitted["files"]
    moved = fitted["base"] / "moved"
    files["diffusers"].parent.rename(moved)
    try:
        assert not any(path.exists() for path in files.values())
        # The old-style checkpoint needs the diffusers folder for the architecture: one line naming it.
        with pytest.raises(ArchitectureError, match=f"model.generator.pretrained={files['diffusers']}, which does"):
            run("predict", nyuv2_root, tmp_path / "old", files, f"--ckpt_path={fitted['old_style']}")

        # fit --ckpt_path is a resume: built as configured, so a missing weights file is an error as before.
        with pytest.raises(FileNotFoundError, match="does not exist") as resume_error:
            run("fit", nyuv2_root, tmp_path / "resume", files, f"--ckpt_path={fitted['checkpoint']}")
        assert not isinstance(resume_error.value, ArchitectureError)

        run("predict", nyuv2_root, tmp_path / "predict", files, f"--ckpt_path={fitted['checkpoint']}")
        new = predictions(tmp_path / "predict")
        reference = fitted["predictions"]
        assert sorted(new) == sorted(reference)
        for key, value in reference.items():
            np.testing.assert_array_equal(new[key], value, err_msg=f"predict output {key} differs")

        checkpoint = f"--ckpt_path={fitted['checkpoint']}"
        run("test", nyuv2_root, tmp_path / "test", files, checkpoint, csv_logger(tmp_path / "test"))
        scores = logged(tmp_path / "test")
        assert "test/miou" in scores and any("consistency_miou" in key for key in scores)
        assert scores == fitted["test"]
    finally:
        moved.rename(files["diffusers"].parent)


def test_model_config_changes(tmp_path: Path) -> None:
    """Which options a self-contained checkpoint changes, for each kind of model config."""
    architecture = {"generator": {"unet": {"sample_size": 8}, "vae": None, "scheduler": {"beta_end": 0.01}}}
    model = {
        "mode": "joint",
        "generator": {"pretrained": "/gone/sd", "sampler": "ddpm", "scheduler": {"beta_end": 0.02}},
        "text_encoder": {"model_name": "occscene-tiny-clip", "pretrained": "/gone/clip.pt"},
        "perceiver": {"backbone": "resnet10t", "pretrained": None},
        "evaluation": {"inception_weights": "/gone/inception.pth", "judge": "/gone/judge.ckpt", "log_images": 4},
        "init_from": "/gone/stage1.ckpt",
    }
    changes = self_contained_model_config(model, architecture, "x.ckpt")
    assert changes == {
        "init_from": None,
        "text_encoder": {"model_name": "occscene-tiny-clip", "pretrained": None},
        "evaluation.inception_weights": None,
        "evaluation.judge": None,
        "generator": {
            "pretrained": None,
            "sampler": "ddpm",
            "unet": {"sample_size": 8},
            "vae": None,
            "scheduler": {"beta_end": 0.01},
        },
    }
    assert model["generator"]["pretrained"] == "/gone/sd"  # not modified in place

    # Perception checkpoints have no generator; only weights files change.
    present = tmp_path / "inception.pth"
    present.touch()
    evaluation = {"inception_weights": str(present), "judge": None}
    perception = {**model, "mode": "perception", "init_from": None, "evaluation": evaluation}
    assert set(self_contained_model_config(perception, {"generator": None}, "p.ckpt")) == {"text_encoder"}

    # An old-style checkpoint keeps the folder; a missing folder is one line naming option, folder and checkpoint.
    with pytest.raises(
        ArchitectureError,
        match=r"--ckpt_path old\.ckpt predates .* model\.generator\.pretrained=/gone/sd, which does not exist",
    ):
        self_contained_model_config(model, None, "old.ckpt")


def test_old_style_checkpoint_with_folder_keeps_it(tmp_path: Path) -> None:
    """Without a stored architecture an existing folder stays the generator's source."""
    folder = tmp_path / "sd"
    folder.mkdir()
    changes = self_contained_model_config({"mode": "generation", "generator": {"pretrained": str(folder)}}, None, "c")
    assert changes == {}


def test_read_architecture_errors(tmp_path: Path) -> None:
    """Unreadable files and malformed entries are one-line errors naming the file."""
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"could not read checkpoint {garbage}"):
        read_architecture(garbage)
    malformed = tmp_path / "malformed.ckpt"
    torch.save({ARCHITECTURE_KEY: "unet"}, malformed)
    with pytest.raises(ValueError, match=f"{malformed} has a malformed"):
        read_architecture(malformed)


def test_explicit_model_flags_override_the_checkpoint_settings(
    fitted: dict[str, Any], nyuv2_root: Path, tmp_path: Path
) -> None:
    """``--model.*`` flags on the command line win over the settings saved in ``--ckpt_path`` (Lightning alone would
    silently keep the saved ones); unflagged options still come from the checkpoint."""
    saved = torch.load(fitted["checkpoint"], map_location="cpu", weights_only=True)["hyper_parameters"]
    sampling = dict(vars(saved["sampling"]) if not isinstance(saved["sampling"], dict) else saved["sampling"])
    assert sampling["num_inference_steps"] == 2
    run(
        "predict",
        nyuv2_root,
        tmp_path,
        fitted["files"],
        f"--ckpt_path={fitted['checkpoint']}",
        "--model.sampling.num_inference_steps=1",
        "--model.sampling.seed",
        "5",
    )
    (sample,) = [d for d in (tmp_path / "predictions").iterdir() if d.is_dir()]
    meta = json.loads((sample / "meta.json").read_text())
    assert meta["meta"]["num_inference_steps"] == 1
    assert meta["meta"]["guidance_scale"] == sampling["guidance_scale"]


def test_an_explicit_missing_judge_is_an_error_not_dropped(
    fitted: dict[str, Any], nyuv2_root: Path, tmp_path: Path
) -> None:
    """A judge named on the command line is not silently dropped when its file is missing (only fit-time files
    saved in the checkpoint are): predict fails with the judge's own error naming the file."""
    missing = tmp_path / "no_such_judge.ckpt"
    with pytest.raises(FileNotFoundError, match=r"model\.evaluation\.judge: checkpoint .*no_such_judge\.ckpt"):
        run(
            "predict",
            nyuv2_root,
            tmp_path,
            fitted["files"],
            f"--ckpt_path={fitted['checkpoint']}",
            f"--model.evaluation.judge={missing}",
        )


def test_explicit_model_flags_are_parsed_from_the_command_line() -> None:
    from occscene_pl.cli import _set_option, explicit_model_flags
    from occscene_pl.config import SamplingConfig

    flags = explicit_model_flags(["predict", "--model.sampling.eta=0.5", "--model.mode", "joint", "--data.root=x"])
    assert flags == ["sampling.eta", "mode"]
    options: dict[str, Any] = {"sampling": SamplingConfig(eta=0.1, guidance_scale=3.0), "mode": "generation"}
    _set_option(options, "sampling.eta", 0.5)
    _set_option(options, "mode", "joint")
    assert options["mode"] == "joint"
    assert options["sampling"]["eta"] == 0.5 and options["sampling"]["guidance_scale"] == 3.0
