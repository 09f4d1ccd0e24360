"""Image transforms keep every voxel's projection on the same image content."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import ColorJitter

from occscene_pl.data.base import OPTIONAL_SAMPLE_KEYS, SAMPLE_KEYS, OccupancyDataset, RawSample, collate_samples
from occscene_pl.data.transforms import ImageTransform, apply_color_jitter, crop_view, flip_view, resize_view
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
    images, k, t, perceiver = transform([(image, K, T)])
    assert perceiver is None  # no colour jitter, no perceiver copy
    point = [0.31, -0.2, 2.0]  # off a half-pixel, where half-to-even rounding would break the mirror symmetry
    u0, v0 = np.round(_project(K, T, point)).astype(int)
    u1, v1 = np.round(_project(k[0], t[0], point)).astype(int)
    assert u1 == 127 - u0 and v1 == v0
    torch.testing.assert_close(images[0, :, v1, u1], torch.tensor(pixels[v0, u0] / 255.0, dtype=torch.float32))


def test_image_transform_outputs_and_validation() -> None:
    image = Image.new("RGB", (128, 64), (255, 0, 0))
    images, k, t, perceiver = ImageTransform(image_size=(16, 32), color_jitter=0.4)([(image, K, T), (image, K, T)])
    assert images.shape == (2, 3, 16, 32) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert perceiver is not None and perceiver.shape == images.shape and perceiver.dtype == torch.float32
    assert float(perceiver.min()) >= 0.0 and float(perceiver.max()) <= 1.0
    assert k.shape == (2, 3, 3) and t.shape == (2, 4, 4)
    with pytest.raises(ValueError, match="image_size"):
        ImageTransform(image_size=(16,))
    with pytest.raises(ValueError, match="flip_prob"):
        ImageTransform(flip_prob=2.0)
    with pytest.raises(ValueError, match="color_jitter"):
        ImageTransform(color_jitter=-0.1)
    with pytest.raises(ValueError, match="share one size"):
        ImageTransform()([(image, K, T), (Image.new("RGB", (10, 10)), K, T)])


# --------------------------------------------------------------------------------------------------------------------
# colour jitter reaches the perceiver's copy only, one draw per sample


def _random_views(n_views: int, seed: int = 0) -> list[tuple[Image.Image, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(Image.fromarray(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)), K, T) for _ in range(n_views)]


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_jitter_leaves_the_diffusion_target_untouched(flip_prob: float) -> None:
    views = _random_views(3)
    torch.manual_seed(0)
    images, k, t, perceiver = ImageTransform((32, 64), color_jitter=0.4, flip_prob=flip_prob)(views)
    plain_images, plain_k, plain_t, plain_perceiver = ImageTransform((32, 64), flip_prob=flip_prob)(views)
    assert plain_perceiver is None
    # image is exactly the transform without jitter (flips included); the cameras are those of image
    assert torch.equal(images, plain_images) and torch.equal(k, plain_k) and torch.equal(t, plain_t)
    assert perceiver is not None and not torch.allclose(perceiver, images, atol=1e-3)


def test_one_jitter_draw_shared_by_all_views() -> None:
    # Identical views stay identical after jitter; per-view draws would make them differ.
    image = _random_views(1)[0]
    for seed in range(5):
        torch.manual_seed(seed)
        images, _, _, perceiver = ImageTransform(color_jitter=0.4)([image] * 6)
        assert perceiver is not None and not torch.equal(perceiver[0], images[0])
        for view in perceiver[1:]:
            assert torch.equal(view, perceiver[0])


def test_jitter_is_torchvision_colorjitter_with_one_draw_applied_per_view() -> None:
    views = _random_views(2, seed=1)
    torch.manual_seed(3)
    images, _, _, perceiver = ImageTransform(color_jitter=0.4, flip_prob=1.0)(views)
    torch.manual_seed(3)
    torch.rand(())  # the flip's draw comes first
    jitter = ColorJitter(0.4, 0.4, 0.4)
    order, brightness, contrast, saturation, hue = ColorJitter.get_params(
        jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue
    )
    assert hue is None and brightness is not None and contrast is not None and saturation is not None
    assert perceiver is not None
    for view, jittered in zip(images, perceiver, strict=True):
        expected = view
        for fn_id in order.tolist():  # ColorJitter.forward's order, with the one draw's factors, view by view
            if fn_id == 0:
                expected = TF.adjust_brightness(expected, brightness)
            elif fn_id == 1:
                expected = TF.adjust_contrast(expected, contrast)
            elif fn_id == 2:
                expected = TF.adjust_saturation(expected, saturation)
        torch.testing.assert_close(jittered, expected)
    # the helper with a single-view input agrees too
    params = (order, brightness, contrast, saturation, hue)
    torch.testing.assert_close(apply_color_jitter(images[1], params), perceiver[1])


class _TwoViewDataset(OccupancyDataset):
    class_names = ("empty", "thing")
    default_grid_size = (2, 2, 2)
    splits = ("train", "val")
    scene_description = "a test scene"
    class_weights = (1.0, 1.0)

    def __len__(self) -> int:
        return 2

    def load(self, index: int) -> RawSample:
        return RawSample(
            views=_random_views(2, seed=index),
            occupancy=np.zeros((2, 2, 2), dtype=np.uint8),
            voxel_origin=np.zeros(3),
            voxel_size=0.5,
            frame_id=f"frame_{index}",
        )


def test_dataset_sample_has_perceiver_image_only_with_jitter() -> None:
    augmented = _TwoViewDataset(image_size=(16, 32), color_jitter=0.4, flip_prob=0.0)
    sample = augmented[0]
    assert set(sample) == set(SAMPLE_KEYS) | set(OPTIONAL_SAMPLE_KEYS)
    plain: dict[str, Any] = _TwoViewDataset(image_size=(16, 32))[0]
    assert set(plain) == set(SAMPLE_KEYS)
    assert torch.equal(sample["image"], plain["image"])
    assert sample["perceiver_image"].shape == (2, 3, 16, 32)
    assert not torch.equal(sample["perceiver_image"], sample["image"])
    batch = collate_samples([augmented[0], augmented[1]])
    assert batch["perceiver_image"].shape == (2, 2, 3, 16, 32) and batch["image"].shape == (2, 2, 3, 16, 32)
    with pytest.raises(ValueError, match="disagree on keys"):
        collate_samples([sample, plain])
