"""OccSceneModule through ``occscene_pl.cli.main([...])``: resume, prompt-file predict (resume, per-sample seeds), bf16.

Every run is ``configs/nyuv2.yaml`` composed with ``tests/configs/tiny.yaml`` on the fake scenes of ``nyuv2_root``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import occscene_pl.module as module_lib
from occscene_pl.cli import main
from occscene_pl.module import OccSceneModule
from tests.conftest import REPO, TINY

pytestmark = [
    # Resuming from a checkpoint saved at an epoch's end finishes that epoch again, before any validation.
    pytest.mark.filterwarnings("ignore:`ModelCheckpoint\\(monitor='val/miou'\\)` could not find the monitored key"),
    pytest.mark.filterwarnings("ignore:Precision bf16-mixed is not supported by the model summary"),
]

GRID = (8, 8, 4)
PROMPTS = ["a bedroom with a bed and a window", "a living room with a sofa and a table"]


def run(subcommand: str, nyuv2_root: Path, root: Path, *extra: str) -> None:
    """``occscene-pl <subcommand>`` on the NYUv2 config + tiny overlay, writing under ``root``."""
    main(
        [
            subcommand,
            "--config",
            str(REPO / "configs" / "nyuv2.yaml"),
            "--config",
            TINY,
            f"--trainer.default_root_dir={root}",
            f"--data.root={nyuv2_root}",
            f"--data.grid_size=[{', '.join(map(str, GRID))}]",
            "--data.image_size=[32, 48]",
            *extra,
        ]
    )


def last_checkpoint(root: Path) -> Path:
    """The newest ``last.ckpt`` under ``root``."""
    found = sorted(root.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert found, f"no last.ckpt under {root}"
    return found[-1]


@pytest.fixture(scope="module")
def fitted(nyuv2_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``last.ckpt`` of a 2-step joint fit (one epoch over the 2 train scenes)."""
    root = tmp_path_factory.mktemp("fit")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["occscene-pl"])
        torch.manual_seed(0)
        run("fit", nyuv2_root, root)
    return last_checkpoint(root)


