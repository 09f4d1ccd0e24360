"""Helpers shared by the native exporters (``docs/design.md`` §9.2): options, exclusive files, PNGs, re-basing."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "EXPORT_SPLITS",
    "check_image_size",
    "check_split",
    "create_exclusive",
    "png_bytes",
    "rebased_transform",
    "record_size",
]

EXPORT_SPLITS: tuple[str, ...] = ("train", "val")


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist yet, atomically (temporary file + ``os.link``).

    Args:
        path: The file to create.
        data: Its content.

    Returns:
        ``True`` if this call created the file, ``False`` if it already existed.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 array as PNG.

    Args:
        image: The image.

    Returns:
        The PNG file's bytes.
    """
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def check_split(split: Any, option: str = "split") -> str:
    """Check an export split.

    Args:
        split: The value given.
        option: The option's name, for the error.

    Returns:
        ``split`` (``"train"`` or ``"val"``).

    Raises:
        ValueError: ``split`` is not an export split (naming ``option``).
    """
    if split not in EXPORT_SPLITS:
        raise ValueError(f"{option} must be one of {list(EXPORT_SPLITS)}, got {split!r}")
    return str(split)


def check_image_size(size: Any, option: str = "image_size") -> tuple[int, int] | None:
    """Check an export image size.

    Args:
        size: The value given, ``(W, H)`` or None.
        option: The option's name, for the error.

    Returns:
        ``size`` as ``(W, H)`` positive ints; ``None`` stays ``None``.

    Raises:
        ValueError: ``size`` is not two positive integers (naming ``option``).
    """
    if size is None:
        return None
    try:
        values = [int(v) for v in size]
        exact = all(int(v) == v for v in size) and not isinstance(size, str | bytes)
    except (TypeError, ValueError):
        values, exact = [], False
    if len(values) != 2 or not exact or min(values) < 1:
        raise ValueError(f"{option} must be (width, height) as two positive integers, e.g. [1220, 370], got {size!r}")
    return values[0], values[1]


def rebased_transform(voxel_to_camera: np.ndarray, voxel_origin: Any, reader_origin: Any, what: str) -> np.ndarray:
    """``voxel_to_camera`` for a reader that puts voxel ``[0, 0, 0]`` at ``reader_origin`` instead of ``voxel_origin``.

    A voxel's point is ``voxel_origin + (i + 0.5) * size`` for the sample and ``reader_origin + (i + 0.5) * size`` for
    the reader, so the reader's transform is ``voxel_to_camera @ translate(voxel_origin - reader_origin)``: every voxel
    projects to the same pixel. Offsets under 0.1 mm (float32 copies of the reader's own origin) count as zero.

    Raises:
        ValueError: the last row is not ``[0, 0, 0, 1]`` (``what`` names the export and frame).
    """
    transform = np.asarray(voxel_to_camera, dtype=np.float64)
    if not np.allclose(transform[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"{what}: voxel_to_camera's last row must be [0, 0, 0, 1], got {transform[3].tolist()}")
    shift = np.eye(4)
    offset = np.asarray(voxel_origin, np.float64) - np.asarray(reader_origin, np.float64)
    shift[:3, 3] = np.where(np.abs(offset) < 1e-4, 0.0, offset)
    return transform @ shift


def record_size(size: tuple[int, int] | None) -> list[int] | None:
    """``size`` as kept in an export record (a list, or None).

    Args:
        size: ``(W, H)`` or None.

    Returns:
        ``[W, H]`` or None.
    """
    return None if size is None else [int(size[0]), int(size[1])]
