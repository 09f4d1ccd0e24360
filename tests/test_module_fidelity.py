"""Paper-scale fidelity of OccSceneModule's training and evaluation (issue 8): float32 noising under bf16 autocast,
condition dropout for the text-only start state, an independent judge of generated scenes, per-rank random streams,
EMA of UNet and aligner (in tests/test_module.py) and refused sharded strategies.

Uses the tiny model and fake NYUv2 scenes of tests/test_module.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor

from occscene_pl.data.nyuv2 import NYUv2DataModule
from occscene_pl.metrics import SSCMetric
from occscene_pl.module import OccSceneModule
from tests.test_module import (  # noqa: F401 - fixtures are used by name
    GRID,
    TINY_MODEL,
    batch,
    build,
    datamodule,
    perception_run,
    trainer,
    training_step,
)

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")

TINY_VAE = {
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
    "norm_num_groups": 4,
    "layers_per_block": 1,
}


# ------------------------------------------------------------------------------------------------ bf16 noising
@pytest.mark.parametrize("t", [1, 2, 10])
def test_noising_is_float32_under_bf16_autocast(datamodule: NYUv2DataModule, batch: dict[str, Any], t: int) -> None:
    """With a VAE under bf16 autocast (the paper configs' ``bf16-mixed``), the latents, noise, ``add_noise`` and targets
    stay float32: ``z_t = sqrt(a) z_0 + sqrt(1 - a) eps`` holds to float32 precision even at t = 1, where bf16 loses
    the noise term next to the latent's rounding error."""
    generator = {**copy.deepcopy(TINY_MODEL["generator"]), "vae": TINY_VAE}
    module = build(datamodule, "generation", generator=generator)
    assert module.generator is not None and module.generator.vae is not None
    images = batch["image"]
    t_scene = torch.full((images.shape[0],), t, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        noisy, target, timesteps, _ = module.noised_latents(images, torch.Generator().manual_seed(0), t_scene)
        clean = module.generator.encode(images.flatten(0, 1)).float()
    assert noisy.dtype == target.dtype == torch.float32
    assert torch.equal(timesteps, torch.full_like(timesteps, t))
    a = float(module.generator.alphas_cumprod(torch.tensor([t]))[0])
    noise_term = (noisy.double() - a**0.5 * clean.double()) / (1 - a) ** 0.5
    # epsilon prediction: the target is the noise; recovered to float32 rounding (bf16 would be off by >= 10 %).
    relative = float((noise_term - target.double()).norm() / target.double().norm())
    assert relative < 1e-4, relative
    assert not torch.equal(noisy, clean)


def test_x0_estimate_is_float32_for_a_bf16_prediction(datamodule: NYUv2DataModule) -> None:
    module = build(datamodule, "generation")
    assert module.generator is not None
    noisy = torch.randn(2, 3, 4, 4)
    x0 = module.generator.predict_x0(noisy, noisy.bfloat16(), torch.tensor([1, 500]))
    assert x0.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- condition dropout
def _randomise_zero_convs(module: OccSceneModule) -> None:
    assert module.aligner is not None
    for conv in [*module.aligner.down_convs, module.aligner.mid_conv]:
        torch.nn.init.normal_(conv.weight, std=0.1)


@pytest.mark.parametrize(("dropout", "expected"), [(0.0, [True, True]), (1.0, [False, False])])
def test_condition_dropout_trains_scenes_without_residuals(
    datamodule: NYUv2DataModule,
    batch: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    dropout: float,
    expected: list[bool],
) -> None:
    """Dropped scenes reach the UNet with all-zero residuals (= no condition, the state text-only sampling starts in);
    kept scenes with the aligner's residuals."""
    module = build(datamodule, "generation", condition_dropout=dropout)
    assert module.generator is not None
    _randomise_zero_convs(module)
    seen: list[tuple[list[Tensor], Tensor]] = []
    forward = module.generator.forward

    def recording(noisy: Tensor, timesteps: Any, text: Tensor, down: Any = None, mid: Any = None) -> Tensor:
        seen.append(([d.detach() for d in down], mid.detach()))
        return forward(noisy, timesteps, text, down, mid)

    monkeypatch.setattr(module.generator, "forward", recording)
    training_step(module, batch)
    down, mid = seen[0]
    conditioned = [bool(mid[i].abs().sum() > 0) and all(bool(d[i].abs().sum() > 0) for d in down) for i in range(2)]
    assert conditioned == expected
    if not any(expected):
        assert all(bool((d == 0).all()) for d in down) and bool((mid == 0).all())


def test_condition_dropout_is_a_checked_option(datamodule: NYUv2DataModule) -> None:
    with pytest.raises(ValueError, match="model.condition_dropout"):
        build(datamodule, "joint", condition_dropout=1.5)


# ----------------------------------------------------------------------------------------------------------- judge
def test_judge_scores_generated_scenes_independently(
    datamodule: NYUv2DataModule, perception_run: dict[str, Any]
) -> None:
    """``evaluation.judge`` = a perception checkpoint: its frozen perceiver, kept out of the state dict, scores layout
    and text-only samples (``consistency_*``); the co-trained perceiver's scores are ``cotrained_consistency_*``."""
    checkpoint = perception_run["checkpoint"]
    module = build(datamodule, "joint")
    module.evaluation.judge = str(checkpoint)
    judge = module.judge()
    assert judge is not None and not any(p.requires_grad for p in judge.parameters()) and not judge.training
    stage1 = perception_run["module"].perceiver.state_dict()
    assert all(torch.equal(v, stage1[k]) for k, v in judge.state_dict().items())
    assert not any(k.startswith("_judge") or "judge." in k for k in module.state_dict())

    loader = datamodule.predict_dataloader()
    scene = next(iter(loader))
    for mode in ("layout", "text"):
        module.sampling.predict_mode = mode  # type: ignore[assignment]
        outputs = trainer().predict(module, dataloaders=loader, return_predictions=True)
        sample = outputs[0][0]  # type: ignore[index]
        with torch.no_grad():
            output = judge(torch.from_numpy(sample.images)[None], sample.camera())
        judged = output["logits"].argmax(1)
        reference = scene["occupancy"][:1] if mode == "layout" else torch.from_numpy(sample.labels)[None].long()
        metric = SSCMetric(module.num_classes)
        metric.update(judged, reference)
        assert sample.meta["consistency_miou"] == pytest.approx(float(metric.compute()["miou"]))
        assert ("cotrained_consistency_miou" in sample.meta) == (mode == "layout")


def test_judge_is_logged_as_the_headline_consistency(
    datamodule: NYUv2DataModule, perception_run: dict[str, Any]
) -> None:
    module = build(datamodule, "joint")
    module.evaluation.judge = str(perception_run["checkpoint"])
    run = trainer(limit_val_batches=1)
    run.validate(module, dataloaders=datamodule.val_dataloader(), verbose=False)
    logged = set(run.callback_metrics)
    assert {"val/consistency_miou", "val/consistency_iou", "val/cotrained_consistency_miou"} <= logged, logged


def test_judge_must_be_a_perception_checkpoint(datamodule: NYUv2DataModule, tmp_path: Path) -> None:
    joint = build(datamodule, "joint")
    run = trainer()
    run.fit(joint, train_dataloaders=datamodule.train_dataloader())
    path = tmp_path / "joint.ckpt"
    run.save_checkpoint(path)
    module = build(datamodule, "joint")
    module.evaluation.judge = str(path)
    with pytest.raises(ValueError, match=r"model.evaluation.judge: .*joint.ckpt is a 'joint'-mode checkpoint"):
        module.judge()
    module.evaluation.judge = str(tmp_path / "missing.ckpt")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        module.judge()
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    module.evaluation.judge = str(garbage)
    with pytest.raises(ValueError, match="garbage.ckpt is not a readable occscene-pl checkpoint"):
        module.judge()


# -------------------------------------------------------------------------------------------------- random streams
def test_step_generator_depends_on_seed_rank_and_step_only(
    datamodule: NYUv2DataModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = build(datamodule, "joint")
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")

    def draw(step: int, micro: int = 0) -> list[int]:
        return torch.randint(0, 1000, (4,), generator=module.step_generator(step, micro)).tolist()

    first = draw(3)
    torch.manual_seed(123)  # the global RNG does not matter
    assert draw(3) == first
    assert draw(4) != first and draw(3, 1) != first
    monkeypatch.setattr(OccSceneModule, "global_rank", property(lambda self: 1))
    assert draw(3) != first
    monkeypatch.setenv("PL_GLOBAL_SEED", "8")
    monkeypatch.setattr(OccSceneModule, "global_rank", property(lambda self: 0))
    assert draw(3) != first


class _TimestepProbe(pl.Callback):
    """Records the mean timestep each rank drew at every training step (``train/timestep`` is rank-local)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.timesteps: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.timesteps.append(float(trainer.callback_metrics["train/timestep"]))

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        (self.folder / f"timesteps{trainer.global_rank}.json").write_text(json.dumps(self.timesteps))


def _dm(nyuv2_root: Path) -> NYUv2DataModule:
    from tests.test_module import IMAGE_SIZE

    dm = NYUv2DataModule(
        root=str(nyuv2_root), grid_size=GRID, image_size=IMAGE_SIZE, batch_size=1, color_jitter=0.0, flip_prob=0.0
    )
    dm.prepare_data()
    return dm


def test_ddp_ranks_draw_different_timesteps(nyuv2_root: Path, tmp_path: Path) -> None:
    """Two gloo processes seeded alike by ``seed_everything`` still draw their own timesteps and noise."""
    pl.seed_everything(0)
    dm = _dm(nyuv2_root)
    module = build(dm, "generation")
    run = trainer(
        devices=2,
        strategy="ddp_spawn",
        max_steps=3,
        default_root_dir=str(tmp_path),
        callbacks=[_TimestepProbe(tmp_path)],
    )
    run.fit(module, datamodule=dm)
    ranks = [json.loads((tmp_path / f"timesteps{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    assert ranks[0] != ranks[1]


def test_resume_at_an_epoch_boundary_draws_the_same_timesteps(nyuv2_root: Path, tmp_path: Path) -> None:
    """The draws of a step depend on (seed, rank, epoch, batch) only: a run resumed from the checkpoint of epoch 0
    draws in epoch 1 exactly what the uninterrupted run drew."""
    pl.seed_everything(0)
    dm = _dm(nyuv2_root)  # 2 training scenes, batch 1: 2 steps per epoch
    full = _TimestepProbe(tmp_path)
    trainer(max_steps=4, callbacks=[full]).fit(build(dm, "generation"), datamodule=dm)
    first = trainer(max_steps=2, enable_checkpointing=True, default_root_dir=str(tmp_path))
    first.fit(build(dm, "generation"), datamodule=dm)
    checkpoint = tmp_path / "epoch0.ckpt"
    first.save_checkpoint(checkpoint)
    resumed = _TimestepProbe(tmp_path)
    trainer(max_steps=4, callbacks=[resumed]).fit(build(dm, "generation"), datamodule=dm, ckpt_path=checkpoint)
    assert len(full.timesteps) == 4 and resumed.timesteps == full.timesteps[2:]


# ---------------------------------------------------------------------------------------------------------- FSDP
@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"])
def test_sharded_strategies_are_refused_with_a_clear_error(
    datamodule: NYUv2DataModule, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    """Lightning itself refuses FSDP on a CPU, so the module's own check is exercised with a stand-in trainer: the
    module says why (EMA, sampling swap) before Lightning would wrap it."""
    import lightning.pytorch.strategies as strategies

    cls = getattr(strategies, strategy)
    fake = cls.__new__(cls)  # no distributed set-up: only the type matters
    module = build(datamodule, "generation", ema_decay=0.99)
    monkeypatch.setattr(OccSceneModule, "trainer", property(lambda self: SimpleNamespace(strategy=fake)))
    with pytest.raises(ValueError, match=f"trainer.strategy: {strategy} .* not supported"):
        module.setup("fit")
    monkeypatch.setattr(OccSceneModule, "trainer", property(lambda self: SimpleNamespace(strategy=object())))
    module.setup("fit")  # DDP and single-device strategies pass
