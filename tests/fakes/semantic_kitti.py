"""Fake SemanticKITTI trees in the real on-disk format, written at test time (never committed).

The expected train ids are derived from :data:`RAW_TO_TRAIN`, a hand-written excerpt of the SSC mapping of
``docs/design.md`` §8.1, so the tests do not check the reader against its own lookup table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from occscene_pl.data.semantic_kitti import pack_bits, write_calib, write_voxel_frame

# KITTI odometry sequence 00 `calib.txt`, verbatim.
KITTI_00_CALIB_TXT = (
    "P0: 7.188560000000e+02 0.000000000000e+00 6.071928000000e+02 0.000000000000e+00 0.000000000000e+00 "
    "7.188560000000e+02 1.852157000000e+02 0.000000000000e+00 0.000000000000e+00 0.000000000000e+00 "
    "1.000000000000e+00 0.000000000000e+00\n"
    "P1: 7.188560000000e+02 0.000000000000e+00 6.071928000000e+02 -3.861448000000e+02 0.000000000000e+00 "
    "7.188560000000e+02 1.852157000000e+02 0.000000000000e+00 0.000000000000e+00 0.000000000000e+00 "
    "1.000000000000e+00 0.000000000000e+00\n"
    "P2: 7.188560000000e+02 0.000000000000e+00 6.071928000000e+02 4.538225000000e+01 0.000000000000e+00 "
    "7.188560000000e+02 1.852157000000e+02 -1.130887000000e-01 0.000000000000e+00 0.000000000000e+00 "
    "1.000000000000e+00 3.779761000000e-03\n"
    "P3: 7.188560000000e+02 0.000000000000e+00 6.071928000000e+02 -3.372877000000e+02 0.000000000000e+00 "
    "7.188560000000e+02 1.852157000000e+02 2.369057000000e+00 0.000000000000e+00 0.000000000000e+00 "
    "1.000000000000e+00 4.915215000000e-03\n"
    "Tr: 4.276802385584e-04 -9.999672484946e-01 -8.084491683471e-03 -1.198459927713e-02 -7.210626507497e-03 "
    "8.081198471645e-03 -9.999413164504e-01 -5.403984729748e-02 9.999738645903e-01 4.859485810390e-04 "
    "-7.206933692422e-03 -2.921968648686e-01\n"
)
KITTI_00_P2 = np.array(
    [
        [7.188560e02, 0.0, 6.071928e02, 4.538225e01],
        [0.0, 7.188560e02, 1.852157e02, -1.130887e-01],
        [0.0, 0.0, 1.0, 3.779761e-03],
    ]
)
KITTI_00_TR = np.array(
    [
        [4.276802385584e-04, -9.999672484946e-01, -8.084491683471e-03, -1.198459927713e-02],
        [-7.210626507497e-03, 8.081198471645e-03, -9.999413164504e-01, -5.403984729748e-02],
        [9.999738645903e-01, 4.859485810390e-04, -7.206933692422e-03, -2.921968648686e-01],
        [0.0, 0.0, 0.0, 1.0],
    ]
)

# (raw id -> SSC train id) for the raw ids the fakes use; 300 is not a SemanticKITTI id at all.
RAW_TO_TRAIN: dict[int, int] = {
    0: 0,
    1: 255,
    10: 1,
    11: 2,
    13: 5,
    18: 4,
    30: 6,
    40: 9,
    44: 10,
    48: 11,
    50: 13,
    52: 255,
    60: 9,
    70: 15,
    71: 16,
    72: 17,
    80: 18,
    81: 19,
    99: 255,
    252: 1,
    255: 8,
    259: 5,
    300: 255,
}


def expected_train_ids(raw: np.ndarray, invalid: np.ndarray | None) -> np.ndarray:
    """Train ids of raw ids from :data:`RAW_TO_TRAIN`, with invalid voxels -> 255."""
    table = np.full(max(RAW_TO_TRAIN) + 1, 254, dtype=np.uint8)  # 254 never appears: flags ids outside the table
    for raw_id, train_id in RAW_TO_TRAIN.items():
        table[raw_id] = train_id
    out = table[raw]
    if (out == 254).any():
        raise ValueError("raw ids outside RAW_TO_TRAIN")
    if invalid is not None:
        out[invalid] = 255
    return out


def random_raw_labels(rng: np.random.Generator, grid_size: Sequence[int]) -> np.ndarray:
    """``(X, Y, Z)`` uint16 raw ids from :data:`RAW_TO_TRAIN`, half of them empty (0)."""
    ids = np.array(sorted(RAW_TO_TRAIN), dtype=np.uint16)
    weights = np.where(ids == 0, 0.5, 0.5 / (len(ids) - 1))
    return rng.choice(ids, size=tuple(grid_size), p=weights).astype(np.uint16)


def write_fake_semantic_kitti(
    root: str | Path,
    sequences: Mapping[str, int] | None = None,
    grid_size: Sequence[int] = (32, 32, 4),
    image_size: Sequence[int] = (70, 44),
    seed: int = 0,
    p2: np.ndarray = KITTI_00_P2,
    tr: np.ndarray = KITTI_00_TR,
    preprocess_root: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``<root>/dataset/sequences/SS/{calib.txt, image_2, voxels}`` for a few frames per sequence.

    Sequences ``"11"`` and above get only ``voxels/*.bin`` (hidden labels, as the real test split); the others get
    ``.label``, ``.invalid``, ``.occluded`` and ``.bin``. Frames are numbered every 5th scan (000000, 000005, ...).

    Args:
        root: destination folder.
        sequences: ``{sequence: number of frames}``; defaults to ``{"00": 2, "08": 1}``.
        grid_size: ``(X, Y, Z)``.
        image_size: ``(W, H)`` of the PNGs.
        seed: RNG seed.
        p2: ``(3, 4)`` camera-2 projection matrix written to every ``calib.txt``.
        tr: ``(4, 4)`` velodyne -> camera transform.
        preprocess_root: when given, also write MonoScene's ``labels/SS/NNNNNN_1_1.npy`` (float32) there.

    Returns:
        ``{"sequences_root": Path, "frames": {frame_id: {"sequence", "frame", "raw", "invalid", "expected",
        "image"}}}``, ``expected`` being the train ids ``(X, Y, Z)`` uint8 (``None`` without labels) and ``image`` the
        PNG's ``(H, W, 3)`` uint8 pixels.
    """
    rng = np.random.default_rng(seed)
    sequences = {"00": 2, "08": 1} if sequences is None else sequences
    sequences_root = Path(root) / "dataset" / "sequences"
    width, height = image_size
    frames: dict[str, dict[str, Any]] = {}
    for sequence, count in sorted(sequences.items()):
        seq_dir = sequences_root / sequence
        write_calib(seq_dir / "calib.txt", p2, tr)
        (seq_dir / "image_2").mkdir(parents=True, exist_ok=True)
        labelled = int(sequence) <= 10
        for i in range(count):
            frame = f"{5 * i:06d}"
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(seq_dir / "image_2" / f"{frame}.png")
            raw = random_raw_labels(rng, grid_size)
            invalid = rng.random(tuple(grid_size)) < 0.1
            scan = (raw != 0) & (rng.random(tuple(grid_size)) < 0.3)
            expected = None
            if labelled:
                occluded = rng.random(tuple(grid_size)) < 0.2
                write_voxel_frame(seq_dir / "voxels", frame, raw, invalid=invalid, occluded=occluded, scan=scan)
                expected = expected_train_ids(raw, invalid)
                if preprocess_root is not None:
                    label_dir = Path(preprocess_root) / "labels" / sequence
                    label_dir.mkdir(parents=True, exist_ok=True)
                    np.save(label_dir / f"{frame}_1_1.npy", expected.astype(np.float32))
            else:
                (seq_dir / "voxels").mkdir(parents=True, exist_ok=True)
                pack_bits(scan).tofile(seq_dir / "voxels" / f"{frame}.bin")
            frames[f"{sequence}_{frame}"] = {
                "sequence": sequence,
                "frame": frame,
                "raw": raw,
                "invalid": invalid,
                "expected": expected,
                "image": pixels,
            }
    return {"sequences_root": sequences_root, "frames": frames}
