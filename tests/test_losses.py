"""SSC and diffusion losses vs straightforward re-implementations of MonoScene's formulas and hand-made examples."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from occscene_pl import losses
from occscene_pl.geometry import project_voxels
from occscene_pl.losses import (
    SSCLossWeights,
    diffusion_loss,
    downsample_labels,
    frustum_masks,
    frustum_proportion_loss,
    geo_scal_loss,
    relation_loss,
    relation_targets,
    sem_scal_loss,
    ssc_cross_entropy,
    ssc_loss,
)

IGNORE = 255


def random_case(seed: int = 0, shape: tuple[int, ...] = (2, 5, 4, 4, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and a target with every class but 3, plus ignored voxels."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator) * 2
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=generator)
    target[target == 3] = 0  # class 3 absent
    target[torch.rand(target.shape, generator=generator) < 0.2] = IGNORE
    return logits, target


# ---------------------------------------------------------------- references written from MonoScene's formulas


def reference_sem_scal(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred = F.softmax(pred, dim=1)
    mask = target != IGNORE
    loss, count = 0.0, 0
    for c in range(pred.shape[1]):
        p, y = pred[:, c][mask], (target[mask] == c).float()
        if y.sum() > 0:
            count += 1
            nominator = (p * y).sum()
            if p.sum() > 0:
                loss = loss + F.binary_cross_entropy(nominator / p.sum(), torch.tensor(1.0))
            loss = loss + F.binary_cross_entropy(nominator / y.sum(), torch.tensor(1.0))
            if (1 - y).sum() > 0:
                spec = ((1 - p) * (1 - y)).sum() / (1 - y).sum()
                loss = loss + F.binary_cross_entropy(spec, torch.tensor(1.0))
    return loss / count


def reference_geo_scal(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred = F.softmax(pred, dim=1)
    mask = target != IGNORE
    empty = pred[:, 0][mask]
    nonempty = 1 - empty
    y = (target[mask] != 0).float()
    intersection = (y * nonempty).sum()
    one = torch.tensor(1.0)
    precision = F.binary_cross_entropy(intersection / nonempty.sum(), one)
    recall = F.binary_cross_entropy(intersection / y.sum(), one)
    spec = F.binary_cross_entropy(((1 - y) * empty).sum() / (1 - y).sum(), one)
    return precision + recall + spec


def reference_frustum_loss(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    n_classes = pred.shape[1]
    prob = F.softmax(pred, dim=1)
    loss, nonempty = 0.0, 0
    for f in range(masks.shape[1]):
        mask = masks[:, f] & (target != IGNORE)  # MonoScene folds target != 255 into its stored masks
        counts = torch.stack([((target == c) & mask).sum() for c in range(n_classes)]).float()
        cum_prob = (prob * mask[:, None]).transpose(0, 1).reshape(n_classes, -1).sum(1)
        if cum_prob.sum() > 0 and counts.sum() > 0:
            t, q = counts / counts.sum(), cum_prob / cum_prob.sum()
            keep = t != 0
            loss = loss + F.kl_div(torch.log(q[keep]), t[keep], reduction="sum")
            nonempty += 1
    return loss / nonempty


def reference_cp_mega_matrix(target: np.ndarray, n_relations: int) -> np.ndarray:
    """MonoScene's ``compute_CP_mega_matrix`` loop (``docs/design.md`` §7.2)."""
    label_row = target.reshape(-1)
    s = [n // 2 for n in target.shape]
    matrix = np.zeros((n_relations, label_row.size, s[0] * s[1] * s[2]), dtype=np.uint8)
    for xx, yy, zz in itertools.product(range(s[0]), range(s[1]), range(s[2])):
        col = xx * s[1] * s[2] + yy * s[2] + zz
        children = target[2 * xx : 2 * xx + 2, 2 * yy : 2 * yy + 2, 2 * zz : 2 * zz + 2].reshape(-1)
        for lc in children[children != IGNORE]:
            row_ok = label_row != IGNORE
            if n_relations == 4:
                matrix[0, row_ok & (lc == label_row) & (lc != 0), col] = 1
                matrix[1, row_ok & (lc != label_row) & (lc != 0) & (label_row != 0), col] = 1
                matrix[2, row_ok & (label_row == lc) & (lc == 0), col] = 1
                matrix[3, row_ok & (label_row != lc) & ((label_row == 0) | (lc == 0)), col] = 1
            else:
                matrix[0, row_ok & (lc != label_row), col] = 1
                matrix[1, row_ok & (lc == label_row), col] = 1
    return matrix


# ---------------------------------------------------------------- cross-entropy and scene-class affinity


def test_cross_entropy_is_the_weighted_mean_over_valid_voxels() -> None:
    logits, target = random_case(1)
    weights = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.25])
    valid = target != IGNORE
    log_probs = F.log_softmax(logits, dim=1).movedim(1, -1)[valid]  # (M, C)
    labels = target[valid]
    expected = -(weights[labels] * log_probs[torch.arange(len(labels)), labels]).sum() / weights[labels].sum()
    torch.testing.assert_close(ssc_cross_entropy(logits, target, weights), expected)
    unweighted = -log_probs[torch.arange(len(labels)), labels].mean()
    torch.testing.assert_close(ssc_cross_entropy(logits, target.to(torch.uint8)), unweighted)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sem_scal_matches_monoscene(seed: int) -> None:
    logits, target = random_case(seed)
    torch.testing.assert_close(sem_scal_loss(logits, target), reference_sem_scal(logits, target))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_geo_scal_matches_monoscene(seed: int) -> None:
    logits, target = random_case(seed)
    torch.testing.assert_close(geo_scal_loss(logits, target), reference_geo_scal(logits, target))


