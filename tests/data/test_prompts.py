"""Templated prompts, captions files, prompt files and the prompt dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from occscene_pl.data.base import collate_samples
from occscene_pl.data.prompts import PromptDataset, describe_scene, load_captions, read_prompts

NAMES = ("empty", "car", "road", "other-ground", "building")
CAMERA = {
    "intrinsics": torch.eye(3)[None],
    "voxel_to_camera": torch.eye(4)[None],
    "voxel_origin": torch.zeros(3),
    "voxel_size": 0.2,
    "image_size": (32, 96),
}


def test_describe_scene_orders_by_frequency_and_skips_empty_and_ignore() -> None:
    occ = np.zeros((10, 10, 2), np.uint8)
    occ[:, :, 0] = 2  # 100 road
    occ[:3, :, 1] = 4  # 30 building
    occ[5, :2, 1] = 1  # 2 car
    occ[9, :, 1] = 255  # ignore
    assert describe_scene(occ, NAMES, "a driving scene") == "a driving scene with road, building and car"
    assert describe_scene(occ, NAMES, "x", max_classes=1) == "x with road"
    assert describe_scene(occ, NAMES, "x", min_fraction=0.05) == "x with road and building"
    assert describe_scene(np.zeros((2, 2, 2), np.uint8), NAMES, "a room") == "a room"
    occ[0, 0, 1] = 3
    assert "other ground" in describe_scene(occ, NAMES, "x", min_fraction=0.0)


def test_captions_and_prompts_files(tmp_path: Path) -> None:
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"08_000000": "a rainy street"}))
    assert load_captions(captions) == {"08_000000": "a rainy street"}
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json"):
        load_captions(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_captions(tmp_path / "missing.json")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a busy street\n\n  a quiet road  \n")
    assert read_prompts(prompts) == ["a busy street", "a quiet road"]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt"):
        read_prompts(tmp_path / "empty.txt")


def test_prompt_dataset_seeds_ids_and_collate(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\n")
    dataset = PromptDataset(prompts, CAMERA, seed=10, samples_per_prompt=2)
    assert len(dataset) == 4
    items = [dataset[i] for i in range(4)]
    assert [it["prompt"] for it in items] == ["a", "a", "b", "b"]
    assert [it["seed"] for it in items] == [10, 11, 12, 13]
    assert len({it["frame_id"] for it in items}) == 4
    batch = collate_samples(items[:2])
    assert batch["prompt"] == ["a", "a"]
    assert batch["intrinsics"].shape == (2, 1, 3, 3)
    assert batch["seed"].tolist() == [10, 11]
    assert batch["image_size"].tolist() == [[32, 96], [32, 96]]
    with pytest.raises(ValueError, match="missing the keys"):
        PromptDataset(["a"], {"intrinsics": torch.eye(3)})


def test_predict_limit_keeps_the_first_samples(tmp_path: Path) -> None:
    from occscene_pl.data.base import OccupancyDataModule

    class _Tiny(OccupancyDataModule):
        dataset_class = None  # type: ignore[assignment]

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\n")
    camera = {
        "intrinsics": torch.eye(3)[None],
        "voxel_to_camera": torch.eye(4)[None],
        "voxel_origin": torch.zeros(3),
        "voxel_size": 0.2,
        "image_size": (8, 8),
    }
    dataset = PromptDataset(str(prompts), camera, samples_per_prompt=2)
    module = object.__new__(_Tiny)
    module.predict_limit = 3
    module._predict_dataset = lambda: dataset  # type: ignore[method-assign]
    limited = OccupancyDataModule.predict_dataset(module)
    assert len(limited) == 3  # type: ignore[arg-type]
    assert [limited[i]["frame_id"] for i in range(3)] == [dataset[i]["frame_id"] for i in range(3)]
