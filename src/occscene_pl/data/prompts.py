"""Text prompts: captions files, templated scene descriptions and the prompt dataset used by ``predict``.

None of the three datasets ships captions (``docs/design.md`` §8.6). A training sample's prompt comes from a captions
file when one is given (a JSON object ``{frame_id: caption}``), otherwise it is templated from the classes present in
the sample's occupancy, most frequent first, e.g. "a driving scene with road, vegetation, building, car and sidewalk".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["PromptDataset", "describe_scene", "load_captions", "read_prompts"]


def load_captions(path: str | Path) -> dict[str, str]:
    """Read a captions file: a JSON object mapping ``frame_id`` to a caption string."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} does not exist (expected a JSON object {{frame_id: caption}})")
    try:
        captions = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"captions file {path} is not valid JSON: {err}") from err
    if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
        raise ValueError(f"captions file {path} must hold a JSON object mapping frame ids to caption strings")
    return {str(k): v for k, v in captions.items()}


def describe_scene(
    occupancy: np.ndarray,
    class_names: Sequence[str],
    scene: str,
    max_classes: int = 5,
    min_fraction: float = 0.002,
    empty_index: int = 0,
    ignore_index: int = 255,
) -> str:
    """Template a prompt from the classes of an occupancy grid, most frequent first.

    Args:
        occupancy: ``(X, Y, Z)`` train ids.
        class_names: name of every train id.
        scene: the leading noun phrase, e.g. ``"a driving scene"``.
        max_classes: at most this many classes are named.
        min_fraction: classes covering less than this fraction of the non-empty voxels are left out.
        empty_index: the empty class (never named).
        ignore_index: the ignore label (never named).

    Returns:
        e.g. ``"a driving scene with road, building and car"``; just ``scene`` when nothing is occupied.
    """
    labels = np.asarray(occupancy).reshape(-1)
    # One bincount over every label value (uint8 grids: 256 bins) is far cheaper than masking millions of voxels.
    counts = np.bincount(labels, minlength=max(len(class_names), ignore_index + 1)).astype(np.int64)
    counts[[empty_index, ignore_index]] = 0
    counts = counts[: len(class_names)]
    total = int(counts.sum())
    if total == 0:
        return scene
    order = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] >= max(1, min_fraction * total)]
    names = [class_names[c].replace("_", " ").replace("-", " ") for c in order[:max_classes]]
    if len(names) == 1:
        return f"{scene} with {names[0]}"
    return f"{scene} with {', '.join(names[:-1])} and {names[-1]}"


def read_prompts(path: str | Path) -> list[str]:
    """Read a prompts file: UTF-8 text, one prompt per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist (expected a text file with one prompt per line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} contains no prompt (expected one prompt per line)")
    return prompts


class PromptDataset(Dataset[dict[str, Any]]):
    """Prompts for text-only generation, each with its own seed and the camera to generate through.

    Args:
        prompts: a prompts file (one prompt per line) or the prompts themselves.
        camera: the rig to render through, with the sample-schema keys ``intrinsics`` ``(V, 3, 3)``,
            ``voxel_to_camera`` ``(V, 4, 4)``, ``voxel_origin`` ``(3,)``, ``voxel_size`` and ``image_size`` ``(H, W)``.
        seed: sample ``i`` is generated with seed ``seed + i``, so any one sample can be regenerated alone.
        samples_per_prompt: how many samples (consecutive seeds) to draw per prompt.
    """

    def __init__(
        self,
        prompts: str | Path | Sequence[str],
        camera: Mapping[str, Any],
        seed: int = 0,
        samples_per_prompt: int = 1,
    ) -> None:
        self.prompts = read_prompts(prompts) if isinstance(prompts, str | Path) else list(prompts)
        if samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
        missing = {"intrinsics", "voxel_to_camera", "voxel_origin", "voxel_size", "image_size"} - set(camera)
        if missing:
            raise ValueError(f"camera is missing the keys {sorted(missing)}")
        self.camera = dict(camera)
        self.seed = seed
        self.samples_per_prompt = samples_per_prompt

    def __len__(self) -> int:
        return len(self.prompts) * self.samples_per_prompt

    def __getitem__(self, index: int) -> dict[str, Any]:
        prompt_index, repeat = divmod(index, self.samples_per_prompt)
        return {
            "prompt": self.prompts[prompt_index],
            "seed": self.seed + index,
            "frame_id": f"prompt{prompt_index:05d}_sample{repeat:02d}",
            "intrinsics": torch.as_tensor(self.camera["intrinsics"], dtype=torch.float32),
            "voxel_to_camera": torch.as_tensor(self.camera["voxel_to_camera"], dtype=torch.float32),
            "voxel_origin": torch.as_tensor(self.camera["voxel_origin"], dtype=torch.float32),
            "voxel_size": torch.as_tensor(float(self.camera["voxel_size"]), dtype=torch.float32),
            "image_size": torch.as_tensor(self.camera["image_size"], dtype=torch.long),
        }
