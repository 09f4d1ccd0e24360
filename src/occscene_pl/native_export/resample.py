"""Resampling a generated view to the image size a peer codebase expects (``docs/design.md`` §9.2)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from occscene_pl.data.transforms import crop_view, resize_view

__all__ = ["fit_view"]


def fit_view(image: np.ndarray, intrinsics: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resample a view to ``size = (W, H)`` without distorting it, and adjust its intrinsics to match.

    The image is scaled uniformly by ``max(W / w, H / h)`` (bilinear, so that it covers ``W x H``), then the centred
    ``W x H`` window is kept. Intrinsics follow :mod:`occscene_pl.data.transforms`' pixel convention (a resize maps
    ``c -> (c + 0.5) * s - 0.5``, a crop shifts the principal point), so every 3D point lands on the same content.

    Args:
        image: ``(h, w, 3)`` uint8.
        intrinsics: ``(3, 3)`` at ``(w, h)``.
        size: the output ``(W, H)``.

    Returns:
        The ``(H, W, 3)`` uint8 image and its ``(3, 3)`` float64 intrinsics.
    """
    height, width = image.shape[:2]
    out_w, out_h = size
    if (width, height) == (out_w, out_h):
        return image, np.asarray(intrinsics, dtype=np.float64)
    scale = max(out_w / width, out_h / height)
    new_w, new_h = max(out_w, round(width * scale)), max(out_h, round(height * scale))
    resized, k = resize_view(Image.fromarray(image), np.asarray(intrinsics), (new_h, new_w))
    left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
    cropped, k = crop_view(resized, k, (left, top, left + out_w, top + out_h))
    return np.asarray(cropped), k
