"""OccSceneModule built in Python (no CLI): training modes, losses, EMA, init_from, text-only sampling, DDP.

The model is the tiny one of ``tests/configs/tiny.yaml`` on the fake NYUv2 scenes of the ``nyuv2_root`` fixture
(8 x 8 x 4 grid, 32 x 48 images, pixel-space diffusion).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch import Tensor, nn

import occscene_pl.module as module_lib
from occscene_pl.config import EvaluationConfig, LossConfig, OptimizerConfig, SamplingConfig
from occscene_pl.data.base import collate_samples, select_rows
from occscene_pl.data.nyuv2 import NYUv2DataModule
from occscene_pl.data.prompts import PromptDataset
from occscene_pl.metrics import SSCMetric
from occscene_pl.models import MambaDualAlignment
from occscene_pl.module import OccSceneModule
from occscene_pl.objective import encode_prompts
from occscene_pl.samples import GeneratedSample
from occscene_pl.sampling import SampleResult, labels_to_probabilities
from tests.conftest import REPO

# Most trainers here run training steps only.
pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")

TINY_MODEL: dict[str, Any] = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())["model"]
GRID = (8, 8, 4)
IMAGE_SIZE = (32, 48)


@pytest.fixture(scope="module")
def datamodule(nyuv2_root: Path) -> NYUv2DataModule:
    """The fake NYUv2 scenes without augmentation: train (2 scenes) and test (1 scene) splits."""
    dm = NYUv2DataModule(
        root=str(nyuv2_root),
        grid_size=GRID,
        image_size=IMAGE_SIZE,
        batch_size=2,
        color_jitter=0.0,
        flip_prob=0.0,
    )
    dm.setup("fit")
    dm.setup("predict")
    return dm


@pytest.fixture(scope="module")
def batch(datamodule: NYUv2DataModule) -> dict[str, Any]:
    """Both train scenes, collated."""
    dataset = datamodule.datasets["train"]
    return collate_samples([dataset[0], dataset[1]])


def build(datamodule: NYUv2DataModule, mode: str = "joint", **overrides: Any) -> OccSceneModule:
    """The tiny model of ``tests/configs/tiny.yaml`` for the NYUv2 classes; ``overrides`` replace arguments."""
    cfg = copy.deepcopy(TINY_MODEL)
    kwargs: dict[str, Any] = {
        "num_classes": datamodule.num_classes,
        "grid_size": datamodule.grid_size,
        "class_names": datamodule.class_names,
        "class_weights": datamodule.class_weights,
        "mode": mode,
        "generator": cfg["generator"],
        "text_encoder": cfg["text_encoder"],
        "aligner": cfg["aligner"],
        "perceiver": cfg["perceiver"],
        "sampling": SamplingConfig(**cfg["sampling"]),
        "evaluation": EvaluationConfig(**cfg["evaluation"]),
        "text_dropout": 0.0,
    }
    kwargs.update(overrides)
    return OccSceneModule(**kwargs)


def trainer(**kwargs: Any) -> pl.Trainer:
    """A quiet CPU trainer without logger, checkpoints or validation unless ``kwargs`` ask for them."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 1,
        "max_epochs": -1,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def snapshot(part: nn.Module | None) -> dict[str, Tensor]:
    """A copy of a part's state dict (parameters and buffers)."""
    assert part is not None
    return {k: v.detach().clone() for k, v in part.state_dict().items()}


def changed(before: dict[str, Tensor], part: nn.Module | None) -> list[str]:
    """Names of the state entries of ``part`` that differ from ``before``."""
    assert part is not None
    return [k for k, v in part.state_dict().items() if not torch.equal(v, before[k])]


def training_step(module: OccSceneModule, batch: dict[str, Any]) -> Tensor:
    """One ``training_step`` without a trainer (its ``self.log`` calls only warn then)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        return module.training_step(batch, 0)


# ------------------------------------------------------------------------------------------------------------ modes
@pytest.fixture(scope="module")
def perception_run(datamodule: NYUv2DataModule, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Stage 1: a perception-mode model trained one step, with its perceiver before and after and a checkpoint."""
    torch.manual_seed(0)
    module = build(datamodule, "perception", generator=None)
    before = snapshot(module.perceiver)
    run = trainer()
    run.fit(module, train_dataloaders=datamodule.train_dataloader())
    path = tmp_path_factory.mktemp("stage1") / "perception.ckpt"
    run.save_checkpoint(path)
    return {"module": module, "before": before, "checkpoint": path}


