"""The sampling loop of ``occscene_pl.sampling`` (``docs/design.md`` §3) on its own, without the LightningModule.

The networks are the tiny ones of ``tests/configs/tiny.yaml``, built by :func:`tests.test_module.build` on the fake
NYUv2 scenes (8 x 8 x 4 grid, 32 x 48 images, pixel-space diffusion); forward hooks record what each network is
given, so the tests see how the condition flows in text-only and layout-controlled mode and how many passes
classifier-free guidance makes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import tests.test_module as tiny
from occscene_pl.data.base import collate_samples
from occscene_pl.data.nyuv2 import NYUv2DataModule
from occscene_pl.module import OccSceneModule
from occscene_pl.sampling import Camera, initial_noise, labels_to_probabilities, sample_scenes

STEPS = 2


# ---------------------------------------------------------------------------------------------------------------
# initial_noise and labels_to_probabilities


def test_initial_noise_of_a_sample_depends_on_its_seed_alone() -> None:
    shape = (1, 3, 4, 6)
    batch = initial_noise([3, 7, 11], shape, torch.device("cpu"), torch.float32)
    assert batch.shape == (3, *shape) and batch.dtype == torch.float32
    alone = initial_noise([7], shape, torch.device("cpu"), torch.float32)
    reordered = initial_noise([11, 7], shape, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(batch[1], alone[0], rtol=0, atol=0)
    torch.testing.assert_close(batch[1], reordered[1], rtol=0, atol=0)
    torch.testing.assert_close(batch[2], reordered[0], rtol=0, atol=0)
    # Drawn by a CPU generator of its own seed: the same numbers whatever the device or dtype asked for.
    expected = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(alone[0], expected, rtol=0, atol=0)
    as_double = initial_noise([7], shape, torch.device("cpu"), torch.float64)
    torch.testing.assert_close(as_double[0], expected.double(), rtol=0, atol=0)
    meta = initial_noise([7], shape, torch.device("meta"), torch.float16)
    assert meta.device.type == "meta" and meta.dtype == torch.float16 and meta.shape == (1, *shape)
    if torch.cuda.is_available():
        cuda = initial_noise([3, 7, 11], shape, torch.device("cuda"), torch.float32)
        torch.testing.assert_close(cuda.cpu(), batch, rtol=0, atol=0)
    assert not torch.equal(batch[0], batch[1])


def test_initial_noise_leaves_the_global_random_state_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    initial_noise([1, 2], (2, 3), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


def test_labels_to_probabilities_is_one_hot_and_zero_where_ignored() -> None:
    labels = torch.tensor([[[[0, 2], [1, 255]], [[3, 2], [-1, 4]]]], dtype=torch.int64)
    probabilities = labels_to_probabilities(labels, num_classes=4)
    assert probabilities.shape == (1, 4, 2, 2, 2) and probabilities.dtype == torch.float32
    # 255, -1 and 4 (out of range) give all zeros; every other voxel exactly one 1 at its class.
    sums = probabilities.sum(1)
    expected_sums = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]]])
    torch.testing.assert_close(sums, expected_sums, rtol=0, atol=0)
    valid = sums[0] > 0
    torch.testing.assert_close(probabilities[0].argmax(0)[valid], labels[0][valid], rtol=0, atol=0)
    uint8 = labels_to_probabilities(torch.tensor([[[[255, 3]]]], dtype=torch.uint8), 4, dtype=torch.float64)
    assert uint8.dtype == torch.float64
    torch.testing.assert_close(uint8[0, :, 0, 0, 0], torch.zeros(4, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(uint8[0, :, 0, 0, 1], torch.tensor([0.0, 0, 0, 1], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# sample_scenes: argument validation (raised before any network runs)


def _camera(batch_size: int, image_size: tuple[int, int] = (32, 48)) -> Camera:
    return Camera(
        intrinsics=torch.eye(3).expand(batch_size, 1, 3, 3),
        voxel_to_camera=torch.eye(4).expand(batch_size, 1, 4, 4),
        voxel_origin=torch.zeros(batch_size, 3),
        voxel_size=torch.full((batch_size,), 0.08),
        image_size=image_size,
    )


@pytest.mark.parametrize(
    ("prompts", "seeds"), [(["a"], [0, 1]), (["a", "b", "c"], [0, 1]), (["a", "b"], [0]), (["a", "b"], [])]
)
def test_sample_scenes_rejects_prompts_or_seeds_that_do_not_match_the_cameras(
    prompts: list[str], seeds: list[int]
) -> None:
    networks: Any = None  # never reached
    generator: Any = SimpleNamespace(latent_scale=1)
    with pytest.raises(ValueError, match="2 cameras but"):
        sample_scenes(generator, networks, networks, networks, prompts, _camera(2), seeds)


def test_sample_scenes_rejects_an_image_size_the_latent_scale_does_not_divide() -> None:
    networks: Any = None
    generator: Any = SimpleNamespace(latent_scale=8)
    with pytest.raises(ValueError, match="not divisible by the latent scale 8"):
        sample_scenes(generator, networks, networks, networks, ["a"], _camera(1, (36, 48)), [0])


# ---------------------------------------------------------------------------------------------------------------
# sample_scenes with the tiny networks


@pytest.fixture(scope="module")
def scenes(nyuv2_root: Path) -> tuple[OccSceneModule, dict[str, Any]]:
    """The tiny joint model (eval mode) and the two fake NYUv2 train scenes, collated."""
    datamodule = NYUv2DataModule(
        root=str(nyuv2_root), grid_size=tiny.GRID, image_size=tiny.IMAGE_SIZE, batch_size=2, color_jitter=0.0
    )
    datamodule.setup("fit")
    module = tiny.build(datamodule).eval()
    dataset = datamodule.datasets["train"]
    return module, collate_samples([dataset[0], dataset[1]])


class Recorder:
    """Forward hooks on the sampling networks that record what each call receives."""

    def __init__(self, module: OccSceneModule) -> None:
        self.generator_batches: list[int] = []
        self.prompts: list[list[str]] = []
        self.occupancies: list[Tensor | None] = []
        self.perceiver_calls = 0
        parts: list[tuple[nn.Module | None, Any]] = [
            (module.generator, self._generator),
            (module.text_encoder, self._text),
            (module.aligner, self._aligner),
            (module.perceiver, self._perceiver),
        ]
        self.handles = [part.register_forward_pre_hook(hook) for part, hook in parts if part is not None]

    def _generator(self, _: nn.Module, args: tuple[Any, ...]) -> None:
        self.generator_batches.append(int(args[0].shape[0]))

    def _text(self, _: nn.Module, args: tuple[Any, ...]) -> None:
        self.prompts.append(list(args[0]))

    def _aligner(self, _: nn.Module, args: tuple[Any, ...]) -> None:
        self.occupancies.append(None if args[0] is None else args[0].detach().clone())

    def _perceiver(self, _: nn.Module, args: tuple[Any, ...]) -> None:
        self.perceiver_calls += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.fixture
def recorder(scenes: tuple[OccSceneModule, dict[str, Any]]) -> Iterator[Recorder]:
    recorder = Recorder(scenes[0])
    yield recorder
    recorder.remove()


def _sample(module: OccSceneModule, batch: dict[str, Any], **kwargs: Any) -> Any:
    assert module.generator is not None and module.text_encoder is not None and module.aligner is not None
    options: dict[str, Any] = {"num_inference_steps": STEPS, "guidance_scale": 1.0, "occupancy_refresh": 1}
    options.update(kwargs)
    return sample_scenes(
        module.generator,
        module.text_encoder,
        module.aligner,
        module.perceiver,
        list(batch["prompt"]),
        OccSceneModule.camera(batch),
        options.pop("seeds", [0, 1]),
        **options,
    )


def test_text_only_mode_conditions_on_the_perceivers_occupancy(
    scenes: tuple[OccSceneModule, dict[str, Any]], recorder: Recorder
) -> None:
    module, batch = scenes
    result = _sample(module, batch)
    assert result.images.shape == (2, 1, 3, *tiny.IMAGE_SIZE) and result.logits.shape[:2] == (2, module.num_classes)
    assert float(result.images.min()) >= 0.0 and float(result.images.max()) <= 1.0
    # Step 0 has no occupancy yet; from step 1 on (refresh 1) the perceiver's softmax on decode(x0_hat) is the
    # condition; the final call perceives the final images.
    assert len(recorder.occupancies) == STEPS and recorder.occupancies[0] is None
    later = recorder.occupancies[1]
    assert later is not None and later.shape == (2, module.num_classes, *tiny.GRID)
    torch.testing.assert_close(later.sum(1), torch.ones(2, *tiny.GRID))
    assert recorder.perceiver_calls == (STEPS - 1) + 1


def test_text_only_refresh_interval_sets_how_often_the_perceiver_runs(
    scenes: tuple[OccSceneModule, dict[str, Any]], recorder: Recorder
) -> None:
    module, batch = scenes
    _sample(module, batch, num_inference_steps=4, occupancy_refresh=2)
    # x0_hat exists from step 1; refreshes at steps 2 (the only i % 2 == 0 after step 0), then the final perception.
    assert recorder.perceiver_calls == 2
    kinds = [occupancy is None for occupancy in recorder.occupancies]
    assert kinds == [True, True, False, False]
    torch.testing.assert_close(recorder.occupancies[2], recorder.occupancies[3], rtol=0, atol=0)


def test_layout_mode_conditions_every_step_on_the_given_layout(
    scenes: tuple[OccSceneModule, dict[str, Any]], recorder: Recorder
) -> None:
    module, batch = scenes
    layout = batch["occupancy"]
    assert (layout == 255).any()  # the ignored voxels are part of what is checked
    _sample(module, batch, condition=layout)
    expected = labels_to_probabilities(layout, module.num_classes)
    assert len(recorder.occupancies) == STEPS
    for occupancy in recorder.occupancies:
        assert occupancy is not None
        torch.testing.assert_close(occupancy, expected, rtol=0, atol=0)
    assert recorder.perceiver_calls == 1  # only the final images are perceived

    # Probabilities are used as given.
    soft = torch.softmax(torch.randn(2, module.num_classes, *tiny.GRID), dim=1)
    recorder.occupancies.clear()
    _sample(module, batch, condition=soft)
    for occupancy in recorder.occupancies:
        torch.testing.assert_close(occupancy, soft, rtol=0, atol=0)


@pytest.mark.parametrize("guidance_scale", [1.0, 0.5, 3.0])
def test_guidance_makes_one_or_two_generator_passes_per_step(
    scenes: tuple[OccSceneModule, dict[str, Any]], recorder: Recorder, guidance_scale: float
) -> None:
    module, batch = scenes
    _sample(module, batch, guidance_scale=guidance_scale)
    prompts = list(batch["prompt"])
    if guidance_scale > 1.0:
        # One doubled pass per step (unconditional and conditional halves); the "" prompts are encoded once.
        assert recorder.generator_batches == [4] * STEPS
        assert recorder.prompts == [prompts, ["", ""]]
    else:
        assert recorder.generator_batches == [2] * STEPS
        assert recorder.prompts == [prompts]


def test_guidance_changes_the_images(scenes: tuple[OccSceneModule, dict[str, Any]]) -> None:
    module, batch = scenes
    plain = _sample(module, batch, guidance_scale=1.0).images
    guided = _sample(module, batch, guidance_scale=3.0).images
    assert not torch.allclose(plain, guided)


def test_a_scene_depends_on_its_seed_not_its_batch(scenes: tuple[OccSceneModule, dict[str, Any]]) -> None:
    module, batch = scenes
    both = _sample(module, batch, condition=batch["occupancy"], seeds=[4, 9]).images
    again = _sample(module, batch, condition=batch["occupancy"], seeds=[4, 9]).images
    torch.testing.assert_close(again, both, rtol=0, atol=0)
    second = {key: value[1:] if isinstance(value, (Tensor, list)) else value for key, value in batch.items()}
    alone = _sample(module, second, condition=batch["occupancy"][1:], seeds=[9]).images
    torch.testing.assert_close(alone[0], both[1], rtol=1e-4, atol=1e-5)
    other_seed = _sample(module, batch, condition=batch["occupancy"], seeds=[5, 9]).images
    assert not torch.allclose(other_seed[0], both[0])
