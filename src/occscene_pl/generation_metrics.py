"""Generation metrics: FID, KID and occupancy consistency (``docs/design.md`` §7.4).

:class:`GenerationMetrics` gathers, over a whole validation/test epoch,

* **consistency** -- :class:`occscene_pl.metrics.SSCMetric` of the occupancy *predicted* from the generated images
  against the occupancy *condition* they were generated from (``consistency_miou``, ``consistency_iou``, ...);
* **FID** and **KID** of generated against real images with torchmetrics'
  :class:`~torchmetrics.image.fid.FrechetInceptionDistance` and :class:`~torchmetrics.image.kid.KernelInceptionDistance`
  on the features of the standard FID Inception-v3 (torch-fidelity's ``FeatureExtractorInceptionV3`` through
  torchmetrics' ``NoTrainInceptionV3``, antialiased resize to 299x299).

Nothing is ever downloaded. The Inception weights come from a local file only (``inception_weights``): the FID
Inception ``weights-inception-2015-12-05-6726825d.pth`` of torch-fidelity, also distributed by pytorch-fid as
``pt_inception-2015-12-05-6726825d.pth`` (the TensorFlow 2015-12-05 graph converted to PyTorch). Without it FID and
KID are skipped, ``available`` is ``False`` and ``message`` says how to enable them; they are never made up.

Design notes:

* **One Inception pass per image.** The network runs once in :meth:`GenerationMetrics.update`; FID and KID receive
  the features through an identity "feature extractor" (torchmetrics' custom-``Module`` path). This is also why the
  network is built here and not by the metrics: torchmetrics 1.9's ``KernelInceptionDistance`` has no
  ``feature_extractor_weights_path`` argument and would download the weights.
* **Not a parameter, not in checkpoints.** The Inception module is kept out of the registered submodules (a plain
  attribute), so it is not in ``parameters()`` (optimisers, DDP, model summaries never see it) nor in
  ``state_dict()`` (a checkpoint does not grow by 95 MB, and loading one never asks for Inception keys). Metric
  states are torchmetrics' default ``persistent=False``, so ``state_dict()`` of this module is empty. :meth:`_apply`
  moves the hidden network along with ``.to(device)`` / ``.cuda()``.
* **Device moves only.** ``.to(dtype)``, ``.half()`` or a Lightning ``*-true`` precision plugin change neither the
  Inception (kept float32) nor the metric states (FID keeps float64 sums); feature extraction also runs outside
  autocast, so mixed precision does not degrade the features.
* **DDP.** All states are torchmetrics states (sums, or feature lists that are gathered) and are synchronised by
  ``compute()``. Whether FID/KID can be computed is decided on the *global* sample counts (a synced counter), so
  every rank takes the same branch and the collective calls stay matched.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from occscene_pl.metrics import SSCMetric

__all__ = ["INCEPTION_WEIGHTS_FILE", "GenerationMetrics", "load_inception"]

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
"""File name of the FID Inception weights (pytorch-fid's name; torch-fidelity's copy is
``weights-inception-2015-12-05-6726825d.pth``)."""

_EXPECTED = (
    f"the FID Inception-v3 weights {INCEPTION_WEIGHTS_FILE} as distributed by pytorch-fid "
    "(torch-fidelity: weights-inception-2015-12-05-6726825d.pth), a PyTorch state_dict"
)
_UNAVAILABLE = (
    "FID/KID skipped: set model.evaluation.inception_weights to a local "
    f"{INCEPTION_WEIGHTS_FILE} weights file (nothing is downloaded)"
)
_FEATURES = (64, 192, 768, 2048)


def load_inception(weights: str | Path, feature: int = 2048) -> nn.Module:
    """Build the FID Inception-v3 feature extractor from a local weights file; never downloads.

    Args:
        weights: path to the Inception weights (see :data:`INCEPTION_WEIGHTS_FILE`).
        feature: which feature layer to return: 64, 192, 768 or 2048 (the standard FID pool features).

    Returns:
        torchmetrics' ``NoTrainInceptionV3`` (always in eval mode, no gradients), on the CPU, float32. It takes
        ``uint8`` images ``(N, 3, H, W)`` of any size and returns ``(N, feature)`` float32 features.

    Raises:
        FileNotFoundError: ``weights`` does not exist.
        ValueError: ``feature`` is not a valid layer, or the file is not a state_dict of this network.
        ModuleNotFoundError: torch-fidelity is not installed.
    """
    if feature not in _FEATURES:
        raise ValueError(f"feature must be one of {_FEATURES}, got {feature}")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file not found: {str(path)!r}; expected {_EXPECTED}")
    try:
        # Validate with the safe unpickler first: torch-fidelity itself loads with weights_only=False.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"Inception weights file {str(path)!r} cannot be read as a PyTorch file ({err}); expected {_EXPECTED}"
        ) from err
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"Inception weights file {str(path)!r} is not a state_dict of tensors; expected {_EXPECTED}")
    del state

    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        # With a path, torch-fidelity's constructor loads that file (strict) and never downloads.
        network = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=[str(feature)], feature_extractor_weights_path=str(path)
        )
    except ModuleNotFoundError:
        raise
    except Exception as err:
        raise ValueError(
            f"Inception weights file {str(path)!r} does not load into the FID Inception-v3 network ({err}); "
            f"expected {_EXPECTED}"
        ) from err
    return network


class _PrecomputedFeatures(nn.Module):
    """Identity "feature extractor": FID/KID receive features computed once by :class:`GenerationMetrics`."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # read by FrechetInceptionDistance instead of running a dummy image

    def forward(self, features: Tensor) -> Tensor:
        return features


