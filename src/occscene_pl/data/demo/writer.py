"""Writing the demo dataset in the SemanticKITTI layout, in worker processes, seeded and atomic.

Generation is seeded per frame (the same seed gives byte-identical files on any number of workers) and atomic: it
writes into a temporary folder next to ``root`` that is renamed into place only when complete, with a
``manifest.json`` describing what was generated; a mismatched manifest triggers regeneration.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import occscene_pl
from occscene_pl.data.demo.rendering import demo_calibration, lidar_scan, render_demo_image
from occscene_pl.data.demo.streets import EXTENT_M, check_grid_size, generate_scene
from occscene_pl.data.semantic_kitti import train_to_raw, write_calib, write_voxel_frame

__all__ = ["FRAME_STRIDE", "MANIFEST", "SPLIT_SEQUENCES", "frame_rng", "generate_demo_dataset", "read_manifest"]

SPLIT_SEQUENCES = {"train": "00", "val": "08"}
MANIFEST = "manifest.json"
FRAME_STRIDE = 5  # SemanticKITTI labels every 5th scan: 000000, 000005, ...
FORMAT_NAME = "occscene-pl demo (SemanticKITTI layout)"


@dataclass(frozen=True)
class _FrameJob:
    """One frame to write: where, which split and index, and the generation parameters (picklable for workers)."""

    sequence_dir: str
    split_code: int
    index: int
    seed: int
    grid_size: tuple[int, int, int]
    image_size: tuple[int, int]


def frame_rng(seed: int, split_code: int, index: int) -> np.random.Generator:
    """The random stream of one frame, the same on any number of workers and in any order.

    Args:
        seed: the dataset's base seed.
        split_code: 0 for the train sequence, 1 for val.
        index: the frame's index in its sequence (its file name is ``index * FRAME_STRIDE``).

    Returns:
        A generator that is a pure function of ``(seed, split_code, index)``.
    """
    return np.random.default_rng(np.random.SeedSequence([seed, split_code, index]))


def _write_frame(job: _FrameJob) -> None:
    """Generate, render, scan and write one frame (``image_2/NNNNNN.png`` and ``voxels/NNNNNN.*``)."""
    rng = frame_rng(job.seed, job.split_code, job.index)
    labels, invalid = generate_scene(rng, job.grid_size)
    image = render_demo_image(labels, job.image_size, rng, job.grid_size)
    scan, occluded = lidar_scan(labels, EXTENT_M[0] / job.grid_size[0])
    frame = f"{job.index * FRAME_STRIDE:06d}"
    sequence = Path(job.sequence_dir)
    Image.fromarray(image).save(sequence / "image_2" / f"{frame}.png", format="PNG", compress_level=3)
    write_voxel_frame(sequence / "voxels", frame, train_to_raw(labels), invalid=invalid, occluded=occluded, scan=scan)


def _manifest(
    seed: int, num_train: int, num_val: int, grid_size: tuple[int, int, int], image_size: tuple[int, int]
) -> dict[str, Any]:
    """The manifest describing a generated dataset; an existing dataset is reused only when it matches exactly."""
    return {
        "format": FORMAT_NAME,
        "version": occscene_pl.__version__,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "grid_size": list(grid_size),
        "image_size": list(image_size),
        "sequences": {SPLIT_SEQUENCES["train"]: num_train, SPLIT_SEQUENCES["val"]: num_val},
    }


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    """The manifest of a generated demo dataset, or ``None`` when ``root`` holds none (or an unreadable one)."""
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def generate_demo_dataset(
    root: str | Path,
    num_train: int = 320,
    num_val: int = 64,
    grid_size: Sequence[int] = (64, 64, 8),
    image_size: Sequence[int] = (128, 384),
    seed: int = 0,
    overwrite: bool = False,
    num_workers: int | None = None,
) -> Path:
    """Generate the demo dataset at ``root`` in the SemanticKITTI layout, unless an identical one is already there.

    Writes ``root/dataset/sequences/00`` (``num_train`` frames) and ``08`` (``num_val``), each with ``calib.txt``,
    ``image_2/NNNNNN.png`` and ``voxels/NNNNNN.{bin,label,invalid,occluded}`` for frames 000000, 000005, ..., and
    ``root/manifest.json`` with the generation parameters. An existing dataset is reused only when its manifest
    matches exactly; otherwise (or with ``overwrite``) it is regenerated. Generation happens in a temporary folder
    next to ``root`` that replaces it only once complete, so an interrupted run never leaves a partial dataset.

    Args:
        root: destination folder.
        num_train: frames of the train sequence 00.
        num_val: frames of the val sequence 08.
        grid_size: ``(X, Y, Z)`` with ``X == Y == 8 * Z``.
        image_size: ``(H, W)`` of the rendered images.
        seed: base seed; the same seed gives byte-identical files.
        overwrite: regenerate even when a matching dataset exists.
        num_workers: worker processes (default: up to 2, the cores a laptop demo can count on); 1 runs in-process.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    grid = check_grid_size(grid_size)
    if len(image_size) != 2 or min(int(s) for s in image_size) < 1:
        raise ValueError(f"image_size must be (H, W) with positive entries, got {tuple(image_size)!r}")
    size = (int(image_size[0]), int(image_size[1]))
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train} and {num_val}")
    root = Path(root)
    manifest = _manifest(seed, num_train, num_val, grid, size)
    if root.exists():
        existing = read_manifest(root)
        if existing is None and root.is_dir() and any(root.iterdir()):
            raise FileExistsError(
                f"demo dataset root {root} exists but has no {MANIFEST}; it is not a generated demo dataset, so it "
                "is left untouched. Remove it or choose another root."
            )
        if existing == manifest and not overwrite:
            return root

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        jobs = []
        p2, tr = demo_calibration(size)
        for split_code, (split, count) in enumerate((("train", num_train), ("val", num_val))):
            sequence = staging / "dataset" / "sequences" / SPLIT_SEQUENCES[split]
            (sequence / "image_2").mkdir(parents=True)
            (sequence / "voxels").mkdir()
            write_calib(sequence / "calib.txt", p2, tr)
            jobs += [_FrameJob(str(sequence), split_code, i, seed, grid, size) for i in range(count)]
        _run_jobs(jobs, num_workers)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _swap_into_place(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def _run_jobs(jobs: list[_FrameJob], num_workers: int | None) -> None:
    """Write every frame, in-process for one worker, else in a process pool (results do not depend on the count)."""
    workers = min(2, os.cpu_count() or 1) if num_workers is None else int(num_workers)
    if workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    workers = min(workers, len(jobs))
    if workers <= 1:
        for job in jobs:
            _write_frame(job)
        return
    # Workers only run NumPy and PIL; fork avoids re-importing torch in every worker where it is available.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        for _ in pool.map(_write_frame, jobs, chunksize=4):
            pass


def _swap_into_place(staging: Path, root: Path) -> None:
    """Replace ``root`` by ``staging`` with renames, so ``root`` is at every moment absent, old or complete."""
    if not root.exists():
        os.replace(staging, root)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
    os.replace(root, trash / root.name)
    os.replace(staging, root)
    shutil.rmtree(trash, ignore_errors=True)
