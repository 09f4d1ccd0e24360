"""GenerationMetrics: FID/KID on a randomly initialised FID Inception saved to disk, consistency mIoU, loading errors,
checkpoint hygiene and DDP synchronisation. Nothing is downloaded: the weights file is written by the test."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torchmetrics.image.fid import FrechetInceptionDistance

from occscene_pl.generation_metrics import INCEPTION_WEIGHTS_FILE, GenerationMetrics

FEATURE = 192  # the 2048 layer runs the whole network and FID's 2048x2048 eigendecomposition takes seconds on CPU


class _RandomInception(FeatureExtractorInceptionV3):
    """torch-fidelity's network with its own constructor, minus the weight loading (which would otherwise download)."""

    def load_state_dict(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        return None


def write_random_inception(directory: Path) -> Path:
    """Save a randomly initialised FID Inception state_dict, the format of the real weights file."""
    empty = directory / "empty.pt"
    torch.save({}, empty)
    net = _RandomInception("inception-v3-compat", ["2048"], str(empty))
    gen = torch.Generator().manual_seed(0)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):  # variance-preserving init so that deep features do not vanish
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            module.weight.data = torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5
    path = directory / INCEPTION_WEIGHTS_FILE
    torch.save(nn.Module.state_dict(net), path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_inception(tmp_path_factory.mktemp("inception"))


def images(n: int, bright: bool, seed: int, size: int = 32) -> Tensor:
    """``n`` float images in [0, 1]: dark smooth ones, or bright noisy ones."""
    gen = torch.Generator().manual_seed(seed)
    if bright:
        return (0.6 + 0.4 * torch.rand(n, 3, size, size, generator=gen)).clamp(0, 1)
    return 0.2 * torch.rand(n, 3, 1, 1, generator=gen).expand(n, 3, size, size).clone()


def labels(n: int = 2) -> Tensor:
    return torch.zeros(n, 2, 2, 2, dtype=torch.long)


def test_fid_identical_sets_near_zero_and_different_sets_positive(weights: Path) -> None:
    metrics = GenerationMetrics(3, inception_weights=weights, kid=False, feature=FEATURE)
    assert metrics.available and metrics.message is None
    real = torch.cat([images(3, bright=False, seed=0), images(3, bright=True, seed=1)])
    metrics.update(real, real.clone(), labels(), labels())
    same = metrics.compute()
    assert set(same) >= {"fid", "consistency_miou"} and "kid_mean" not in same
    metrics.reset()
    metrics.update(real, images(6, bright=True, seed=2), labels(), labels())
    different = metrics.compute()["fid"]
    assert torch.isfinite(different) and different > 0
    assert abs(float(same["fid"])) < 1e-3 * float(different)
    assert metrics.message is None


def test_fid_equals_torchmetrics_with_its_own_inception(weights: Path) -> None:
    real = (images(3, bright=False, seed=3) * 255).to(torch.uint8)
    fake = (images(4, bright=True, seed=4) * 255).to(torch.uint8)
    ours = GenerationMetrics(3, inception_weights=weights, kid=False, feature=FEATURE)
    ours.update(real, fake, labels(), labels())
    reference = FrechetInceptionDistance(feature=FEATURE, feature_extractor_weights_path=str(weights))
    reference.update(real, real=True)
    reference.update(fake, real=False)
    torch.testing.assert_close(ours.compute()["fid"], reference.compute(), rtol=1e-5, atol=1e-6)


def test_kid_mean_std_and_subset_clamping(weights: Path) -> None:
    metrics = GenerationMetrics(3, inception_weights=weights, fid=False, kid_subset_size=50, kid_subsets=5)
    metrics.update(images(3, bright=False, seed=5), images(2, bright=True, seed=6), labels(), labels())
    metrics.update(None, images(2, bright=True, seed=7), labels(), labels())  # a batch without real images
    out = metrics.compute()
    assert "fid" not in out
    assert metrics.kid_subset_size_used == 3  # min(50, 3 real, 4 generated)
    assert out["kid_mean"].shape == () and out["kid_std"].shape == ()
    assert torch.isfinite(out["kid_mean"]) and out["kid_mean"] > 0 and out["kid_std"] >= 0
    assert metrics.message is None
    assert metrics.inception is not None and metrics.inception(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)).shape == (
        1,
        2048,
    )


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning")  # the empty compute
def test_too_few_samples_gives_no_number_and_says_why(weights: Path) -> None:
    metrics = GenerationMetrics(3, inception_weights=weights, feature=FEATURE)
    metrics.update(images(1, bright=False, seed=8), images(3, bright=True, seed=9), labels(), labels())
    out = metrics.compute()
    assert not {"fid", "kid_mean", "kid_std"} & set(out)
    assert metrics.message is not None
    assert "FID skipped" in metrics.message and "KID skipped" in metrics.message and "1 real" in metrics.message
    metrics.reset()
    assert metrics.message is None
    out = metrics.compute()  # nothing accumulated: still no number
    assert "fid" not in out and "0 real and 0 generated" in str(metrics.message)