def test_geo_scal_skips_terms_with_zero_denominator() -> None:
    logits, _ = random_case(3)
    target = torch.ones(logits.shape[0], *logits.shape[2:], dtype=torch.long)  # no empty voxel: no specificity
    probs = F.softmax(logits, dim=1)
    nonempty = 1 - probs[:, 0]
    expected = -torch.log(nonempty.sum() / nonempty.sum()) - torch.log(nonempty.sum() / target.numel())
    torch.testing.assert_close(geo_scal_loss(logits, target), expected)


# ---------------------------------------------------------------- frustums


def test_frustum_masks_by_hand() -> None:
    # 4 x 6 image (H x W), 2 x 2 frustums: columns split at u = 3, rows at v = 2.
    pixels = torch.tensor(
        [[[0.0, 0.0], [2.6, 1.0], [2.5, 1.4], [3.0, 0.0], [5.4, 3.0], [1.0, 2.0], [6.0, 1.0], [1.0, 1.0], [-0.6, 0]]]
    )
    depth = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0, 1.0]])
    masks = frustum_masks(pixels, depth, (4, 6), (9, 1, 1), frustum_size=2).reshape(4, 9)
    # Frustum order is row-major (top-left, top-right, bottom-left, bottom-right). 2.6 rounds to 3 (right band),
    # 2.5 to 2 (half-to-even, left band), u = 6 = W is outside, depth <= 0 is outside, -0.6 rounds to -1 (outside).
    expected = torch.tensor(
        [
            [1, 0, 1, 0, 0, 0, 0, 0, 0],
            [0, 1, 0, 1, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 1, 0, 0, 0],
            [0, 0, 0, 0, 1, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(masks, expected)


def test_frustum_masks_band_bounds_are_float_like_monoscene() -> None:
    # W = 10 with 4 bands: bounds 0, 2.5, 5, 7.5, 10; u = 7 is in band 2 and u = 8 in band 3.
    pixels = torch.tensor([[[2.0, 0.0], [3.0, 0.0], [7.0, 0.0], [8.0, 0.0]]])
    masks = frustum_masks(pixels, torch.ones(1, 4), (4, 10), (4, 1, 1), frustum_size=4)
    columns = masks[0, :4].reshape(4, 4).float().argmax(0)  # first row band, column of each voxel
    assert columns.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("seed", [0, 1])
def test_frustum_proportion_loss_matches_monoscene(seed: int) -> None:
    logits, target = random_case(seed, shape=(2, 4, 6, 5, 4))
    generator = torch.Generator().manual_seed(seed + 10)
    pixels = torch.rand(2, 120, 2, generator=generator) * torch.tensor([16.0, 8.0]) - 1.0
    depth = torch.randn(2, 120, generator=generator) + 1.0
    masks = frustum_masks(pixels, depth, (8, 16), (6, 5, 4), frustum_size=2)
    assert masks.any(dim=(2, 3, 4)).all()  # every frustum is populated in this case
    torch.testing.assert_close(
        frustum_proportion_loss(logits, target, masks, chunk=3), reference_frustum_loss(logits, target, masks)
    )


# ---------------------------------------------------------------- relations


def test_downsample_labels_by_hand() -> None:
    blocks = [
        [0] * 8,  # all empty -> 0
        [0] * 7 + [IGNORE],  # mostly non-semantic, more empty -> 0
        [0] * 4 + [IGNORE] * 4,  # tie empty / ignore -> 255
        [5] + [0] * 7,  # one semantic voxel: 7 <= 0.95 * 8 -> semantic majority 5
        [3, 3, 1, 1, 0, 0, IGNORE, 0],  # tie between 1 and 3 -> smallest id
        [IGNORE] * 8,  # -> 255
    ]
    target = torch.zeros(1, 12, 2, 2, dtype=torch.uint8)
    for i, values in enumerate(blocks):
        target[0, 2 * i : 2 * i + 2] = torch.tensor(values, dtype=torch.uint8).reshape(2, 2, 2)
    low = downsample_labels(target, 2)
    assert low.dtype == torch.uint8
    assert low.reshape(-1).tolist() == [0, 0, IGNORE, 5, 1, IGNORE]


def test_relation_targets_by_hand() -> None:
    # One supervoxel whose valid children are {0, 1, 2}; rows are the same 8 voxels.
    target = torch.tensor([0, 1, 1, IGNORE, 2, 0, IGNORE, IGNORE]).reshape(1, 2, 2, 2)
    rel = relation_targets(target)
    assert rel.shape == (1, 4, 8, 1) and rel.dtype == torch.uint8
    by_row_label = {0: [0, 0, 1, 1], 1: [1, 1, 0, 1], 2: [1, 1, 0, 1], IGNORE: [0, 0, 0, 0]}
    for n, label in enumerate(target.reshape(-1).tolist()):
        assert rel[0, :, n, 0].tolist() == by_row_label[label], (n, label)
    binary = relation_targets(target, n_relations=2)  # 0 = different, 1 = same
    by_row_label = {0: [1, 1], 1: [1, 1], 2: [1, 1], IGNORE: [0, 0]}
    for n, label in enumerate(target.reshape(-1).tolist()):
        assert binary[0, :, n, 0].tolist() == by_row_label[label]
    uniform = relation_targets(torch.full((1, 2, 2, 2), 4))  # all children and rows class 4: only "same non-empty"
    assert uniform[0, :, :, 0].sum(1).tolist() == [8, 0, 0, 0]


@pytest.mark.parametrize("n_relations", [4, 2])
def test_relation_targets_match_monoscene_loop(n_relations: int) -> None:
    generator = torch.Generator().manual_seed(n_relations)
    choices = torch.tensor([0, 0, 1, 2, 3, IGNORE])
    target = choices[torch.randint(0, 6, (2, 4, 6, 3), generator=generator)]  # odd last axis: row 2 has no parent
    rel = relation_targets(target, n_relations)
    for b in range(2):
        expected = reference_cp_mega_matrix(target[b].numpy(), n_relations)
        assert np.array_equal(rel[b].numpy(), expected)


def test_relation_loss_matches_monoscene() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 3, generator=generator)
    targets = (torch.rand(2, 4, 6, 3, generator=generator) < 0.3).to(torch.uint8)
    targets[:, 1] = 0  # a relation without positives must not give NaN
    flat_logits = logits.permute(0, 2, 3, 1).reshape(-1, 4)  # (M, R) like MonoScene's concatenation
    flat_labels = targets.permute(0, 2, 3, 1).reshape(-1, 4).float()
    pos_weight = (flat_labels == 0).sum(0) / flat_labels.sum(0).clamp(min=1)
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)(flat_logits, flat_labels)
    loss = relation_loss(logits, targets)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected)


