"""StreamingCheckpointIO: checkpoints are written straight to disk, atomically, and load back in Lightning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities import cloud_io
from torch.utils.data import DataLoader, TensorDataset

from occscene_pl.checkpoint_io import StreamingCheckpointIO


class Linear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def fit(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), plugins=[StreamingCheckpointIO()], **kwargs,
    )  # fmt: skip
    trainer.fit(Linear(), DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=2))
    return trainer


def test_checkpoints_bypass_the_in_memory_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def buffered(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("Lightning's buffering _atomic_save was used")

    monkeypatch.setattr(cloud_io, "_atomic_save", buffered)
    monkeypatch.setattr("lightning.fabric.plugins.io.torch_io._atomic_save", buffered)
    trainer = fit(tmp_path)
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.ckpt")
    state = torch.load(checkpoint, weights_only=False)
    assert state["global_step"] == 4 and "optimizer_states" in state
    assert torch.equal(state["state_dict"]["layer.weight"], trainer.lightning_module.layer.weight)
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == [checkpoint.name]  # no temporary files
    # and resuming from it works
    resumed = pl.Trainer(
        accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path / "again"), plugins=[StreamingCheckpointIO()],
    )  # fmt: skip
    resumed.fit(Linear(), DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=2), ckpt_path=str(checkpoint))
    assert resumed.global_step == 6


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = StreamingCheckpointIO()
    target = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)
    real_save = torch.save

    def disk_full(obj: Any, file: Any, *args: Any, **kwargs: Any) -> None:
        real_save({"partial": True}, file)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(target) == {"step": 1}
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def test_storage_options_are_refused_as_in_lightning(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="storage_options"):
        StreamingCheckpointIO().save_checkpoint({}, tmp_path / "x.ckpt", storage_options={"a": 1})