def test_perception_mode_trains_only_the_perceiver(perception_run: dict[str, Any]) -> None:
    """Perception mode builds no generator, text encoder or aligner, and its one step updates the perceiver."""
    module: OccSceneModule = perception_run["module"]
    assert module.generator is None and module.text_encoder is None and module.aligner is None
    assert module.global_step == 1
    assert changed(perception_run["before"], module.perceiver)
    assert set(module.trainable_parts()) == {"perceiver"}


@pytest.mark.parametrize("mode", ["generation", "joint"])
def test_mode_updates_only_its_parts(datamodule: NYUv2DataModule, mode: str) -> None:
    """One optimizer step changes exactly the parts of the mode; the frozen text encoder never changes."""
    module = build(datamodule, mode)
    assert module.generator is not None and module.text_encoder is not None
    parts = {
        "perceiver": module.perceiver,
        "unet": module.generator.unet,
        "aligner": module.aligner,
        "text_encoder": module.text_encoder,
    }
    before = {name: snapshot(part) for name, part in parts.items()}
    trainer().fit(module, train_dataloaders=datamodule.train_dataloader())
    assert module.global_step == 1
    moved = {name: changed(before[name], part) for name, part in parts.items()}
    assert moved["unet"], "the UNet did not train"
    assert moved["aligner"], "the aligner did not train"
    # The zero-initialised output convs are the aligner parameters with a gradient in the first step.
    assert any(name.startswith(("down_convs", "mid_conv")) for name in moved["aligner"])
    assert not moved["text_encoder"], f"the frozen text encoder changed: {moved['text_encoder'][:3]}"
    if mode == "generation":
        # Parameters and batch-norm statistics: the perceiver is frozen and in eval mode.
        assert not moved["perceiver"], f"generation mode changed the perceiver: {moved['perceiver'][:3]}"
        assert not any(p.requires_grad for p in module.perceiver.parameters())
    else:
        assert moved["perceiver"], "joint mode did not train the perceiver"


def test_perception_mode_predict_is_a_clear_error(perception_run: dict[str, Any], batch: dict[str, Any]) -> None:
    """Predict needs a generator: perception mode says so instead of failing somewhere inside."""
    with pytest.raises(RuntimeError, match="mode=perception has no generator"):
        perception_run["module"].predict_step(batch, 0)


# ------------------------------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode": "diffusion"}, "model.mode must be perception, generation or joint"),
        ({"gt_condition_prob": 1.5}, r"model.gt_condition_prob must be in \[0, 1\]"),
        ({"gt_condition_prob": -0.1}, r"model.gt_condition_prob must be in \[0, 1\]"),
        ({"text_dropout": 2.0}, r"model.text_dropout must be in \[0, 1\]"),
        ({"ema_decay": 1.0}, r"model.ema_decay must be in \(0, 1\)"),
        ({"generator": None}, "model.generator is required in joint mode"),
        ({"class_names": ["a", "b"]}, "model.class_names has 2 names"),
    ],
)
def test_bad_config_values_are_clear_errors(
    datamodule: NYUv2DataModule, overrides: dict[str, Any], message: str
) -> None:
    """Invalid arguments fail at construction with a message naming the option."""
    with pytest.raises(ValueError, match=message):
        build(datamodule, **overrides)


def test_text_encoder_width_must_match_cross_attention(datamodule: NYUv2DataModule) -> None:
    """A text encoder narrower or wider than the UNet's cross-attention is refused, naming both widths."""
    generator = copy.deepcopy(TINY_MODEL["generator"])
    generator["unet"]["cross_attention_dim"] = 48
    with pytest.raises(ValueError, match=r"text_encoder width 32 != the UNet's cross_attention_dim 48"):
        build(datamodule, generator=generator)