class _SampleCounter(Metric):
    """Numbers of real and generated images, summed over ranks: the basis of every skip decision."""

    full_state_update = False
    counts: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("counts", default=torch.zeros(2, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, num_real: int, num_fake: int) -> None:
        self.counts += torch.tensor([num_real, num_fake], dtype=torch.long, device=self.counts.device)

    def compute(self) -> Tensor:
        return self.counts


class GenerationMetrics(nn.Module):
    """FID, KID and occupancy consistency over an evaluation epoch; DDP-safe, no downloads.

    Args:
        num_classes: number of occupancy classes (the empty class included), as for :class:`SSCMetric`.
        inception_weights: local path to the FID Inception weights; ``None`` turns FID/KID off (see ``message``).
        fid: compute FID (when the weights are given).
        kid: compute KID (when the weights are given).
        kid_subset_size: KID subset size; clamped at ``compute()`` to the numbers of real and generated images.
        ignore_index: condition label excluded from the consistency scores.
        feature: Inception feature layer for FID/KID: 2048 (standard), 768, 192 or 64.
        kid_subsets: number of random KID subsets (torchmetrics' ``subsets``).

    Attributes:
        available: whether FID/KID are computed at all (weights given and at least one of them on).
        message: one line saying why FID and/or KID are missing from the last ``compute()`` (or, before it, why they
            are off); ``None`` when nothing was skipped.
        kid_subset_size_used: the clamped KID subset size of the last ``compute()``; ``None`` when KID was not computed.

    Raises:
        FileNotFoundError: ``inception_weights`` is given but does not exist.
        ValueError: the weights file does not load into the Inception network, or an argument is invalid.
    """

    available: bool
    message: str | None
    kid_subset_size_used: int | None
    _inception: nn.Module | None

    def __init__(
        self,
        num_classes: int,
        inception_weights: str | Path | None = None,
        fid: bool = True,
        kid: bool = True,
        kid_subset_size: int = 50,
        ignore_index: int = 255,
        feature: int = 2048,
        kid_subsets: int = 100,
    ) -> None:
        super().__init__()
        if kid_subset_size < 2:
            raise ValueError(f"kid_subset_size must be >= 2, got {kid_subset_size}")
        if feature not in _FEATURES:
            raise ValueError(f"feature must be one of {_FEATURES}, got {feature}")
        self.consistency = SSCMetric(num_classes, ignore_index=ignore_index)
        self.kid_subset_size = kid_subset_size
        self.kid_subset_size_used = None
        self.feature = feature
        self.fid: FrechetInceptionDistance | None = None
        self.kid: KernelInceptionDistance | None = None
        self.counter: _SampleCounter | None = None
        # A plain attribute, deliberately not a registered submodule: see the module docstring.
        self.__dict__["_inception"] = None
        self._off_message: str | None

        if not (fid or kid):
            self.available, self._off_message = False, "FID/KID skipped: both are turned off (fid=False, kid=False)"
        elif inception_weights is None:
            self.available, self._off_message = False, _UNAVAILABLE
        else:
            self.__dict__["_inception"] = load_inception(inception_weights, feature)
            self.available, self._off_message = True, None
            self.counter = _SampleCounter()
            if fid:
                self.fid = FrechetInceptionDistance(feature=_PrecomputedFeatures(feature))
            if kid:
                with warnings.catch_warnings():  # "will save all extracted features in buffer": known, 8 KB/image
                    warnings.filterwarnings("ignore", message=".*Kernel Inception Distance.*", category=UserWarning)
                    self.kid = KernelInceptionDistance(
                        feature=_PrecomputedFeatures(feature), subsets=kid_subsets, subset_size=kid_subset_size
                    )
        self.message = self._off_message

    @property
    def inception(self) -> nn.Module | None:
        """The (unregistered) Inception feature extractor, or ``None`` when FID/KID are off."""
        return self._inception

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> GenerationMetrics:
        """Follow device moves only: the Inception stays float32 and the metric states keep their dtypes."""
        probe = fn(torch.zeros(1, device=self.consistency.device))
        device = probe.device

        def move(t: Tensor) -> Tensor:
            return t.to(device=device)

        super()._apply(move, recurse=recurse)
        if self._inception is not None:
            self._inception.to(device=device)
        return self

    @torch.no_grad()
    def _features(self, images: Tensor, name: str) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{name} must be (N, 3, H, W), got shape {tuple(images.shape)}")
        assert self._inception is not None
        device = next(self._inception.parameters()).device
        images = images.detach().to(device)
        if images.dtype != torch.uint8:
            if not images.is_floating_point():
                raise ValueError(f"{name} must be float in [0, 1] or uint8, got {images.dtype}")
            if not bool(torch.isfinite(images).all()):
                raise ValueError(f"{name} contain NaN or infinite values")
            images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
        with torch.autocast(device_type=device.type, enabled=False):
            return self._inception(images).float()

    def update(self, real_images: Tensor | None, fake_images: Tensor, predicted: Tensor, condition: Tensor) -> None:
        """Accumulate one batch.

        Args:
            real_images: ``(N, 3, H, W)`` real images, float in ``[0, 1]`` (clamped) or uint8; ``None`` when the batch
                has none (FID/KID then only see generated images from it). Any size: Inception resizes to 299.
            fake_images: ``(M, 3, H', W')`` generated images, same conventions.
            predicted: occupancy predicted from the generated images: labels ``(B, X, Y, Z)`` or logits
                ``(B, C, X, Y, Z)``.
            condition: the occupancy the images were generated from: labels ``(B, X, Y, Z)`` (``ignore_index`` where
                unknown) or class probabilities ``(B, C, X, Y, Z)`` (argmaxed).
        """
        if condition.is_floating_point() and condition.dim() == 5:
            condition = condition.argmax(dim=1)
        self.consistency.update(predicted.to(self.consistency.device), condition.to(self.consistency.device))
        if not self.available:
            return
        assert self.counter is not None
        fake = self._features(fake_images, "fake_images")
        real = self._features(real_images, "real_images") if real_images is not None else None
        self.counter.update(0 if real is None else real.shape[0], fake.shape[0])
        for metric in (self.fid, self.kid):
            if metric is None:
                continue
            metric.update(fake, real=False)
            if real is not None and real.shape[0]:
                metric.update(real, real=True)

    def compute(self) -> dict[str, Tensor]:
        """Metrics over everything accumulated since the last :meth:`reset` (synchronised across ranks).

        Returns:
            Always ``consistency_miou``, ``consistency_iou``, ``consistency_precision``, ``consistency_recall``
            (scalars) and ``consistency_per_class_iou`` ``(C,)``. When ``available``: ``fid`` if there are at least 2
            real and 2 generated images, ``kid_mean`` and ``kid_std`` if the clamped subset size is at least 2.
            Whatever is skipped is named, with the reason, in ``message``.
        """
        out = {f"consistency_{key}": value for key, value in self.consistency.compute().items()}
        self.kid_subset_size_used = None
        if not self.available:
            self.message = self._off_message
            return out
        assert self.counter is not None
        num_real, num_fake = (int(n) for n in self.counter.compute())  # global counts: every rank branches alike
        reasons = []
        if self.fid is not None:
            if num_real >= 2 and num_fake >= 2:
                out["fid"] = self.fid.compute()
            else:
                reasons.append(
                    f"FID skipped: needs >= 2 real and >= 2 generated images, got {num_real} real and {num_fake} "
                    "generated"
                )
        if self.kid is not None:
            subset = min(self.kid_subset_size, num_real, num_fake)
            if subset >= 2:
                self.kid.subset_size = subset
                out["kid_mean"], out["kid_std"] = self.kid.compute()
                self.kid_subset_size_used = subset
            else:
                reasons.append(
                    f"KID skipped: needs >= 2 real and >= 2 generated images, got {num_real} real and {num_fake} "
                    "generated"
                )
        self.message = "; ".join(reasons) or None
        return out

    def reset(self) -> None:
        """Clear every accumulated state (call at the end of each evaluation epoch)."""
        self.consistency.reset()
        for metric in (self.counter, self.fid, self.kid):
            if metric is not None:
                metric.reset()
        self.kid_subset_size_used = None
        self.message = self._off_message
