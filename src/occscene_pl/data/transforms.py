"""Image transforms that keep the camera model consistent with the pixels.

Every geometric change to an image (crop, resize, horizontal flip) is mirrored in its ``intrinsics`` and, for the
flip, in ``voxel_to_camera``, so that projecting a voxel with the returned camera lands on the same content as
before. The 3D target is never touched (MonoScene flips only the image and the projection; ``docs/design.md`` §5.3).

Colour jitter is not geometric and is kept out of the image the generator learns to produce: :class:`ImageTransform`
returns the un-jittered views as ``images`` and, when jitter is on, a second copy ``perceiver_images`` with one colour
jitter draw applied identically to every view of the sample (the perceiver's real-image input).

Pixel convention: pixel centres sit at integer coordinates, so a crop shifts the principal point by the crop offset,
a resize by a factor ``s`` maps ``c -> (c + 0.5) * s - 0.5`` and a flip of a ``W``-wide image maps ``u -> W - 1 - u``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.transforms import ColorJitter

__all__ = [
    "CameraImage",
    "ImageTransform",
    "TransformedViews",
    "apply_color_jitter",
    "crop_view",
    "flip_view",
    "resize_view",
]

# (image, intrinsics (3, 3), voxel_to_camera (4, 4)) of one view.
CameraImage = tuple[Image.Image, np.ndarray, np.ndarray]


def crop_view(image: Image.Image, intrinsics: np.ndarray, box: Sequence[int]) -> tuple[Image.Image, np.ndarray]:
    """Crop ``box = (left, top, right, bottom)`` (PIL convention) and shift the principal point to match."""
    left, top, right, bottom = box
    if right > image.width or bottom > image.height or left < 0 or top < 0:
        raise ValueError(f"crop box {tuple(box)} does not fit an image of size {image.width}x{image.height}")
    k = intrinsics.astype(np.float64).copy()
    k[0, 2] -= left
    k[1, 2] -= top
    return image.crop((left, top, right, bottom)), k


def resize_view(image: Image.Image, intrinsics: np.ndarray, size: Sequence[int]) -> tuple[Image.Image, np.ndarray]:
    """Resize to ``size = (H, W)`` (bilinear with antialiasing) and scale the intrinsics to match."""
    height, width = int(size[0]), int(size[1])
    if (image.height, image.width) == (height, width):
        return image, intrinsics.astype(np.float64).copy()
    sx, sy = width / image.width, height / image.height
    k = intrinsics.astype(np.float64).copy()
    k[0, 0] *= sx
    k[1, 1] *= sy
    k[0, 2] = (k[0, 2] + 0.5) * sx - 0.5
    k[1, 2] = (k[1, 2] + 0.5) * sy - 0.5
    return image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=None), k


def flip_view(image: Tensor, intrinsics: Tensor, voxel_to_camera: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mirror one view horizontally and adapt the camera so projections follow the mirrored pixels.

    Negating the camera x axis (a left multiplication of ``voxel_to_camera`` by ``diag(-1, 1, 1, 1)``) and moving the
    principal point to ``W - 1 - c_x`` gives ``u' = W - 1 - u`` for every point, with a positive focal length.

    Args:
        image: ``(3, H, W)``.
        intrinsics: ``(3, 3)``.
        voxel_to_camera: ``(4, 4)``.
    """
    width = image.shape[-1]
    k = intrinsics.clone()
    k[0, 2] = width - 1 - k[0, 2]
    mirror = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=voxel_to_camera.dtype))
    return image.flip(-1), k, mirror @ voxel_to_camera


ColorJitterParams = tuple[Tensor, float | None, float | None, float | None, float | None]
"""``(order, brightness, contrast, saturation, hue)`` as returned by ``ColorJitter.get_params``."""