def test_bad_option_groups_are_clear_errors() -> None:
    """The option dataclasses check their values too."""
    with pytest.raises(ValueError, match="model.loss.timestep_weighting"):
        LossConfig(timestep_weighting="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model.sampling.predict_mode"):
        SamplingConfig(predict_mode="image")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------- init_from
def test_init_from_perception_checkpoint(datamodule: NYUv2DataModule, perception_run: dict[str, Any]) -> None:
    """Stage 2 starts from the stage-1 perceiver (parameters and statistics), weights only."""
    stage1: OccSceneModule = perception_run["module"]
    joint = build(datamodule, "joint", init_from=str(perception_run["checkpoint"]))
    expected = stage1.perceiver.state_dict()
    loaded = joint.perceiver.state_dict()
    assert expected.keys() == loaded.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    # The stage-1 perceiver really differs from a fresh one, so equality is not an accident of seeding.
    assert changed(perception_run["before"], joint.perceiver)
    assert joint.global_step == 0


def test_init_from_missing_file_names_it(datamodule: NYUv2DataModule, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_stage1.ckpt"
    with pytest.raises(FileNotFoundError, match="no_such_stage1.ckpt"):
        build(datamodule, "joint", init_from=str(missing))


# ---------------------------------------------------------------------------------------------------------------- EMA
def _ema_parts(module: OccSceneModule) -> tuple[nn.Module, nn.Module]:
    assert module.ema is not None
    return module.ema["unet"], module.ema["aligner"]


def test_ema_follows_the_unet_and_aligner_and_is_sampled_with(
    datamodule: NYUv2DataModule, batch: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a step both EMAs are ``d * initial + (1 - d) * live``; sampling swaps in the EMA UNet and aligner."""
    decay = 0.75
    module = build(datamodule, "generation", ema_decay=decay, ema_warmup=False)
    assert module.generator is not None and module.aligner is not None
    ema_unet, ema_aligner = _ema_parts(module)
    live_parts = {"unet": module.generator.unet, "aligner": module.aligner}
    initial = {name: snapshot(part) for name, part in live_parts.items()}
    trainer().fit(module, train_dataloaders=datamodule.train_dataloader())
    for name, ema_part in (("unet", ema_unet), ("aligner", ema_aligner)):
        live = dict(live_parts[name].named_parameters())
        ema = dict(ema_part.named_parameters())
        assert not any(p.requires_grad for p in ema.values())
        moved = [k for k in live if not torch.equal(live[k], initial[name][k])]
        assert moved, name
        for k in moved:
            expected = decay * initial[name][k] + (1 - decay) * live[k].detach()
            torch.testing.assert_close(ema[k], expected, rtol=1e-5, atol=1e-7)
            assert not torch.equal(ema[k], live[k])

    used: list[tuple[nn.Module, nn.Module]] = []

    def fake_sample_scenes(generator: Any, text_encoder: Any, aligner: Any, *args: Any, **kwargs: Any) -> Any:
        used.append((generator.unet, aligner))
        b, v = batch["image"].shape[:2]
        return SampleResult(torch.zeros(b, v, 3, *IMAGE_SIZE), torch.zeros(b, module.num_classes, *GRID))

    monkeypatch.setattr(module_lib, "sample_scenes", fake_sample_scenes)
    camera = module.camera(batch)
    live_unet, live_aligner = module.generator.unet, module.aligner
    module._generate(batch, camera, condition=None)
    module.sampling.use_ema = False
    module._generate(batch, camera, condition=None)
    assert used[0][0] is ema_unet and used[0][1] is ema_aligner  # sampled together
    assert used[1][0] is live_unet and used[1][1] is live_aligner
    assert module.generator.unet is live_unet and module.aligner is live_aligner  # restored after sampling


def test_ema_warmup_follows_diffusers_schedule(datamodule: NYUv2DataModule) -> None:
    """With warm-up, update n uses ``min(decay, (1 + n) / (10 + n))`` (diffusers' EMAModel): the first updates mostly
    copy the live weights, so the average does not stay anchored on the initial weights for thousands of steps."""
    from diffusers.training_utils import EMAModel

    module = build(datamodule, "generation", ema_decay=0.9999)
    reference = EMAModel(torch.nn.Linear(1, 1).parameters(), decay=0.9999)
    for n in (0, 1, 10, 100, 5000, 10**6):
        reference.optimization_step = n + 1  # diffusers counts the step being taken from 1
        assert module.ema_decay_at(n) == pytest.approx(reference.get_decay(reference.optimization_step))
    assert module.ema_decay_at(0) == 0.0  # the first update copies the live weights
    # After 5000 updates the weights after the first step are < 1 % of the average (61 % without warm-up).
    remaining = float(torch.tensor([module.ema_decay_at(n) for n in range(1, 5000)], dtype=torch.float64).prod())
    assert remaining < 0.01 and 0.9999**5000 > 0.6


class _LiveProbe(pl.Callback):
    """Records one UNet parameter, with the step counter, at each batch end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.records: list[tuple[int, Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        live = dict(pl_module.generator.unet.named_parameters())[self.name].detach().clone()
        self.records.append((trainer.global_step, live))


def test_ema_updates_once_per_optimizer_step_with_warmup(datamodule: NYUv2DataModule) -> None:
    """With gradient accumulation the EMA moves once per optimizer step, with the warm-up decay of each update, and
    the update counter is saved in the state dict (so a resumed run continues the schedule)."""
    decay = 0.5
    module = build(datamodule, "generation", ema_decay=decay, optimizer=OptimizerConfig(lr_unet=1e-2))
    assert module.generator is not None
    name = "conv_in.weight"
    initial = dict(module.generator.unet.named_parameters())[name].detach().clone()
    probe = _LiveProbe(name)
    loader = torch.utils.data.DataLoader(
        [datamodule.datasets["train"][0]] * 4, batch_size=1, collate_fn=collate_samples
    )
    trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[probe]).fit(module, train_dataloaders=loader)
    assert [step for step, _ in probe.records] == [0, 1, 1, 2]
    after_first, after_second = probe.records[1][1], probe.records[3][1]
    d0, d1 = module.ema_decay_at(0), module.ema_decay_at(1)
    assert (d0, d1) == (0.0, pytest.approx(2 / 11))
    expected = d1 * (d0 * initial + (1 - d0) * after_first) + (1 - d1) * after_second
    final = dict(_ema_parts(module)[0].named_parameters())[name].detach()
    torch.testing.assert_close(final, expected, rtol=1e-5, atol=1e-7)
    assert int(module.state_dict()["ema_updates"]) == 2
    assert any(k.startswith("ema.aligner.") for k in module.state_dict())


def _count_perceiver_calls(module: OccSceneModule, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap ``module.perceive``; the returned list gets the batch size of every call."""
    calls: list[int] = []
    original = module.perceive

    def counted(images: Tensor, camera: Any) -> dict[str, Tensor]:
        calls.append(images.shape[0])
        return original(images, camera)

    monkeypatch.setattr(module, "perceive", counted)
    return calls


@pytest.mark.parametrize(("cutoff", "expected_calls"), [(0, 1), (1000, 2)])
def test_cutoff_weighting_skips_the_generated_loss(
    datamodule: NYUv2DataModule,
    batch: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    cutoff: int,
    expected_calls: int,
) -> None:
    """With every timestep at or above the cutoff, g(t) = 0 and the estimate is never decoded nor perceived."""
    loss = LossConfig(timestep_weighting="cutoff", timestep_cutoff=cutoff)
    module = build(datamodule, "joint", loss=loss, gt_condition_prob=0.0)
    calls = _count_perceiver_calls(module, monkeypatch)
    logged: dict[str, Any] = {}
    monkeypatch.setattr(module, "log_dict", lambda values, **kwargs: logged.update(values))
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    training_step(module, batch)
    assert len(calls) == expected_calls  # the real images, then (cutoff 1000) the decoded estimates
    assert ("train/generated_ssc" in logged) == (expected_calls == 2)


def test_generated_loss_reaches_the_unet_and_aligner(datamodule: NYUv2DataModule, batch: dict[str, Any]) -> None:
    """The perception loss on ``decode(x0_hat)`` alone back-propagates into the UNet and the aligner's zero convs."""
    loss = LossConfig(diffusion=0.0, real_ssc=0.0, generated_ssc=1.0, timestep_weighting="none")
    module = build(datamodule, "joint", loss=loss, gt_condition_prob=1.0)
    assert module.generator is not None and module.aligner is not None and module.text_encoder is not None
    total = training_step(module, batch)
    assert total.requires_grad and float(total.detach()) > 0
    total.backward()

    def grad_norm(part: nn.Module) -> float:
        return sum(float(p.grad.abs().sum()) for p in part.parameters() if p.grad is not None)

    assert grad_norm(module.generator.unet) > 0
    for conv in [*module.aligner.down_convs, module.aligner.mid_conv]:
        assert conv.weight.grad is not None and float(conv.weight.grad.abs().sum()) > 0
    assert grad_norm(module.perceiver) > 0  # the perceiver learns from the estimates too
    assert all(p.grad is None for p in module.text_encoder.parameters())


def test_text_dropout_replaces_prompts_by_empty_seeded(
    datamodule: NYUv2DataModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dropped prompts become ``""``; the choice follows the torch seed; dropout 0 and 1 are all or nothing."""
    module = build(datamodule, "generation")
    assert module.text_encoder is not None
    seen: list[list[str]] = []
    width = module.text_encoder.width
    monkeypatch.setattr(
        module.text_encoder, "forward", lambda prompts: seen.append(list(prompts)) or torch.zeros(1, 1, width)
    )
    prompts = [f"a room {i}" for i in range(32)]

    def encode(dropout: float, seed: int) -> list[str]:
        torch.manual_seed(seed)
        encode_prompts(module.text_encoder, prompts, dropout, module.device)
        return seen[-1]

    first, again, other = encode(0.5, 1), encode(0.5, 1), encode(0.5, 2)
    assert first == again != other
    assert {p for p in first if p not in prompts} == {""}
    assert 0 < first.count("") < len(prompts)
    assert all(p in ("", prompts[i]) for i, p in enumerate(first))
    assert encode(0.0, 1) == prompts
    assert encode(1.0, 1) == [""] * len(prompts)


def test_training_step_applies_text_dropout(
    datamodule: NYUv2DataModule, batch: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``text_dropout=1`` trains on the unconditional prompt only."""
    module = build(datamodule, "generation", text_dropout=1.0)
    assert module.text_encoder is not None
    seen: list[list[str]] = []
    original = module.text_encoder.forward
    monkeypatch.setattr(module.text_encoder, "forward", lambda prompts: seen.append(list(prompts)) or original(prompts))
    training_step(module, batch)
    assert seen == [["", ""]]


# --------------------------------------------------------------------------------------------------------- sampling
def test_text_only_predict_never_sees_ground_truth(
    datamodule: NYUv2DataModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Predict over a labelled split in text mode: the aligner gets no condition first, then only the perceiver's
    soft probabilities, never the ground truth (neither the tensor nor its values)."""
    module = build(datamodule, "joint", sampling=SamplingConfig(num_inference_steps=3, occupancy_refresh=1))
    module.sampling.predict_mode = "text"
    loader = datamodule.predict_dataloader()
    ground_truth: list[Tensor] = []  # the occupancy tensor of the batch predict_step receives
    predict_step = module.predict_step

    def capturing(batch: dict[str, Any], batch_idx: int) -> Any:
        ground_truth.append(batch["occupancy"])
        return predict_step(batch, batch_idx)

    received: list[Tensor | None] = []
    forward = MambaDualAlignment.forward

    def recording(self: MambaDualAlignment, occupancy: Tensor | None, *args: Any, **kwargs: Any) -> Any:
        received.append(None if occupancy is None else occupancy.detach().clone())
        return forward(self, occupancy, *args, **kwargs)

    conditions: list[Any] = []
    sample_scenes = module_lib.sample_scenes

    def checking(*args: Any, **kwargs: Any) -> Any:
        conditions.append(kwargs.get("condition"))
        gt = ground_truth[-1]
        for value in [*args, *kwargs.values()]:
            assert value is not gt
            assert not (isinstance(value, Tensor) and value.shape[-3:] == gt.shape[-3:]), "a grid reached the sampler"
        return sample_scenes(*args, **kwargs)

    monkeypatch.setattr(module, "predict_step", capturing)
    monkeypatch.setattr(MambaDualAlignment, "forward", recording)
    monkeypatch.setattr(module_lib, "sample_scenes", checking)
    outputs = trainer().predict(module, dataloaders=loader, return_predictions=True)
    assert outputs is not None
    samples = [s for batch_out in outputs for s in batch_out]  # type: ignore[union-attr]
    assert len(samples) == len(datamodule.datasets["predict"])
    assert all(isinstance(s, GeneratedSample) and s.mode == "text" and s.condition is None for s in samples)
    assert conditions == [None]
    assert len(ground_truth) == 1 and bool((ground_truth[0] != 255).any())  # the split is labelled
    gt_one_hot = labels_to_probabilities(ground_truth[0], module.num_classes)
    assert len(received) == 3 and received[0] is None
    for occupancy in received[1:]:
        assert occupancy is not None and occupancy.shape == gt_one_hot.shape
        assert occupancy.dtype == torch.float32 and bool((occupancy >= 0).all())
        torch.testing.assert_close(occupancy.sum(1), torch.ones_like(occupancy.sum(1)))
        assert float(occupancy.max()) < 1.0  # soft probabilities, not a one-hot grid
        assert not torch.equal(occupancy, gt_one_hot)


def test_layout_predict_conditions_on_the_occupancy(
    datamodule: NYUv2DataModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In layout mode every step sees the batch's occupancy as a one-hot condition, and meta has its consistency."""
    module = build(datamodule, "joint", sampling=SamplingConfig(num_inference_steps=2, guidance_scale=1.0))
    module.sampling.predict_mode = "layout"
    loader = datamodule.predict_dataloader()
    gt_one_hot = labels_to_probabilities(next(iter(loader))["occupancy"], module.num_classes)
    received: list[Tensor | None] = []
    forward = MambaDualAlignment.forward

    def recording(self: MambaDualAlignment, occupancy: Tensor | None, *args: Any, **kwargs: Any) -> Any:
        received.append(None if occupancy is None else occupancy.detach().clone())
        return forward(self, occupancy, *args, **kwargs)

    monkeypatch.setattr(MambaDualAlignment, "forward", recording)
    outputs = trainer().predict(module, dataloaders=loader, return_predictions=True)
    assert outputs is not None
    sample = outputs[0][0]  # type: ignore[index]
    assert sample.mode == "layout" and 0.0 <= sample.meta["cotrained_consistency_miou"] <= 1.0
    assert "consistency_miou" not in sample.meta  # no judge configured: no headline score
    assert len(received) == 2 and all(r is not None and torch.equal(r, gt_one_hot) for r in received)


def test_layout_predict_needs_occupancy(datamodule: NYUv2DataModule, monkeypatch: pytest.MonkeyPatch) -> None:
    """``predict_mode=layout`` over a prompts file (no occupancy) is a clear error, raised before any sampling."""
    module = build(datamodule, "joint")
    module.sampling.predict_mode = "layout"
    monkeypatch.setattr(module_lib, "sample_scenes", lambda *args, **kwargs: pytest.fail("sampled"))
    prompts = PromptDataset(["a kitchen"], {**datamodule.datasets["predict"][0], "image_size": IMAGE_SIZE})
    loader = torch.utils.data.DataLoader(prompts, batch_size=1, collate_fn=collate_samples)
    with pytest.raises(ValueError, match="predict_mode=layout needs occupancy"):
        trainer().predict(module, dataloaders=loader)


def test_predict_of_an_emptied_batch_generates_nothing(
    datamodule: NYUv2DataModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer removes completed samples before predict_step; a batch left empty samples nothing."""
    module = build(datamodule, "joint")
    monkeypatch.setattr(module_lib, "sample_scenes", lambda *args, **kwargs: pytest.fail("sampled"))
    batch = select_rows(next(iter(datamodule.predict_dataloader())), [])
    assert batch["frame_id"] == [] and module.predict_step(batch, 0) == []


# -------------------------------------------------------------------------------------------------------------- DDP
class SyncProbe(pl.Callback):
    """Records, per rank, the local and the synchronised SSC confusion counts and the logged ``val/miou``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.record: dict[str, Any] = {}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Callbacks run before the module's hook, which computes, logs and resets the metric.
        metric: SSCMetric = pl_module.ssc_metrics["val"]  # type: ignore[index, assignment]
        local = metric.confusion.clone()
        with metric.sync_context():
            synced = metric.confusion.clone()
        reference = SSCMetric(metric.num_classes)
        reference.confusion += synced
        self.record = {
            "rank": trainer.global_rank,
            "local": int(local.sum()),
            "synced": int(synced.sum()),
            "expected_miou": float(reference.compute()["miou"]),
        }

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record["logged_miou"] = float(trainer.callback_metrics["val/miou"])
        self.record["logged_consistency"] = float(trainer.callback_metrics["val/cotrained_consistency_miou"])
        self.record["step"] = trainer.global_step
        # DDP averages the gradients: every rank holds the same weights (and EMA) after its optimizer steps.
        self.record["unet_checksum"] = sum(float(p.double().sum()) for p in pl_module.generator.unet.parameters())
        self.record["ema_checksum"] = sum(float(p.double().sum()) for p in pl_module.ema.parameters())
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


def test_ddp_two_cpu_processes(nyuv2_root: Path, tmp_path: Path) -> None:
    """Joint training in 2 gloo processes (ddp_spawn): steps run and the SSC metric is synchronised across ranks."""
    dm = NYUv2DataModule(
        root=str(nyuv2_root),
        grid_size=GRID,
        image_size=IMAGE_SIZE,
        batch_size=1,
        color_jitter=0.0,
        flip_prob=0.0,
        val_split="train",  # two labelled scenes: one per rank
    )
    dm.prepare_data()
    module = build(dm, "joint", gt_condition_prob=0.5, ema_decay=0.9)
    probe = SyncProbe(tmp_path)
    run = trainer(
        devices=2,
        strategy="ddp_spawn",
        max_steps=2,
        limit_val_batches=1,
        check_val_every_n_epoch=1,
        default_root_dir=str(tmp_path),
        callbacks=[probe],
    )
    run.fit(module, datamodule=dm)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["step"] for r in records] == [2, 2]
    assert all(r["local"] > 0 for r in records)
    assert records[0]["synced"] == records[1]["synced"] == records[0]["local"] + records[1]["local"]
    for r in records:
        assert r["logged_miou"] == pytest.approx(r["expected_miou"], abs=1e-6)
    assert records[0]["logged_consistency"] == pytest.approx(records[1]["logged_consistency"])
    assert records[0]["unet_checksum"] == records[1]["unet_checksum"]
    assert records[0]["ema_checksum"] == records[1]["ema_checksum"]


@pytest.mark.slow
def test_ddp_with_steps_that_leave_the_perceiver_unused(nyuv2_root: Path, tmp_path: Path) -> None:
    """Joint mode with ``real_ssc=0`` and a cutoff g(t) that drops every generated-image loss leaves the perceiver
    without gradients in those steps: DDP then needs ``find_unused_parameters`` (the default joint setting does not,
    see :func:`test_ddp_two_cpu_processes`)."""
    dm = NYUv2DataModule(
        root=str(nyuv2_root), grid_size=GRID, image_size=IMAGE_SIZE, batch_size=1, color_jitter=0.0, flip_prob=0.0
    )
    loss = LossConfig(real_ssc=0.0, timestep_weighting="cutoff", timestep_cutoff=0)
    module = build(dm, "joint", gt_condition_prob=1.0, loss=loss)
    run = trainer(
        devices=2, strategy="ddp_spawn_find_unused_parameters_true", max_steps=2, default_root_dir=str(tmp_path)
    )
    run.fit(module, datamodule=dm)
    assert run.state.finished
