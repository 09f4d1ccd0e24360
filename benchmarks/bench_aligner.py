"""MDA aligner at the KITTI paper config: forward and forward+backward time, ``frustum_sampling`` point vs splat.

Built as ``configs/kitti.yaml`` builds it (``model.aligner``: embed 32, 32 linear depth bins over [2, 52] m, patch
(4, 2, 2), 2 Mamba layers, deformable conv, gradient checkpointing) for Stable Diffusion v1.5's residual layout
(``d_model`` 320), with random weights (output convs re-drawn so the residuals and their gradients are not zero),
batch 1, float32, on SemanticKITTI's 256 x 256 x 32 grid of 0.2 m seen by sequence 00's camera 2 at 320 x 1024
(latent 40 x 128). Occupancy: random class probabilities; backward reaches them (the perceiver's output is
differentiated through the aligner in joint training). Timed: the frustum volume alone (``frustum_volume``: embedding
+ resampling, the part the mode changes) and the whole aligner, each forward (no grad) and forward+backward. Times
are medians of ``repeats`` rounds after one warm-up round with ``threads`` torch threads; both modes run in the same
process, alternating inside every round, so their times are comparable.

Usage: ``python benchmarks/bench_aligner.py --out bench-results``
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
from bench_models import backward_step  # benchmarks/ is on sys.path (run.py, or running this file)

from occscene_pl.camera import Camera
from occscene_pl.config_files import read_config
from occscene_pl.models import MambaDualAlignment
from occscene_pl.models.generator import ResidualSpec

CONFIG = pathlib.Path(__file__).parents[1] / "configs" / "kitti.yaml"
GRID = (256, 256, 32)
NUM_CLASSES = 20
IMAGE_SIZE = (320, 1024)
# UNet2DConditionModel of Stable Diffusion v1.5: conv_in, 3 x (2 layers + downsampler), 2 layers; mid 1280 at /8.
SD15_SPEC = ResidualSpec(
    channels=[320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280],
    downsample=[1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8],
    mid_channels=1280,
    mid_downsample=8,
)


def kitti_camera() -> dict[str, torch.Tensor]:
    """Sequence 00: ``K = P2[:3, :3]`` of the 1220 x 370 crop resized to 1024 x 320, ``voxel_to_camera = Tr``."""
    sx, sy = IMAGE_SIZE[1] / 1220.0, IMAGE_SIZE[0] / 370.0
    fx, cx, cy = 718.856, 607.1928, 185.2157
    intrinsics = torch.tensor(
        [[fx * sx, 0.0, (cx + 0.5) * sx - 0.5], [0.0, fx * sy, (cy + 0.5) * sy - 0.5], [0.0, 0.0, 1.0]]
    )
    tr = torch.tensor(
        [
            [4.276802385584e-04, -9.999672484946e-01, -8.084491683471e-03, -1.198459927713e-02],
            [-7.210626507497e-03, 8.081198471645e-03, -9.999413164504e-01, -5.403984729748e-02],
            [9.999738645903e-01, 4.859485810390e-04, -7.206933692422e-03, -2.921968648686e-01],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    return {
        "intrinsics": intrinsics[None, None],
        "voxel_to_camera": tr[None, None],
        "voxel_origin": torch.tensor([[0.0, -25.6, -2.0]]),
        "voxel_size": torch.tensor([0.2]),
    }


def run(out_dir: pathlib.Path, repeats: int = 3, threads: int = 2) -> dict[str, Any]:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        options = dict(read_config(CONFIG)["model"]["aligner"])  # with configs/base.yaml merged
        camera = kitti_camera()
        h, w = IMAGE_SIZE[0] // 8, IMAGE_SIZE[1] // 8
        generator = torch.Generator().manual_seed(0)
        occupancy = torch.softmax(torch.randn(1, NUM_CLASSES, *GRID, generator=generator), dim=1)
        latents = torch.randn(1, 4, h, w, generator=generator)
        cases: dict[str, dict[str, Callable[[], None]]] = {}
        for mode in ("point", "splat"):
            torch.manual_seed(0)
            aligner = MambaDualAlignment(NUM_CLASSES, SD15_SPEC, 4, frustum_sampling=mode, **options)
            for conv in [*aligner.down_convs, aligner.mid_conv]:
                torch.nn.init.normal_(conv.weight, std=1e-3)
            probabilities = occupancy.clone().requires_grad_(True)

            def volume(aligner: MambaDualAlignment = aligner, probabilities: torch.Tensor = probabilities) -> Any:
                return aligner.frustum_volume(probabilities, **camera, image_size=IMAGE_SIZE, latent_size=(h, w))

            def forward(aligner: MambaDualAlignment = aligner, probabilities: torch.Tensor = probabilities) -> Any:
                return aligner(probabilities, Camera(**camera, image_size=IMAGE_SIZE), latents)

            def no_grad(fn: Callable[[], Any]) -> Callable[[], None]:
                def step() -> None:
                    with torch.no_grad():
                        fn()

                return step

            cases[mode] = {
                "frustum_volume_forward_s": no_grad(volume),
                "frustum_volume_forward_backward_s": backward_step(volume),
                "forward_s": no_grad(forward),
                "forward_backward_s": backward_step(forward),
            }
        # Modes alternate inside every repeat (after one warm-up round), so load drifts hit both alike.
        times: dict[str, dict[str, list[float]]] = {mode: {key: [] for key in steps} for mode, steps in cases.items()}
        for round_index in range(repeats + 1):
            for key in cases["point"]:
                for mode, steps in cases.items():
                    start = time.perf_counter()
                    steps[key]()
                    if round_index:
                        times[mode][key].append(time.perf_counter() - start)
        medians = {
            mode: {key: round(statistics.median(values), 4) for key, values in per_key.items()}
            for mode, per_key in times.items()
        }
        return {
            "config": CONFIG.name,
            "aligner": options,
            "grid": list(GRID),
            "image_size": list(IMAGE_SIZE),
            "latent_size": [h, w],
            "batch": 1,
            "dtype": "float32",
            "torch_threads": threads,
            "repeats": repeats,
            "frustum_sampling": medians,
        }
    finally:
        torch.set_num_threads(previous_threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-results"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args.out, args.repeats, args.threads)
    (args.out / "aligner.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
