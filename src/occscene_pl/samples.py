"""The generated sample: one typed record shared by its producer, the writer and the exporters (``docs/design.md`` §9).

``OccSceneModule.predict_step`` returns a list of :class:`GeneratedSample` (as diffusers' pipelines return an output
dataclass), :meth:`GenerationWriter.write_sample <occscene_pl.writer.GenerationWriter.write_sample>` writes one, and
every native exporter (:class:`~occscene_pl.native_export.NativeExporter`) prepares one. The record validates and
normalises itself on construction (shapes, dtypes, a safe ``frame_id``), so a malformed sample fails where it is
made, with a message naming the frame and the field, and consumers read plain NumPy arrays. A new field is added
here (and filled by its producer); the writer and exporters that do not use it are unchanged.

This module imports no model code.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
import torch

from occscene_pl.camera import Camera

__all__ = ["GENERATION_MODES", "GeneratedSample", "check_frame_id"]

GENERATION_MODES: tuple[str, ...] = ("text", "layout")


def check_frame_id(frame_id: Any, reserved: Collection[str] = ()) -> str:
    r"""Return ``frame_id`` if it is a safe folder name, else raise a ``ValueError`` naming it.

    Rejected: non-strings, empty ids, path separators (``/``, ``\``), NUL, ids starting with ``.`` (``.``, ``..``
    and hidden temporary files), and the names in ``reserved`` (e.g. the writer's export folders).
    """
    if not isinstance(frame_id, str):
        raise ValueError(f"frame_id must be a string, got {type(frame_id).__name__} {frame_id!r}")
    bad = [c for c in ("/", "\\", "\0", os.sep, os.altsep) if c and c in frame_id]
    if not frame_id or bad or frame_id.startswith(".") or frame_id in reserved:
        also = f", and not be one of {sorted(reserved)}" if reserved else ""
        raise ValueError(
            f"frame_id {frame_id!r} cannot name an output folder: it must be non-empty, contain no path separators "
            f"or NUL, and not start with '.'{also}"
        )
    return frame_id


def _array(value: Any) -> np.ndarray:
    """``value`` (a NumPy array, a tensor on any device, or nested numbers) as a NumPy array."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


@dataclass(eq=False)
class GeneratedSample:
    """One generated scene: its views, the occupancy perceived from them, its camera and how it was made.

    Tensors (any device) and array-likes are accepted and stored as the NumPy arrays below. Fields are validated
    on construction (and by ``dataclasses.replace``), not when assigned later; the record is not frozen because
    Lightning rebuilds dataclasses field by field when it gathers predictions.

    Attributes:
        frame_id: Names the output folder: non-empty, no path separators or NUL, not starting with ``.``.
        prompt: The text the scene was generated from.
        seed: The seed of the scene's initial noise.
        mode: ``"text"`` (text-only) or ``"layout"`` (conditioned on ``condition``).
        images: ``(V, 3, H, W)`` float32 views in ``[0, 1]`` (NaN and values outside are clipped when written).
        labels: ``(X, Y, Z)`` uint8 train ids, the perceiver's argmax on ``images`` (255 = unknown).
        intrinsics: ``(V, 3, 3)`` float32 pinhole matrices at ``(H, W)``.
        voxel_to_camera: ``(V, 4, 4)`` float32 voxel frame -> camera ``v``.
        voxel_origin: ``(3,)`` float32 corner of voxel ``[0, 0, 0]`` (metres).
        voxel_size: Voxel edge (metres), positive.
        probabilities: ``(C, X, Y, Z)`` float16 class probabilities, or None.
        condition: ``(X, Y, Z)`` uint8 layout the scene was conditioned on (layout mode), or None.
        meta: JSON-serialisable details (sampler settings, consistency scores, ...); tensors are written as lists.

    Raises:
        ValueError: on construction, a field of the wrong type, shape or range, naming the frame and the field.
    """

    frame_id: str
    prompt: str
    seed: int
    mode: Literal["text", "layout"]
    images: np.ndarray
    labels: np.ndarray
    intrinsics: np.ndarray
    voxel_to_camera: np.ndarray
    voxel_origin: np.ndarray
    voxel_size: float
    probabilities: np.ndarray | None = None
    condition: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        frame_id = check_frame_id(self.frame_id)

        def fail(name: str, message: str) -> ValueError:
            return ValueError(f"GeneratedSample {frame_id!r}: {name} {message}")

        def put(name: str, value: Any) -> None:
            setattr(self, name, value)

        if not isinstance(self.prompt, str):
            raise fail("prompt", f"must be a string, got {type(self.prompt).__name__}")
        try:
            put("seed", operator.index(self.seed))
        except TypeError:
            raise fail("seed", f"must be an integer, got {type(self.seed).__name__} {self.seed!r}") from None
        if self.mode not in GENERATION_MODES:
            raise fail("mode", f"must be one of {list(GENERATION_MODES)}, got {self.mode!r}")

        images = _array(self.images)
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype.kind not in "fiu":
            raise fail("images", f"must be (V, 3, H, W) numbers, got shape {images.shape} dtype {images.dtype}")
        put("images", images.astype(np.float32, copy=False))
        views = images.shape[0]

        labels = self._grid("labels", self.labels, fail)
        put("labels", labels)
        if self.condition is not None:
            condition = self._grid("condition", self.condition, fail)
            if condition.shape != labels.shape:
                raise fail("condition", f"must have the labels' shape {labels.shape}, got {condition.shape}")
            put("condition", condition)
        if self.probabilities is not None:
            probabilities = _array(self.probabilities)
            if probabilities.ndim != 4 or probabilities.shape[1:] != labels.shape:
                grid = ", ".join(map(str, labels.shape))
                raise fail("probabilities", f"must be (C, {grid}), got shape {probabilities.shape}")
            put("probabilities", probabilities.astype(np.float16, copy=False))

        for name, shape in (("intrinsics", (views, 3, 3)), ("voxel_to_camera", (views, 4, 4))):
            matrices = _array(getattr(self, name))
            if matrices.shape != shape:
                raise fail(name, f"must be {shape} for {views} view(s), got {matrices.shape}")
            put(name, matrices.astype(np.float32, copy=False))
        origin = _array(self.voxel_origin).astype(np.float32, copy=False).reshape(-1)
        if origin.shape != (3,):
            raise fail("voxel_origin", f"must be (3,), got {origin.shape}")
        put("voxel_origin", origin)
        size = _array(self.voxel_size)
        if size.size != 1 or not float(size.reshape(())) > 0:
            raise fail("voxel_size", f"must be one positive number, got {size.tolist()}")
        put("voxel_size", float(size.reshape(())))

        meta = {} if self.meta is None else self.meta
        if not isinstance(meta, Mapping):
            raise fail("meta", f"must be a dict, got {type(meta).__name__}")
        put("meta", dict(meta))

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "images":
            self.__dict__.pop("pixels", None)  # the cached PNG pixels follow new images

    @staticmethod
    def _grid(name: str, value: Any, fail: Any) -> np.ndarray:
        grid = _array(value)
        if grid.ndim != 3 or grid.dtype.kind not in "iub" or (grid.size and (grid.min() < 0 or grid.max() > 255)):
            raise fail(name, f"must be (X, Y, Z) uint8 train ids, got shape {grid.shape} dtype {grid.dtype}")
        return grid.astype(np.uint8, copy=False)

    @property
    def views(self) -> int:
        """``V``, the number of views."""
        return int(self.images.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the views."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """``(X, Y, Z)`` of the occupancy."""
        x, y, z = self.labels.shape
        return int(x), int(y), int(z)

    @cached_property
    def pixels(self) -> np.ndarray:
        """``(V, H, W, 3)`` uint8 views as written to PNG (NaN -> 0, clipped to ``[0, 1]``, rounded); computed once."""
        images = np.nan_to_num(self.images, nan=0.0, posinf=1.0, neginf=0.0)
        return np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8).transpose(0, 2, 3, 1)

    def camera(self) -> Camera:
        """The sample's rig as a :class:`~occscene_pl.camera.Camera` of one scene (CPU float32 tensors)."""
        return Camera(
            torch.from_numpy(self.intrinsics)[None],
            torch.from_numpy(self.voxel_to_camera)[None],
            torch.from_numpy(self.voxel_origin)[None],
            torch.tensor([self.voxel_size], dtype=torch.float32),
            self.image_size,
        )
