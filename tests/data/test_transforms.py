"""Image transforms keep every voxel's projection on the same image content."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from occscene_pl.data.transforms import ImageTransform, crop_view, flip_view, resize_view
from occscene_pl.geometry import project_points

K = np.array([[80.0, 0.0, 63.5], [0.0, 80.0, 31.5], [0.0, 0.0, 1.0]])
T = np.eye(4)


def _project(k: np.ndarray | torch.Tensor, t: np.ndarray | torch.Tensor, point: list[float]) -> np.ndarray:
    pixels, _ = project_points(
        torch.tensor([[point]], dtype=torch.float64),
        torch.as_tensor(np.asarray(k), dtype=torch.float64)[None, None],
        torch.as_tensor(np.asarray(t), dtype=torch.float64)[None, None],
    )
    return pixels[0, 0, 0].numpy()


def test_crop_shifts_the_principal_point() -> None:
    image = Image.new("RGB", (128, 64))
    cropped, k = crop_view(image, K, (10, 4, 110, 64))
    assert cropped.size == (100, 60)
    point = [0.3, -0.2, 2.0]
    np.testing.assert_allclose(_project(k, T, point), _project(K, T, point) - np.array([10, 4]))
    with pytest.raises(ValueError, match="does not fit"):
        crop_view(image, K, (0, 0, 200, 64))


def test_resize_scales_with_pixel_centre_convention() -> None:
    image = Image.new("RGB", (128, 64))
    resized, k = resize_view(image, K, (32, 64))
    assert resized.size == (64, 32)
    point = [0.3, -0.2, 2.0]
    u, v = _project(K, T, point)
    # continuous coordinates of pixel centres: (u + 0.5) * s - 0.5
    np.testing.assert_allclose(_project(k, T, point), [(u + 0.5) * 0.5 - 0.5, (v + 0.5) * 0.5 - 0.5])
    # The image centre stays the image centre.
    np.testing.assert_allclose(k[:2, 2], [31.5, 15.5])


def test_flip_mirrors_projection_and_pixels() -> None:
    image = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(3, 2, 5)
    k = torch.tensor(K, dtype=torch.float32)
    k[0, 2] = 1.0
    t = torch.eye(4)
    flipped, k2, t2 = flip_view(image, k, t)
    assert torch.equal(flipped[..., 0], image[..., 4])
    point = [0.1, 0.05, 3.0]
    u, v = _project(k, t, point)
    np.testing.assert_allclose(_project(k2, t2, point), [5 - 1 - u, v], rtol=1e-5)
    assert k2[0, 0] > 0  # still a proper pinhole: the mirror lives in the extrinsics


def test_image_transform_flip_keeps_content_under_projection() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    torch.manual_seed(0)
    transform = ImageTransform(flip_prob=1.0)
    images, k, t = transform([(image, K, T)])
    point = [0.31, -0.2, 2.0]  # off a half-pixel, where half-to-even rounding would break the mirror symmetry
    u0, v0 = np.round(_project(K, T, point)).astype(int)
    u1, v1 = np.round(_project(k[0], t[0], point)).astype(int)
    assert u1 == 127 - u0 and v1 == v0
    torch.testing.assert_close(images[0, :, v1, u1], torch.tensor(pixels[v0, u0] / 255.0, dtype=torch.float32))


def test_image_transform_outputs_and_validation() -> None:
    image = Image.new("RGB", (128, 64), (255, 0, 0))
    images, k, t = ImageTransform(image_size=(16, 32), color_jitter=0.4)([(image, K, T), (image, K, T)])
    assert images.shape == (2, 3, 16, 32) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert k.shape == (2, 3, 3) and t.shape == (2, 4, 4)
    with pytest.raises(ValueError, match="image_size"):
        ImageTransform(image_size=(16,))
    with pytest.raises(ValueError, match="flip_prob"):
        ImageTransform(flip_prob=2.0)
    with pytest.raises(ValueError, match="share one size"):
        ImageTransform()([(image, K, T), (Image.new("RGB", (10, 10)), K, T)])
