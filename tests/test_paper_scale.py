"""The paper-scale configs (kitti / nyuv2 / nuscenes_occupancy) at full size, with random weights.

A Stable-Diffusion-v1.5-shaped diffusers folder (UNet 860M, VAE 84M) is written with random weights, open_clip's
ViT-L-14-quickgelu and the EfficientNet-B7 perceiver are randomly initialised, and each dataset gets real-size fake
frames (1241 x 376 / 256 x 256 x 32, 640 x 480 / 60 x 60 x 36, 6 x 1600 x 900 / 512 x 512 x 40).

* ``slow`` (CPU): ``validate`` of every config: perceiver on the real images, generation of one batch with 2 DDIM
  steps, consistency mIoU. Measured on 2 cores: kitti 2:48 at 8.9 GB peak; nyuv2 + nuscenes 6:54 at 17.7 GB peak.
  A CPU training step at this size does not fit 24 GB (UNet + AdamW states + EfficientNet-B7 activations).
* ``gpu``: ``fit`` two joint steps in ``bf16-mixed`` with EMA, then ``validate``, of every config, on one CUDA device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from occscene_pl.cli import main
from tests.conftest import REPO
from tests.fakes.nuscenes_occupancy import write_fake_nuscenes_occupancy
from tests.fakes.nyuv2 import write_fake_nyuv2
from tests.fakes.semantic_kitti import write_fake_semantic_kitti

KITTI_SEQUENCES = ("00", "01", "02", "03", "04", "05", "06", "07", "08", "09", "10")


@pytest.fixture(scope="module")
def sd15_random(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local diffusers folder with Stable Diffusion v1.5's UNet, VAE and scheduler configs, random weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    folder = tmp_path_factory.mktemp("sd15")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8,
    )  # fmt: skip
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD v1.5's UNet
    unet.save_pretrained(folder / "unet")
    del unet
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ).save_pretrained(folder / "vae")  # fmt: skip
    DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, steps_offset=1,
    ).save_pretrained(folder / "scheduler")  # fmt: skip
    return folder


def data_args(config: str, base: Path) -> list[str]:
    """Real-size fake data for ``config``, and the ``--data`` arguments that point at it."""
    if config == "kitti":
        sequences = {s: 2 if s == "08" else 1 for s in KITTI_SEQUENCES}
        write_fake_semantic_kitti(base, sequences=sequences, grid_size=(256, 256, 32), image_size=(1241, 376))
        return ["--data.root", str(base)]
    if config == "nyuv2":
        write_fake_nyuv2(base, split_counts={"train": 2, "test": 2}, grid_size=(60, 60, 36))
        return ["--data.root", str(base)]
    root, occupancy_root = base / "nuscenes", base / "nuScenes-Occupancy"
    write_fake_nuscenes_occupancy(
        root, occupancy_root, split_counts={"train": 2, "val": 2}, grid_size=(512, 512, 40), image_size=(1600, 900)
    )
    return ["--data.root", str(root), "--data.occupancy_root", str(occupancy_root)]


def common_args(config: str, sd15: Path, run_dir: Path) -> list[str]:
    return [
        "--config", str(REPO / "configs" / f"{config}.yaml"),
        "--data.num_workers", "0",
        "--model.generator.pretrained", str(sd15),
        "--model.text_encoder.pretrained", "null",
        "--model.perceiver.pretrained", "null",
        "--model.sampling.num_inference_steps", "2",
        "--model.evaluation.generation_batches", "1",
        "--data.batch_size", "1",
        "--trainer.default_root_dir", str(run_dir),
    ]  # fmt: skip


CONFIGS = ["kitti", "nyuv2", "nuscenes_occupancy"]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("config", CONFIGS)
def test_paper_scale_validate_on_cpu(config: str, sd15_random: Path, tmp_path: Path) -> None:
    args = common_args(config, sd15_random, tmp_path / "run") + data_args(config, tmp_path / "data")
    main(["validate", *args, "--model.ema_decay", "null", "--trainer.accelerator", "cpu", "--trainer.precision", "32"])


@pytest.mark.gpu
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("config", CONFIGS)
def test_paper_scale_fit_and_validate_on_gpu(config: str, sd15_random: Path, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device")
    args = common_args(config, sd15_random, tmp_path / "run") + data_args(config, tmp_path / "data")
    gpu = ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed"]
    steps = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.num_sanity_val_steps", "0"]
    main(["fit", *args, *gpu, *steps])
    last = next((tmp_path / "run").rglob("last.ckpt"))
    main(["validate", *args, *gpu, "--ckpt_path", str(last)])
