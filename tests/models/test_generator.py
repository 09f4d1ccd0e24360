"""SceneGenerator: training targets, closed-form x0, sampling, residual layout, pixel/latent modes, save/load."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from occscene_pl.models import ResidualSpec, SceneGenerator

# diffusers' sigma-based schedulers call np.array(tensor, copy=False) (numpy 2 deprecation, not ours).
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

TEXT_DIM = 8
UNET: dict[str, Any] = dict(
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_DIM,
    attention_head_dim=4,
    norm_num_groups=4,
)
VAE: dict[str, Any] = dict(
    block_out_channels=[8, 16],
    latent_channels=4,
    norm_num_groups=4,
    layers_per_block=1,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
)


def _generator(latent: bool, seed: int = 0, **kwargs: Any) -> SceneGenerator:
    torch.manual_seed(seed)
    return SceneGenerator(unet=UNET, vae=VAE if latent else None, **kwargs)


def _text(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 5, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def _images(n: int, size: tuple[int, int] = (16, 16), seed: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("latent", [False, True])
def test_training_step_reaches_unet_not_vae(latent: bool) -> None:
    gen = _generator(latent).train()
    latents = gen.encode(_images(2))
    noisy, target, t = gen.training_targets(latents, torch.Generator().manual_seed(0))
    out = gen(noisy, t, _text(2))
    # The perception term back-propagates through decode(x0_hat) into the UNet, across the frozen decoder.
    loss = F.mse_loss(out, target) + gen.decode(gen.predict_x0(noisy, out, t)).mean()
    loss.backward()
    unet_grads = [p.grad for p in gen.unet.parameters()]
    assert all(g is not None for g in unet_grads)
    assert sum(float(g.abs().sum()) for g in unet_grads) > 0
    if latent:
        assert gen.vae is not None and not gen.vae.training
        assert all(not p.requires_grad and p.grad is None for p in gen.vae.parameters())
    assert {n for n, p in gen.named_parameters() if p.requires_grad} == {
        f"unet.{n}" for n, _ in gen.unet.named_parameters()
    }


def test_unfrozen_vae_trains() -> None:
    gen = _generator(True, freeze_vae=False).train()
    assert gen.vae is not None and gen.vae.training
    assert all(p.requires_grad for p in gen.vae.parameters())


def _reference_alphas_cumprod(num: int = 1000) -> torch.Tensor:
    """DDPM's linear beta schedule (Ho et al.), diffusers' DDPMScheduler default, in float64."""
    betas = torch.linspace(1e-4, 0.02, num, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_targets_and_predict_x0_closed_form(prediction_type: str) -> None:
    gen = _generator(False, scheduler={"prediction_type": prediction_type})
    z0 = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    noisy, target, t = gen.training_targets(z0, torch.Generator().manual_seed(4))
    assert t.dtype == torch.long and t.shape == (6,) and int(t.min()) >= 0 and int(t.max()) < 1000
    a = _reference_alphas_cumprod()[t].float()
    assert torch.allclose(gen.alphas_cumprod(t), a, atol=1e-6)
    a = a.view(-1, 1, 1, 1)
    eps = (noisy - a.sqrt() * z0) / (1 - a).sqrt()  # the noise that was added
    assert eps.std() == pytest.approx(1.0, abs=0.3)
    expected_target = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * z0, "sample": z0}
    assert torch.allclose(target, expected_target[prediction_type], atol=1e-4)
    # The true target inverts to z0; an arbitrary output follows the closed form.
    assert torch.allclose(gen.predict_x0(noisy, target, t), z0, atol=1e-4)
    out = torch.randn_like(z0)
    closed = {
        "epsilon": (noisy - (1 - a).sqrt() * out) / a.sqrt(),
        "v_prediction": a.sqrt() * noisy - (1 - a).sqrt() * out,
        "sample": out,
    }
    assert torch.allclose(gen.predict_x0(noisy, out, t), closed[prediction_type], atol=1e-4, rtol=1e-4)


def test_training_targets_seeded() -> None:
    gen = _generator(False)
    z0 = torch.randn(3, 3, 4, 4)
    first = gen.training_targets(z0, torch.Generator().manual_seed(7))
    second = gen.training_targets(z0, torch.Generator().manual_seed(7))
    third = gen.training_targets(z0, torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    assert not torch.equal(first[0], third[0])


@pytest.mark.parametrize(
    ("sampler", "cls"),
    [
        ("ddim", DDIMScheduler),
        ("dpmsolver++", DPMSolverMultistepScheduler),
        ("ddpm", DDPMScheduler),
        ("euler", EulerDiscreteScheduler),
    ],
)
@pytest.mark.parametrize("latent", [False, True])
def test_sampling_steps_finite(sampler: str, cls: type, latent: bool) -> None:
    gen = _generator(
        latent, sampler=sampler, scheduler={"prediction_type": "v_prediction", "clip_sample": False}
    ).eval()
    scheduler = gen.make_sampler(3)
    assert type(scheduler) is cls and scheduler is not gen.noise_scheduler
    assert scheduler.config.prediction_type == "v_prediction" and len(scheduler.timesteps) == 3
    if sampler == "dpmsolver++":
        assert scheduler.config.algorithm_type == "dpmsolver++"
    shape = (2, gen.latent_channels, 8 // gen.latent_scale * 2, 8 // gen.latent_scale * 2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * scheduler.init_noise_sigma
    text = _text(2)
    with torch.no_grad():
        for t in scheduler.timesteps:
            scaled = scheduler.scale_model_input(x, t)
            out = gen(scaled, t, text)
            step = scheduler.step(out, t, x)
            if hasattr(step, "pred_original_sample"):  # our closed form agrees with the scheduler's own x0
                assert torch.allclose(gen.predict_x0(scaled, out, t), step.pred_original_sample, atol=1e-4, rtol=1e-4)
            x = step.prev_sample
        images = gen.decode(x)
    assert x.shape == shape and torch.isfinite(x).all()
    assert images.shape == (2, 3, shape[2] * gen.latent_scale, shape[3] * gen.latent_scale)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    # Sampling never touched the training schedule.
    assert gen.noise_scheduler.num_inference_steps is None and len(gen.noise_scheduler.timesteps) == 1000


def test_pixel_space_mode() -> None:
    gen = _generator(False)
    images = _images(2, (12, 20))
    latents = gen.encode(images)
    assert gen.vae is None and gen.latent_channels == 3 and gen.latent_scale == 1
    assert torch.equal(latents, images * 2 - 1)
    assert torch.allclose(gen.decode(latents), images, atol=1e-6)
    assert torch.equal(gen.decode(torch.full((1, 3, 2, 2), 3.0)), torch.ones(1, 3, 2, 2))  # clamped
    assert gen.noise_scheduler.config.clip_sample is True


def test_latent_mode() -> None:
    gen = _generator(True)
    assert gen.vae is not None
    images = _images(2, (16, 24))
    latents = gen.encode(images)
    assert gen.latent_channels == 4 and gen.latent_scale == 2 and latents.shape == (2, 4, 8, 12)
    assert torch.equal(latents, gen.encode(images))  # the posterior mean: deterministic
    mean = gen.vae.encode(images * 2 - 1).latent_dist.mean
    assert torch.allclose(latents, mean * gen.vae.config.scaling_factor)
    assert gen.decode(latents).shape == images.shape
    assert gen.noise_scheduler.config.clip_sample is False
    # use_vae=False ignores the VAE: pixel space.
    assert _generator(True, use_vae=False).vae is None


def _hooked_residual_shapes(gen: SceneGenerator, latent: torch.Tensor) -> tuple[list[torch.Size], torch.Size]:
    """The skip features and mid output the UNet actually produces (read off forward hooks, not the config)."""
    down: list[torch.Size] = []
    mid: list[torch.Size] = []
    unet = gen.unet
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: down.append(o.shape))]
    hooks += [b.register_forward_hook(lambda m, i, o: down.extend(r.shape for r in o[1])) for b in unet.down_blocks]
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: mid.append(o.shape)))
    with torch.no_grad():
        gen(latent, 10, _text(latent.shape[0]))
    for hook in hooks:
        hook.remove()
    return down, mid[0]


RESIDUAL_CASES = [
    # (UNet overrides, expected channels, expected downsample, mid channels, mid downsample)
    (
        dict(
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        ),
        [8, 8, 8, 16, 16, 16],
        [1, 1, 2, 2, 4, 4],
        16,
        4,
    ),
    (
        dict(
            block_out_channels=(8, 16),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ),
        [8, 8, 8, 8, 16, 16],
        [1, 1, 1, 2, 2, 2],
        16,
        2,
    ),
]


@pytest.mark.parametrize(("overrides", "channels", "downsample", "mid_channels", "mid_downsample"), RESIDUAL_CASES)
@pytest.mark.parametrize("size", [(8, 12), (10, 14)])
def test_residual_spec_accepted_by_unet(
    overrides: dict[str, Any],
    channels: list[int],
    downsample: list[int],
    mid_channels: int,
    mid_downsample: int,
    size: tuple[int, int],
) -> None:
    torch.manual_seed(0)
    gen = SceneGenerator(unet={**UNET, **overrides}).eval()
    spec = gen.residual_spec()
    assert spec == ResidualSpec(channels, downsample, mid_channels, mid_downsample)
    latent = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(6))
    down_shapes, mid_shape = spec.shapes(2, *size)
    hooked_down, hooked_mid = _hooked_residual_shapes(gen, latent)
    assert [tuple(s) for s in hooked_down] == down_shapes and tuple(hooked_mid) == mid_shape

    text, t = _text(2), torch.tensor([10, 500])
    with torch.no_grad():
        plain = gen(latent, t, text)
        zeros = gen(latent, t, text, [torch.zeros(s) for s in down_shapes], torch.zeros(mid_shape))
        g = torch.Generator().manual_seed(9)
        mid_only = gen(latent, t, text, [torch.zeros(s) for s in down_shapes], torch.randn(mid_shape, generator=g))
        random = gen(latent, t, text, [torch.randn(s, generator=g) for s in down_shapes], torch.zeros(mid_shape))
    assert torch.equal(zeros, plain)
    assert plain.shape == latent.shape
    assert not torch.allclose(mid_only, plain, atol=1e-4) and not torch.allclose(random, plain, atol=1e-4)


def test_residual_argument_errors() -> None:
    gen = _generator(False).eval()
    latent, text = torch.randn(1, 3, 8, 8), _text(1)
    down_shapes, mid_shape = gen.residual_spec().shapes(1, 8, 8)
    with pytest.raises(ValueError, match="together"):
        gen(latent, 1, text, [torch.zeros(s) for s in down_shapes])
    with pytest.raises(ValueError, match=f"expected {len(down_shapes)} down residuals"):
        gen(latent, 1, text, [torch.zeros(s) for s in down_shapes[:-1]], torch.zeros(mid_shape))
    with pytest.raises(ValueError, match=rf"\(N, L, {TEXT_DIM}\)"):
        gen(latent, 1, torch.randn(1, 5, TEXT_DIM + 1))
    with pytest.raises(ValueError, match="downsample factor per channel"):
        ResidualSpec([1, 2], [1], 2, 2)


@pytest.mark.parametrize("latent", [False, True])
def test_save_load_round_trip(latent: bool, tmp_path: Path) -> None:
    gen = _generator(latent, seed=3, scheduler={"prediction_type": "v_prediction"}).eval()
    gen.save_pretrained(tmp_path / "gen")
    assert (tmp_path / "gen" / "vae").is_dir() == latent
    loaded = SceneGenerator.from_folder(tmp_path / "gen", sampler="dpmsolver++").eval()
    assert (loaded.vae is None) == (not latent) and loaded.prediction_type == "v_prediction"
    assert loaded.residual_spec() == gen.residual_spec() and loaded.latent_scale == gen.latent_scale
    x = torch.randn(2, gen.latent_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 900])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, _text(2)), gen(x, t, _text(2)))
        assert torch.equal(loaded.decode(x), gen.decode(x))
    assert type(loaded.make_sampler(2)) is DPMSolverMultistepScheduler
    if latent:  # use_vae=False ignores the folder's VAE; this latent UNet then cannot run in pixel space.
        with pytest.raises(ValueError, match="in_channels=4 but pixel space"):
            SceneGenerator.from_folder(tmp_path / "gen", use_vae=False)


def test_save_pixel_model_over_vae_folder_refused(tmp_path: Path) -> None:
    _generator(True).save_pretrained(tmp_path)
    with pytest.raises(FileExistsError, match="vae"):
        _generator(False).save_pretrained(tmp_path)


def test_pretrained_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*does not exist.*unet/ and scheduler/"):
        SceneGenerator(pretrained=str(missing))
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=r"unet[/\\]config\.json"):
        SceneGenerator(pretrained=str(folder))
    _generator(False).save_pretrained(folder)
    for weights in (folder / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match="has no weights"):
        SceneGenerator(pretrained=str(folder))
    _generator(False).save_pretrained(folder)
    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"scheduler[/\\]scheduler_config\.json"):
        SceneGenerator(pretrained=str(folder))
    with pytest.raises(ValueError, match="not both"):
        SceneGenerator(pretrained=str(folder), unet=UNET)


def test_construction_errors() -> None:
    with pytest.raises(ValueError, match="needs `pretrained`"):
        SceneGenerator()
    with pytest.raises(ValueError, match="unknown sampler"):
        SceneGenerator(unet=UNET, sampler="plms")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="in_channels=4 but pixel space"):
        SceneGenerator(unet={**UNET, "in_channels": 4})
    with pytest.raises(ValueError, match="in_channels=3 but the VAE latent has 4"):
        SceneGenerator(unet={**UNET, "in_channels": 3, "out_channels": 3}, vae=VAE)


def test_pretrained_scheduler_overrides(tmp_path: Path) -> None:
    _generator(False).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DDPMScheduler" and config["prediction_type"] == "epsilon"
    loaded = SceneGenerator(pretrained=str(tmp_path), scheduler={"prediction_type": "v_prediction"})
    assert loaded.prediction_type == "v_prediction"


def test_gradient_checkpointing_same_gradients() -> None:
    grads = []
    for checkpointing in (False, True):
        gen = _generator(True, gradient_checkpointing=checkpointing).train()
        assert gen.unet.is_gradient_checkpointing == checkpointing
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        gen.decode(gen(x, torch.tensor([5, 50]), _text(2))).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in gen.unet.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    assert not math.isclose(float(grads[0].abs().sum()), 0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rng_device", ["cpu", "cuda"])
def test_cuda_devices(rng_device: str) -> None:
    gen = _generator(True, scheduler={"prediction_type": "v_prediction"}).cuda()
    latents = gen.encode(_images(2).cuda())
    noisy, target, t = gen.training_targets(latents, torch.Generator(rng_device).manual_seed(0))
    assert noisy.is_cuda and target.is_cuda and t.is_cuda and gen.alphas_cumprod(t).is_cuda
    assert torch.allclose(gen.predict_x0(noisy, target, t), latents, atol=1e-4)
    scheduler = gen.make_sampler(2, device="cuda")
    with torch.no_grad():
        for step_t in scheduler.timesteps:
            noisy = scheduler.step(gen(noisy, step_t, _text(2).cuda()), step_t, noisy).prev_sample
    assert torch.isfinite(noisy).all()
