"""Parameter counts and CPU time per forward (and forward+backward) of each network at the demo size.

The components are built exactly as ``configs/demo.yaml`` builds them (the same ``model`` section), with a batch of
``data.batch_size`` scenes at ``data.image_size`` on the demo grid. Times are medians of ``repeats`` runs after one
warm-up, with PyTorch's default thread count.

Usage: ``python benchmarks/bench_models.py --out bench-results``
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import yaml

from occscene_pl.camera import Camera
from occscene_pl.models import MambaDualAlignment, OccupancyPerceiver, SceneGenerator, TextEncoder
from occscene_pl.sampling import labels_to_probabilities

CONFIG = pathlib.Path(__file__).parents[1] / "configs" / "demo.yaml"
GRID = (64, 64, 8)
NUM_CLASSES = 20


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4)


def backward_step(fn: Callable[[], Any]) -> Callable[[], None]:
    """A step that runs ``fn`` and back-propagates a mean-square loss of its output (a tensor, or the aligner's
    ``(down residuals, mid residual)``)."""

    def step() -> None:
        out = fn()
        if isinstance(out, tuple):
            down, mid = out
            loss = sum(d.square().mean() for d in down) + mid.square().mean()
        else:
            loss = out.square().mean()
        loss.backward()

    return step


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _kitti_like_camera(batch: int, height: int, width: int) -> dict[str, torch.Tensor]:
    """KITTI sequence-00 left colour camera rescaled to ``(height, width)`` (demo extent: x forward, y left, z up)."""
    sx, sy = width / 1220.0, height / 370.0
    intrinsics = torch.tensor([[707.09 * sx, 0.0, 601.89 * sx], [0.0, 707.09 * sy, 183.11 * sy], [0.0, 0.0, 1.0]])
    to_camera = torch.eye(4)
    to_camera[:3, :3] = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    to_camera[:3, 3] = torch.tensor([0.0, -0.08, -0.27])
    return {
        "intrinsics": intrinsics.expand(batch, 1, 3, 3).clone(),
        "voxel_to_camera": to_camera.expand(batch, 1, 4, 4).clone(),
        "voxel_origin": torch.tensor([0.0, -25.6, -2.0]).expand(batch, 3).clone(),
        "voxel_size": torch.full((batch,), 51.2 / GRID[0]),
    }


def run(out_dir: pathlib.Path, repeats: int = 5) -> dict[str, Any]:
    config = yaml.safe_load(CONFIG.read_text())
    model_cfg, data_cfg = config["model"], config["data"]["init_args"]
    batch = int(data_cfg["batch_size"])
    height, width = (int(s) for s in data_cfg["image_size"])
    torch.manual_seed(0)
    generator = SceneGenerator(**model_cfg["generator"])
    text_encoder = TextEncoder(**model_cfg["text_encoder"])
    aligner = MambaDualAlignment(
        NUM_CLASSES, generator.residual_spec(), generator.latent_channels, **model_cfg["aligner"]
    )
    perceiver = OccupancyPerceiver(NUM_CLASSES, GRID, **model_cfg["perceiver"])
    camera = _kitti_like_camera(batch, height, width)
    images = torch.rand(batch, 1, 3, height, width)
    occupancy = labels_to_probabilities(torch.randint(0, NUM_CLASSES, (batch, *GRID)), NUM_CLASSES)
    noisy = torch.randn(batch, generator.latent_channels, height, width)
    timesteps = torch.randint(0, 1000, (batch,))
    prompts = ["a driving scene with road, sidewalk, building, vegetation and car"] * batch
    text = text_encoder(prompts)
    cam = (camera["intrinsics"], camera["voxel_to_camera"], camera["voxel_origin"], camera["voxel_size"])
    # Non-zero output convs so the residuals (and their gradients) are not trivially zero.
    for conv in [*aligner.down_convs, aligner.mid_conv]:
        torch.nn.init.normal_(conv.weight, std=1e-3)

    def unet_fwd() -> torch.Tensor:
        return generator(noisy, timesteps, text)

    def aligner_fwd() -> Any:
        return aligner(occupancy, Camera(*cam, (height, width)), noisy)

    def perceiver_fwd() -> torch.Tensor:
        return perceiver(images, Camera(*cam, (height, width)))["logits"]

    components: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        components["text_encoder"] = {
            "params": _params(text_encoder),
            "forward_s": _median_s(lambda: text_encoder(prompts), repeats),
        }
        components["unet"] = {"params": _params(generator.unet), "forward_s": _median_s(unet_fwd, repeats)}
        components["aligner"] = {"params": _params(aligner), "forward_s": _median_s(aligner_fwd, repeats)}
        components["perceiver"] = {"params": _params(perceiver), "forward_s": _median_s(perceiver_fwd, repeats)}
    components["unet"]["forward_backward_s"] = _median_s(backward_step(unet_fwd), repeats)
    components["aligner"]["forward_backward_s"] = _median_s(backward_step(aligner_fwd), repeats)
    components["perceiver"]["forward_backward_s"] = _median_s(backward_step(perceiver_fwd), repeats)
    return {
        "config": str(CONFIG.name),
        "batch": batch,
        "image_size": [height, width],
        "grid": list(GRID),
        "torch_threads": torch.get_num_threads(),
        "components": components,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-results"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args.out, args.repeats)
    (args.out / "models.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
