"""Shared fixtures and constants: fake dataset roots in the real on-disk formats (written once per test session),
one intra-op thread, skipping ``gpu`` tests without CUDA, and the paths of the repository and the tiny config."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.fakes.nuscenes_occupancy import write_fake_nuscenes_occupancy
from tests.fakes.nyuv2 import write_fake_nyuv2
from tests.fakes.semantic_kitti import write_fake_semantic_kitti

REPO = Path(__file__).parents[1]
# The tiny model overlay of the CLI tests (random-init networks of a few kilobytes).
TINY = str(REPO / "tests" / "configs" / "tiny.yaml")
KITTI_SEQUENCES = ("00", "01", "02", "03", "04", "05", "06", "07", "08", "09", "10")


def csv_logger(save_dir: Path) -> str:
    """A ``--trainer.logger`` argument selecting a CSVLogger writing under ``save_dir``."""
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(save_dir)}}
    return f"--trainer.logger={json.dumps(logger)}"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI also looks at sys.argv; give it the program name only, as a user's shell would."""
    monkeypatch.setattr(sys, "argv", ["occscene-pl"])


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread per test module, restored after it.

    The test machine is small and shared, and the tests' tiny ops only gain synchronisation stalls from more
    threads (10-50x slower on two cores).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped, not failed, where CUDA is not available (``make test-gpu`` on a CPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu test: CUDA is not available")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kitti_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every train and val sequence with one frame (MonoScene requires every sequence of a split)."""
    root = tmp_path_factory.mktemp("semantic_kitti")
    write_fake_semantic_kitti(
        root, sequences={s: 1 for s in KITTI_SEQUENCES}, grid_size=(32, 32, 4), image_size=(96, 40)
    )
    return root


@pytest.fixture(scope="session")
def nyuv2_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nyuv2")
    write_fake_nyuv2(root, split_counts={"train": 2, "test": 1}, grid_size=(8, 8, 4))
    return root


@pytest.fixture(scope="session")
def nuscenes_roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("nuscenes")
    root, occupancy_root = base / "nuscenes", base / "nuScenes-Occupancy"
    write_fake_nuscenes_occupancy(root, occupancy_root, split_counts={"train": 2, "val": 1}, grid_size=(64, 64, 5))
    return root, occupancy_root