class Recorder:
    """Wraps ``sample_scenes`` as the module sees it: counts calls, keeps each call's results and settings."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict[str, Any]] = []
        original = module_lib.sample_scenes

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            self.calls.append(
                {
                    "prompts": list(args[4]),
                    "seeds": list(args[6]),
                    "condition": kwargs.get("condition"),
                    "images": result.images.clone(),
                    "autocast": torch.is_autocast_enabled("cpu"),
                    "autocast_dtype": torch.get_autocast_dtype("cpu"),
                }
            )
            return result

        monkeypatch.setattr(module_lib, "sample_scenes", wrapper)

    def images(self) -> dict[int, torch.Tensor]:
        """Generated images by seed."""
        return {s: c["images"][i] for c in self.calls for i, s in enumerate(c["seeds"])}


def test_resume_from_last_checkpoint(
    fitted: Path, nyuv2_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fit 2 steps, then ``--ckpt_path last.ckpt`` with ``max_steps 4``: two more steps, step counter at 4."""
    first = torch.load(fitted, map_location="cpu", weights_only=False)
    assert first["global_step"] == 2
    steps: list[int] = []
    training_step = OccSceneModule.training_step

    def counted(self: OccSceneModule, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        steps.append(self.global_step)
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(OccSceneModule, "training_step", counted)
    run("fit", nyuv2_root, tmp_path, f"--ckpt_path={fitted}", "--trainer.max_steps=4", "--trainer.max_epochs=-1")
    assert steps == [2, 3], "the resumed fit did not continue from step 2"
    resumed = torch.load(last_checkpoint(tmp_path), map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 4
    assert resumed["epoch"] == first["epoch"] + 1
    # The optimizer state came along: Adam counted all four steps.
    adam_steps = {float(s["step"]) for s in resumed["optimizer_states"][0]["state"].values()}
    assert adam_steps == {4.0}


def _check_sample_folder(folder: Path, prompt: str, seed: int) -> dict[str, Any]:
    """A complete text-mode sample folder: image, occupancy arrays and picture, meta.json."""
    for name in ("image.png", "occupancy.npz", "occupancy.png", "meta.json"):
        assert (folder / name).is_file(), f"{folder.name} lacks {name}"
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["prompt"], meta["seed"], meta["mode"]) == (prompt, seed, "text")
    assert sorted(meta["files"]) == ["image.png", "occupancy.npz", "occupancy.png"]
    with np.load(folder / "occupancy.npz") as arrays:
        assert arrays["labels"].shape == GRID and "condition" not in arrays
    assert Image.open(folder / "image.png").size == (48, 32)
    return meta


def test_predict_prompts_file_resume_and_per_sample_seeds(
    fitted: Path, nyuv2_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One folder per prompt x sample; a rerun generates nothing; any sample regenerates alone from its seed."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    common = [f"--ckpt_path={fitted}", "--trainer.limit_predict_batches=null", "--data.batch_size=3"]
    batch_run = [f"--data.prompts={prompts}", "--data.samples_per_prompt=2", "--data.predict_seed=100", *common]
    recorder = Recorder(monkeypatch)
    run("predict", nyuv2_root, tmp_path / "batch", *batch_run)
    assert [len(c["seeds"]) for c in recorder.calls] == [3, 1]
    assert all(c["condition"] is None for c in recorder.calls)
    out = tmp_path / "batch" / "predictions"
    expected = {f"prompt{p:05d}_sample{r:02d}": (PROMPTS[p], 100 + 2 * p + r) for p in range(2) for r in range(2)}
    assert sorted(d.name for d in out.iterdir()) == sorted(expected)
    metas = {name: _check_sample_folder(out / name, *expected[name]) for name in expected}
    batch_images = recorder.images()
    assert sorted(batch_images) == [100, 101, 102, 103]

    # Rerun: every sample is complete, nothing is generated or rewritten.
    recorder.calls.clear()
    run("predict", nyuv2_root, tmp_path / "batch", *batch_run)
    assert recorder.calls == []
    for name, meta in metas.items():
        assert json.loads((out / name / "meta.json").read_text())["created_at"] == meta["created_at"]

    # An interrupted run: the sample without meta.json is generated again, alone, and comes out the same.
    (out / "prompt00001_sample00" / "meta.json").unlink()
    run("predict", nyuv2_root, tmp_path / "batch", *batch_run)
    assert [c["seeds"] for c in recorder.calls] == [[102]]
    torch.testing.assert_close(recorder.images()[102], batch_images[102], rtol=0, atol=1e-5)
    _check_sample_folder(out / "prompt00001_sample00", *expected["prompt00001_sample00"])
    recorder.calls.clear()

    # Sample 1 (prompt 0, second sample, seed 101) was generated inside a batch of 3; generate it alone.
    single = tmp_path / "single.txt"
    single.write_text(PROMPTS[0] + "\n")
    run("predict", nyuv2_root, tmp_path / "single", f"--data.prompts={single}", "--data.predict_seed=101", *common)
    assert [c["seeds"] for c in recorder.calls] == [[101]]
    alone = recorder.images()[101]
    torch.testing.assert_close(alone, batch_images[101], rtol=0, atol=1e-5)
    assert not torch.allclose(batch_images[100], batch_images[101], atol=1e-3)  # seeds matter
    _check_sample_folder(tmp_path / "single" / "predictions" / "prompt00000_sample00", PROMPTS[0], 101)


def test_bf16_mixed_fit_and_predict(nyuv2_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``precision bf16-mixed`` on the CPU: two training steps with validation, then layout predict, under autocast."""
    bf16 = "--trainer.precision=bf16-mixed"
    recorder = Recorder(monkeypatch)
    run("fit", nyuv2_root, tmp_path, bf16)
    checkpoint = last_checkpoint(tmp_path)
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == 2
    assert len(recorder.calls) == 1 and recorder.calls[0]["autocast"]  # validation generated under autocast
    recorder.calls.clear()
    run("predict", nyuv2_root, tmp_path, bf16, f"--ckpt_path={checkpoint}")
    assert len(recorder.calls) == 1
    call = recorder.calls[0]
    assert call["autocast"] and call["autocast_dtype"] == torch.bfloat16
    assert call["condition"] is not None  # predict over the split: layout-controlled
    assert call["images"].dtype == torch.float32 and bool(torch.isfinite(call["images"]).all())
    folders = [d for d in (tmp_path / "predictions").iterdir() if d.is_dir()]
    assert len(folders) == 1
    meta = json.loads((folders[0] / "meta.json").read_text())
    assert meta["mode"] == "layout" and 0.0 <= meta["meta"]["cotrained_consistency_miou"] <= 1.0
    for name in ("image.png", "occupancy.npz", "occupancy.png"):
        assert (folders[0] / name).is_file()