def test_consistency_hand_computed_and_no_weights_message() -> None:
    metrics = GenerationMetrics(num_classes=3)
    assert not metrics.available and metrics.inception is None
    assert metrics.message is not None and "inception_weights" in metrics.message and "downloaded" in metrics.message
    # condition (target) / predicted pairs as in tests/test_metrics.py: conf = [[1,1,0],[0,2,0],[1,0,1]].
    condition = torch.tensor([0, 0, 1, 1, 2, 2, 255, 255]).reshape(1, 2, 2, 2)
    predicted = torch.tensor([0, 1, 1, 1, 2, 0, 2, 1]).reshape(1, 2, 2, 2)
    metrics.update(None, torch.rand(1, 3, 8, 8), predicted, condition)
    out = metrics.compute()
    eps = 1e-5
    per_class = torch.tensor([1 / (3 + eps), 2 / (3 + eps), 1 / (2 + eps)])
    torch.testing.assert_close(out["consistency_per_class_iou"], per_class)
    torch.testing.assert_close(out["consistency_miou"], per_class[1:].mean())
    torch.testing.assert_close(out["consistency_iou"], torch.tensor(3 / 5))
    assert not {"fid", "kid_mean", "kid_std"} & set(out)
    assert metrics.message is not None and metrics.message.startswith("FID/KID skipped")

    # A soft condition (B, C, X, Y, Z) is argmaxed; predicted logits too.
    soft = GenerationMetrics(num_classes=3)
    known = condition.clamp(max=2)
    soft.update(
        None,
        torch.rand(1, 3, 8, 8),
        nn.functional.one_hot(predicted.clamp(max=2), 3).permute(0, 4, 1, 2, 3).float(),
        nn.functional.one_hot(known, 3).permute(0, 4, 1, 2, 3).float(),
    )
    reference = GenerationMetrics(num_classes=3)
    reference.update(None, torch.rand(1, 3, 8, 8), predicted.clamp(max=2), known)
    torch.testing.assert_close(soft.compute()["consistency_miou"], reference.compute()["consistency_miou"])


def test_turned_off_metrics_need_no_weights() -> None:
    metrics = GenerationMetrics(3, inception_weights="/nonexistent.pth", fid=False, kid=False)
    assert not metrics.available and "turned off" in str(metrics.message)


def test_missing_file_names_path_and_expected_weights(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(FileNotFoundError, match="nowhere") as err:
        GenerationMetrics(3, inception_weights=missing)
    assert INCEPTION_WEIGHTS_FILE in str(err.value)


def test_unloadable_files_raise_value_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match="garbage.pth"):
        GenerationMetrics(3, inception_weights=garbage)
    wrong = tmp_path / "wrong.pth"
    torch.save(nn.Linear(2, 2).state_dict(), wrong)
    with pytest.raises(ValueError, match="wrong.pth.*does not load"):
        GenerationMetrics(3, inception_weights=wrong)


def test_inception_is_neither_parameter_nor_checkpointed(weights: Path) -> None:
    import lightning as L  # here, not at the top: the DDP workers below re-import this module and need no Lightning

    class _Parent(L.LightningModule):
        def __init__(self, weights: Path) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.generation_metrics = GenerationMetrics(3, inception_weights=weights, feature=FEATURE)

    parent = _Parent(weights)
    head_keys = set(parent.head.state_dict())
    assert set(parent.state_dict()) == {f"head.{key}" for key in head_keys}
    assert sum(p.numel() for p in parent.parameters()) == 4 * 2 + 2
    restored = _Parent(weights)
    restored.load_state_dict(parent.state_dict(), strict=True)  # no Inception keys are expected either

    # Dtype conversions (e.g. a "*-true" precision plugin) leave the Inception and the metric states alone.
    parent.to(torch.float64)
    metrics = parent.generation_metrics
    assert metrics.inception is not None
    assert next(metrics.inception.parameters()).dtype == torch.float32
    assert metrics.fid is not None and metrics.fid.real_features_sum.dtype == torch.float64
    assert parent.head.weight.dtype == torch.float64
    real = images(2, bright=False, seed=10)
    metrics.update(real, real.double(), labels(), labels())
    assert torch.isfinite(metrics.compute()["fid"])


def _ddp_worker(rank: int, world_size: int, port: int, weights: str, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        metrics = GenerationMetrics(3, inception_weights=weights, feature=FEATURE)
        # One real and one generated image per rank: too few locally, enough once synchronised.
        metrics.update(images(1, False, seed=20 + rank), images(1, True, seed=30 + rank), labels(1), labels(1))
        out = metrics.compute()
        queue.put((rank, {key: value.tolist() for key, value in out.items()}, metrics.message))
    finally:
        dist.destroy_process_group()


def test_ddp_counts_and_features_are_synchronised(weights: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_ddp_worker, args=(2, port, str(weights), queue), nprocs=2, join=True, start_method="spawn")
    results = [queue.get(timeout=60) for _ in range(2)]

    single = GenerationMetrics(3, inception_weights=weights, feature=FEATURE)
    for rank in range(2):
        single.update(images(1, False, seed=20 + rank), images(1, True, seed=30 + rank), labels(1), labels(1))
    reference = single.compute()
    for _, out, message in results:
        assert message is None
        assert out["fid"] == pytest.approx(float(reference["fid"]), rel=1e-4)
        assert out["kid_mean"] == pytest.approx(float(reference["kid_mean"]), rel=1e-4)  # subset = all 2 samples