# ---------------------------------------------------------------- ignore handling, diffusion, ssc_loss


def _frustum_term(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    masks = torch.zeros(target.shape[0], 2, *target.shape[1:], dtype=torch.bool)
    masks[:, 0, :2], masks[:, 1, 2:] = True, True
    return frustum_proportion_loss(logits, target, masks)


@pytest.mark.parametrize("loss_fn", [ssc_cross_entropy, sem_scal_loss, geo_scal_loss, _frustum_term])
def test_ignored_voxels_never_contribute(loss_fn) -> None:  # noqa: ANN001
    logits, target = random_case(4)
    ignored = target == IGNORE
    assert ignored.any()
    changed = logits.clone()
    changed.movedim(1, -1)[ignored] = torch.randn(int(ignored.sum()), logits.shape[1]) * 10
    changed.requires_grad_(True)
    loss = loss_fn(changed, target)
    torch.testing.assert_close(loss, loss_fn(logits, target))
    loss.backward()
    assert changed.grad.movedim(1, -1)[ignored].abs().max() == 0
    assert changed.grad.abs().max() > 0


@pytest.mark.parametrize("loss_fn", [ssc_cross_entropy, sem_scal_loss, geo_scal_loss, _frustum_term])
def test_all_ignored_gives_finite_zero(loss_fn) -> None:  # noqa: ANN001
    logits, target = random_case(5)
    loss = loss_fn(logits.requires_grad_(True), torch.full_like(target, IGNORE))
    assert loss.item() == 0.0
    loss.backward()


def test_diffusion_loss() -> None:
    generator = torch.Generator().manual_seed(0)
    output, target = torch.randn(3, 4, 2, 2, generator=generator), torch.randn(3, 4, 2, 2, generator=generator)
    torch.testing.assert_close(diffusion_loss(output, target), F.mse_loss(output, target))
    weights = torch.tensor([1.0, 0.0, 2.0])
    per_sample = [F.mse_loss(output[i], target[i]) for i in range(3)]
    expected = (per_sample[0] + 2 * per_sample[2]) / 3
    torch.testing.assert_close(diffusion_loss(output, target, weights), expected)
    with pytest.raises(ValueError, match="one per sample"):
        diffusion_loss(output, target, torch.ones(2))


def test_loss_weights_are_frozen_and_non_negative() -> None:
    weights = SSCLossWeights()
    assert dataclasses.astuple(weights) == (1.0, 1.0, 1.0, 1.0, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        weights.ce = 2.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="frustum"):
        SSCLossWeights(frustum=-1.0)


def _ssc_batch(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A (B=2, C=4, 8x8x4) case with a camera looking along +x; relation logits on a 4x4x2 grid (2x2x1 supervoxels)."""
    logits, target = random_case(seed, shape=(2, 4, 8, 8, 4))
    camera = torch.eye(4)
    camera[:3, :3] = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    batch = {
        "occupancy": target.to(torch.uint8),
        "image": torch.rand(2, 1, 3, 16, 24),
        "intrinsics": torch.tensor([[10.0, 0.0, 12.0], [0.0, 10.0, 8.0], [0.0, 0.0, 1.0]]).expand(2, 1, 3, 3),
        "voxel_to_camera": camera.expand(2, 1, 4, 4),
        "voxel_origin": torch.tensor([0.5, -2.0, -1.0]).expand(2, 3),
        "voxel_size": torch.full((2,), 0.5),
    }
    generator = torch.Generator().manual_seed(seed)
    output = {"logits": logits, "relation_logits": torch.randn(2, 4, 32, 4, generator=generator)}
    return output, batch


def test_ssc_loss_total_is_the_weighted_sum() -> None:
    output, batch = _ssc_batch()
    class_weights = torch.tensor([0.5, 1.0, 2.0, 1.5])
    weights = SSCLossWeights(ce=2.0, sem_scal=0.5, geo_scal=1.5, frustum=3.0, relation=0.25)
    terms = ssc_loss(output, batch, weights, class_weights)
    assert set(terms) == {"loss", "ce", "sem_scal", "geo_scal", "frustum", "relation"}
    target = batch["occupancy"].long()
    torch.testing.assert_close(terms["ce"], ssc_cross_entropy(output["logits"], target, class_weights))
    projection = project_voxels(
        (8, 8, 4), batch["voxel_origin"], batch["voxel_size"], batch["intrinsics"], batch["voxel_to_camera"], (16, 24)
    )
    masks = frustum_masks(projection.pixels[:, 0], projection.depth[:, 0], (16, 24), (8, 8, 4))
    assert masks.any()
    torch.testing.assert_close(terms["frustum"], frustum_proportion_loss(output["logits"], target, masks))
    relation = relation_loss(output["relation_logits"], relation_targets(downsample_labels(target, 2)))
    torch.testing.assert_close(terms["relation"], relation)
    expected = sum(getattr(weights, k) * terms[k] for k in ("ce", "sem_scal", "geo_scal", "frustum", "relation"))
    torch.testing.assert_close(terms["loss"], expected)
    precomputed = ssc_loss(output, {**batch, "frustum_masks": masks}, weights, class_weights)
    torch.testing.assert_close(precomputed["loss"], terms["loss"])


@pytest.mark.parametrize(
    ("field", "function"),
    [
        ("ce", "ssc_cross_entropy"),
        ("sem_scal", "sem_scal_loss"),
        ("geo_scal", "geo_scal_loss"),
        ("frustum", "frustum_proportion_loss"),
        ("relation", "relation_loss"),
    ],
)
def test_zero_weight_skips_the_term(field: str, function: str, monkeypatch: pytest.MonkeyPatch) -> None:
    output, batch = _ssc_batch(1)
    full = ssc_loss(output, batch)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{function} must not run when its weight is 0")

    monkeypatch.setattr(losses, function, fail)
    terms = ssc_loss(output, batch, SSCLossWeights(**{field: 0.0}))
    assert terms[field].item() == 0.0
    torch.testing.assert_close(terms["loss"], full["loss"] - full[field])


def test_ssc_loss_without_relation_logits_or_cameras() -> None:
    output, batch = _ssc_batch(2)
    del output["relation_logits"]
    terms = ssc_loss(output, {"occupancy": batch["occupancy"]}, SSCLossWeights(frustum=0.0))
    assert terms["relation"].item() == 0.0 and torch.isfinite(terms["loss"])
    with pytest.raises(KeyError, match="frustum_masks"):
        ssc_loss(output, {"occupancy": batch["occupancy"]})


@pytest.mark.parametrize("seed", [0, 1])
def test_frustum_ids_match_masks_and_give_the_same_loss(seed: int) -> None:
    from occscene_pl.losses import frustum_ids, frustum_masks, frustum_proportion_loss

    g = torch.Generator().manual_seed(seed)
    grid, image_size = (8, 8, 4), (24, 40)
    n = 8 * 8 * 4
    pixels = torch.rand(2, n, 2, generator=g) * torch.tensor([52.0, 32.0]) - torch.tensor([6.0, 4.0])
    pixels[0, :5] = torch.tensor([[5.0, 3.0], [4.999, 2.5], [39.5, 23.5], [0.0, 0.0], [35.0, 21.0]])  # band edges
    depth = torch.randn(2, n, generator=g)
    masks = frustum_masks(pixels, depth, image_size, grid, 8)
    ids = frustum_ids(pixels, depth, image_size, grid, 8)
    expected = torch.where(masks.any(1), masks.float().argmax(1), torch.full_like(ids, -1))
    assert torch.equal(ids, expected)
    assert (masks.sum(1) <= 1).all()  # the cells partition the image
    logits = torch.randn(2, 5, *grid, generator=g)
    target = torch.randint(0, 5, (2, *grid), generator=g)
    target[0, 0] = 255
    by_mask = frustum_proportion_loss(logits, target, masks)
    by_id = frustum_proportion_loss(logits, target, ids, num_frustums=64)
    torch.testing.assert_close(by_id, by_mask)


# ---------------------------------------------------------------- multi-view frustums (nuScenes: six views)


def _two_view_batch(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """:func:`_ssc_batch` with a second camera at ``(2.5, -3, 0)`` looking along +y: it sees voxels view 0 does not
    (near the camera 0 plane, at large ``|y|``) and shares others with it."""
    output, batch = _ssc_batch(seed)
    side = torch.eye(4)
    side[:3, :3] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    side[:3, 3] = torch.tensor([-2.5, 0.0, 3.0])
    batch["voxel_to_camera"] = torch.stack([batch["voxel_to_camera"][:, 0], side.expand(2, 4, 4)], dim=1)
    batch["intrinsics"] = batch["intrinsics"].repeat(1, 2, 1, 1)
    batch["image"] = batch["image"].repeat(1, 2, 1, 1, 1)
    return output, batch


def _projection(batch: dict[str, torch.Tensor]):  # noqa: ANN202
    return project_voxels(
        (8, 8, 4), batch["voxel_origin"], batch["voxel_size"], batch["intrinsics"], batch["voxel_to_camera"], (16, 24)
    )


def test_frustum_loss_uses_every_view() -> None:
    output, batch = _two_view_batch()
    target = batch["occupancy"].long()
    fov = _projection(batch).fov_mask.reshape(2, 2, 8, 8, 4)
    valid = target != IGNORE
    only_second = fov[:, 1] & ~fov[:, 0] & valid
    unseen = ~fov[:, 0] & ~fov[:, 1] & valid
    assert only_second.sum() >= 10 and unseen.any() and (fov[:, 0] & fov[:, 1] & valid).any()
    weights = SSCLossWeights(ce=0.0, sem_scal=0.0, geo_scal=0.0, relation=0.0)
    before = ssc_loss(output, batch, weights)["frustum"]

    def changed_at(where: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = output["logits"].clone()
        logits.movedim(1, -1)[where] = torch.tensor([8.0, -4.0, -4.0, -4.0])  # confidently empty
        return {**output, "logits": logits}

    # Voxels only the second view sees enter the loss (view 0 alone would ignore them) ...
    after = ssc_loss(changed_at(only_second), batch, weights)["frustum"]
    assert abs(after.item() - before.item()) > 1e-3
    # ... voxels no view sees do not.
    torch.testing.assert_close(ssc_loss(changed_at(unseen), batch, weights)["frustum"], before)
    # A single-view batch of the first camera is blind to the second view's voxels.
    first = {**batch, "intrinsics": batch["intrinsics"][:, :1], "voxel_to_camera": batch["voxel_to_camera"][:, :1]}
    torch.testing.assert_close(
        ssc_loss(changed_at(only_second), first, weights)["frustum"], ssc_loss(output, first, weights)["frustum"]
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_multi_view_frustum_loss_is_the_mean_over_all_views_frustums(seed: int) -> None:
    output, batch = _two_view_batch(seed)
    logits, target = output["logits"], batch["occupancy"].long()
    projection = _projection(batch)
    masks = frustum_masks(projection.pixels, projection.depth, (16, 24), (8, 8, 4))  # (B, 2 * 64, X, Y, Z)
    per_view = [frustum_masks(projection.pixels[:, v], projection.depth[:, v], (16, 24), (8, 8, 4)) for v in range(2)]
    assert masks.shape == (2, 128, 8, 8, 4) and torch.equal(masks, torch.cat(per_view, dim=1))
    assert (masks.sum(1) > 1).any()  # overlapping views: some voxels lie in a frustum of each
    frustum = ssc_loss(output, batch)["frustum"]
    # MonoScene's loop over the F = 128 frustums of both views
    torch.testing.assert_close(frustum, reference_frustum_loss(logits, target, masks))
    torch.testing.assert_close(frustum, frustum_proportion_loss(logits, target, masks, chunk=5))
    # ... which is the single-view loss of each view, weighted by its number of non-empty frustums
    valid = target != IGNORE
    singles, counts = [], []
    for v in range(2):
        ids = losses.frustum_ids(projection.pixels[:, v], projection.depth[:, v], (16, 24), (8, 8, 4))
        singles.append(frustum_proportion_loss(logits, target, ids, num_frustums=64))
        counts.append((per_view[v] & valid[:, None]).any(dim=(0, 2, 3, 4)).sum().float())
    assert min(counts) > 0
    expected = (singles[0] * counts[0] + singles[1] * counts[1]) / (counts[0] + counts[1])
    torch.testing.assert_close(frustum, expected)
    assert abs(frustum.item() - singles[0].item()) > 1e-4  # not view 0's loss


def test_multi_view_frustum_ids_match_masks() -> None:
    _, batch = _two_view_batch()
    projection = _projection(batch)
    masks = frustum_masks(projection.pixels, projection.depth, (16, 24), (8, 8, 4), frustum_size=4)
    ids = losses.frustum_ids(projection.pixels, projection.depth, (16, 24), (8, 8, 4), frustum_size=4)
    assert ids.shape == (2, 2, 8, 8, 4) and ids.dtype == torch.long
    for v in range(2):
        view_masks = masks[:, 16 * v : 16 * (v + 1)]
        expected = torch.where(view_masks.any(1), view_masks.float().argmax(1) + 16 * v, torch.full_like(ids[:, v], -1))
        assert torch.equal(ids[:, v], expected)
    logits, target = torch.randn(2, 4, 8, 8, 4), batch["occupancy"].long()
    torch.testing.assert_close(
        frustum_proportion_loss(logits, target, ids, num_frustums=32), frustum_proportion_loss(logits, target, masks)
    )


def test_frustum_shape_errors() -> None:
    logits, target = random_case(0, shape=(2, 4, 4, 4, 2))
    ids = torch.zeros(2, 3, 4, 4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="frustum ids must be"):
        frustum_proportion_loss(logits, target, ids[:1], num_frustums=64)
    with pytest.raises(ValueError, match="num_frustums=8"):
        frustum_proportion_loss(logits, target, ids + 8, num_frustums=8)
    with pytest.raises(ValueError, match="num_frustums is required"):
        frustum_proportion_loss(logits, target, ids)
    with pytest.raises(ValueError, match="projection_pixels must be"):
        losses.frustum_ids(torch.zeros(2, 3, 32, 2), torch.ones(2, 32), (8, 8), (4, 4, 2))
    with pytest.raises(ValueError, match="grid_size"):
        frustum_masks(torch.zeros(2, 3, 30, 2), torch.ones(2, 3, 30), (8, 8), (4, 4, 2))
