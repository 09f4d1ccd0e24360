"""Ray-cast rendering timings: a street-sized occupancy render and one demo frame's image and simulated scan.

``render_occupancy_ms``: :func:`occscene_pl.render.render_occupancy` of a 64 x 64 x 8 street grid of 0.8 m (road,
a building row, a green strip, a car) at 128 x 384 px with texture noise, the size the demo renders at (~70 ms on
one idle core when this was written). ``demo_frame_image_ms`` and ``demo_frame_scan_ms``: the two ray-casting steps
of writing one demo frame (``data.demo.rendering``: the camera image and the HDL-64E scan of 64 x 360 beams) on a
procedural street. Each time is the median (and the minimum) of ``repeats`` calls after one warm-up call.

Usage: ``python benchmarks/bench_render.py``
"""

from __future__ import annotations

import json
import pathlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from occscene_pl.data.demo.rendering import lidar_scan, render_demo_image
from occscene_pl.data.demo.streets import generate_street_scene
from occscene_pl.render import CLASS_COLORS_KITTI, render_occupancy

# A camera 1.73 m above the road looking along +x (KITTI-like), intrinsics of a 384-px-wide image.
STREET_TR = np.array([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, -0.05], [1.0, 0.0, 0.0, -0.27], [0.0, 0.0, 0.0, 1.0]])
STREET_K = np.array([[222.4, 0.0, 187.5], [0.0, 222.4, 62.7], [0.0, 0.0, 1.0]])
STREET_ORIGIN = (0.0, -25.6, -2.0)
STREET_VOXEL = 0.8
IMAGE_SIZE = (128, 384)


def street_grid() -> np.ndarray:
    """The 64 x 64 x 8 street of the benchmark: road everywhere, buildings right, vegetation left, one car ahead."""
    grid = np.zeros((64, 64, 8), dtype=np.uint8)
    grid[:, :, 0] = 9  # road
    grid[:, :20, :6] = 13  # building
    grid[:, 44:, :4] = 15  # vegetation
    grid[20:26, 30:33, 1:3] = 1  # car
    return grid


def _times_ms(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return {"median_ms": round(statistics.median(times), 1), "min_ms": round(min(times), 1)}


def run(out_dir: pathlib.Path, repeats: int = 5) -> dict[str, Any]:
    """Time the renders.

    Args:
        out_dir: unused (the results are returned; ``benchmarks/run.py`` writes them).
        repeats: timed calls per measurement.

    Returns:
        ``{"render_occupancy": {...}, "demo_frame_image": {...}, "demo_frame_scan": {...}}`` in milliseconds.
    """
    grid = street_grid()

    def street() -> np.ndarray:
        return render_occupancy(
            grid, STREET_ORIGIN, STREET_VOXEL, STREET_K, STREET_TR, IMAGE_SIZE, CLASS_COLORS_KITTI, texture_noise=0.05
        )

    scene = generate_street_scene(np.random.default_rng(0))
    return {
        "render_occupancy": {"image_size": list(IMAGE_SIZE), **_times_ms(street, repeats)},
        "demo_frame_image": _times_ms(lambda: render_demo_image(scene, IMAGE_SIZE, np.random.default_rng(0)), repeats),
        "demo_frame_scan": _times_ms(lambda: lidar_scan(scene, STREET_VOXEL), repeats),
    }


if __name__ == "__main__":
    print(json.dumps(run(pathlib.Path(".")), indent=2))
