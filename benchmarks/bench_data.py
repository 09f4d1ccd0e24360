"""Data-layer timings: demo dataset generation, loading one full-size sample of each dataset, NYUv2's 1:4 targets.

Full-size samples are written in the real formats by the test fakes (the real datasets cannot be downloaded here):
SemanticKITTI 256x256x32 + a 1241x376 PNG, NYUv2 a 240x144x240 RLE + a 640x480 JPEG, nuScenes-Occupancy six
1600x900 JPEGs + a sparse 512x512x40 ground truth. Each load is timed as the median of several ``dataset[0]`` calls
at the native image size (no resize), after one warm-up call (which, for NYUv2, also fills the target cache; the
cold decode is reported separately). ``nyuv2_downsample_full_grid_ms`` times MonoScene's label downsampling
(``downsample_labels``, 1:4) of one full 240 x 144 x 240 NYUv2 grid, the median of several calls (under 1 s).
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the fakes live in tests/, which is not an installed package
    sys.path.insert(0, str(REPO))

from occscene_pl.data.demo import generate_demo_dataset  # noqa: E402
from occscene_pl.data.nuscenes_occupancy import NuScenesOccupancyDataset  # noqa: E402
from occscene_pl.data.nyuv2 import NYUv2Dataset, downsample_labels  # noqa: E402
from occscene_pl.data.semantic_kitti import SemanticKittiDataset  # noqa: E402
from tests.fakes.nuscenes_occupancy import write_fake_nuscenes_occupancy  # noqa: E402
from tests.fakes.nyuv2 import write_fake_nyuv2  # noqa: E402
from tests.fakes.semantic_kitti import write_fake_semantic_kitti  # noqa: E402


def _median_ms(fn: Callable[[], Any], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def run(out_dir: pathlib.Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = pathlib.Path(tmp)

        start = time.perf_counter()
        generate_demo_dataset(tmp_path / "demo", num_train=320, num_val=64, seed=0)
        results["demo_generation_s"] = {"scenes": 384, "seconds": round(time.perf_counter() - start, 2)}

        write_fake_semantic_kitti(
            tmp_path / "kitti", sequences={"08": 1}, grid_size=(256, 256, 32), image_size=(1241, 376)
        )
        kitti = SemanticKittiDataset(tmp_path / "kitti", split="val")
        kitti[0]
        results["semantic_kitti_sample_ms"] = round(_median_ms(lambda: kitti[0]), 1)

        written = write_fake_nyuv2(tmp_path / "nyu", split_counts={"test": 1}, grid_size=(60, 60, 36))
        labels12 = written["scenes"]["test"][0]["labels12"]
        downsample_labels(labels12, 4)
        results["nyuv2_downsample_full_grid_ms"] = round(_median_ms(lambda: downsample_labels(labels12, 4)), 1)
        cache = tmp_path / "nyu_cache"
        nyu = NYUv2Dataset(tmp_path / "nyu", split="test", cache_dir=cache)
        start = time.perf_counter()
        nyu[0]
        results["nyuv2_sample_cold_ms"] = round(1000 * (time.perf_counter() - start), 1)
        results["nyuv2_sample_ms"] = round(_median_ms(lambda: nyu[0]), 1)

        nusc_root, occ_root = tmp_path / "nuscenes", tmp_path / "nuScenes-Occupancy"
        write_fake_nuscenes_occupancy(
            nusc_root, occ_root, split_counts={"val": 1}, grid_size=(512, 512, 40), image_size=(1600, 900)
        )
        nusc = NuScenesOccupancyDataset(nusc_root, occ_root, split="val")
        nusc[0]
        results["nuscenes_occupancy_sample_ms"] = round(_median_ms(lambda: nusc[0], repeats=3), 1)
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(run(pathlib.Path(".")), indent=2))