def apply_color_jitter(images: Tensor, params: ColorJitterParams) -> Tensor:
    """Apply one colour-jitter draw to images, in the draw's order, as ``torchvision``'s ``ColorJitter`` does.

    Every leading index (view) gets the same factors; contrast blends each image with its own mean grey level, as
    jittering the views one by one with these factors would.

    Args:
        images: ``(..., 3, H, W)`` float in ``[0, 1]``.
        params: a draw of ``ColorJitter.get_params``.

    Returns:
        The jittered images, same shape, clamped to ``[0, 1]``.
    """
    order, brightness, contrast, saturation, hue = params
    for fn_id in order.tolist():
        if fn_id == 0 and brightness is not None:
            images = TF.adjust_brightness(images, brightness)
        elif fn_id == 1 and contrast is not None:
            images = TF.adjust_contrast(images, contrast)
        elif fn_id == 2 and saturation is not None:
            images = TF.adjust_saturation(images, saturation)
        elif fn_id == 3 and hue is not None:
            images = TF.adjust_hue(images, hue)
    return images


class TransformedViews(NamedTuple):
    """The views of one sample after :class:`ImageTransform`.

    Attributes:
        images: ``(V, 3, H, W)`` float32 in ``[0, 1]``, geometric augmentation only (the diffusion target).
        intrinsics: ``(V, 3, 3)`` float32 at the returned size.
        voxel_to_camera: ``(V, 4, 4)`` float32 (mirrored when flipped).
        perceiver_images: ``images`` with one colour-jitter draw shared by all views, or ``None`` without jitter.
    """

    images: Tensor
    intrinsics: Tensor
    voxel_to_camera: Tensor
    perceiver_images: Tensor | None


class ImageTransform:
    """Resize and flip a multi-view sample consistently; colour-jitter a copy for the perceiver.

    Args:
        image_size: ``(H, W)`` of the returned images; ``None`` keeps the (cropped) native size.
        color_jitter: brightness/contrast/saturation strength (MonoScene uses 0.4 in training); 0 disables it. It only
            affects ``perceiver_images``: one draw per sample, applied identically to every view.
        flip_prob: probability of mirroring all views of a sample horizontally (MonoScene: 0.5 in training).

    Returns images as float32 in ``[0, 1]``; normalisation belongs to the models (the perceiver and the generator
    normalise differently).
    """

    def __init__(
        self,
        image_size: Sequence[int] | None = None,
        color_jitter: float = 0.0,
        flip_prob: float = 0.0,
    ) -> None:
        if image_size is not None and (len(image_size) != 2 or min(image_size) <= 0):
            raise ValueError(f"image_size must be (H, W) with positive entries, got {image_size!r}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if color_jitter < 0:
            raise ValueError(f"color_jitter must be >= 0, got {color_jitter}")
        self.image_size = tuple(int(s) for s in image_size) if image_size is not None else None
        self.flip_prob = flip_prob
        self.jitter = ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter > 0 else None

    def __call__(self, views: Sequence[CameraImage]) -> TransformedViews:
        """Transform the views of one sample.

        Args:
            views: ``V`` tuples ``(image, intrinsics (3, 3), voxel_to_camera (4, 4))``.

        Returns:
            The :class:`TransformedViews`; ``perceiver_images`` is set only when colour jitter is on.
        """
        flip = self.flip_prob > 0 and bool(torch.rand(()) < self.flip_prob)
        images, intrinsics, extrinsics = [], [], []
        for image, k, t in views:
            image = image.convert("RGB")
            if self.image_size is not None:
                image, k = resize_view(image, k, self.image_size)
            # (3, H, W) in [0, 1]; from_numpy is several times faster than TF.to_tensor on large PIL images.
            pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
            k_t = torch.as_tensor(np.asarray(k), dtype=torch.float32)
            t_t = torch.as_tensor(np.asarray(t), dtype=torch.float32)
            if flip:
                pixels, k_t, t_t = flip_view(pixels, k_t, t_t)
            images.append(pixels)
            intrinsics.append(k_t)
            extrinsics.append(t_t)
        shapes = {tuple(img.shape) for img in images}
        if len(shapes) != 1:
            raise ValueError(f"all views of a sample must share one size after the transform, got {sorted(shapes)}")
        stacked = torch.stack(images)
        perceiver = None
        if self.jitter is not None:
            # One draw for the whole sample (the views of a rig share one exposure), after the flip's draw.
            j = self.jitter
            params = ColorJitter.get_params(j.brightness, j.contrast, j.saturation, j.hue)
            perceiver = apply_color_jitter(stacked, params)
        return TransformedViews(stacked, torch.stack(intrinsics), torch.stack(extrinsics), perceiver)
