"""SSCMetric against a hand-computed confusion matrix and a NumPy port of MonoScene's SSCMetrics."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from occscene_pl.metrics import SSCMetric


def monoscene_ssc_metrics(preds: np.ndarray, targets: np.ndarray, n_classes: int) -> dict[str, object]:
    """Port of monoscene/loss/sscMetrics.py (add_batch + get_stats), batch by batch, as in docs/design.md §7.3."""
    c_tp = c_fp = c_fn = 0
    tps, fps, fns = np.zeros(n_classes), np.zeros(n_classes), np.zeros(n_classes)
    for pred, gt in zip(preds, targets, strict=True):
        valid = gt != 255
        pb, gb = pred[valid] > 0, gt[valid] > 0
        c_tp += np.sum(pb & gb)
        c_fp += np.sum(pb & ~gb)
        c_fn += np.sum(~pb & gb)
        pk, gk = pred[valid], gt[valid]
        for c in range(n_classes):
            tps[c] += np.sum((pk == c) & (gk == c))
            fps[c] += np.sum((pk == c) & (gk != c))
            fns[c] += np.sum((pk != c) & (gk == c))
    if c_tp != 0:
        precision, recall, iou = c_tp / (c_tp + c_fp), c_tp / (c_tp + c_fn), c_tp / (c_tp + c_fp + c_fn)
    else:
        precision = recall = iou = 0.0
    iou_ssc = tps / (tps + fps + fns + 1e-5)
    return {"precision": precision, "recall": recall, "iou": iou, "iou_ssc": iou_ssc, "miou": iou_ssc[1:].mean()}


def test_hand_computed_confusion() -> None:
    # 3 classes; gt/pred pairs chosen so every count is easy to check by hand.
    gt = torch.tensor([[0, 0, 1, 1, 2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 2, 0, 2, 1]])
    metric = SSCMetric(num_classes=3)
    metric.update(pred, gt)
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert torch.equal(metric.confusion, expected)
    out = metric.compute()
    eps = 1e-5
    # class 0: tp 1, fp 1 (gt 2 -> 0), fn 1 (gt 0 -> 1); class 1: tp 2, fp 1, fn 0; class 2: tp 1, fp 0, fn 1.
    per_class = torch.tensor([1 / (3 + eps), 2 / (3 + eps), 1 / (2 + eps)])
    torch.testing.assert_close(out["per_class_iou"], per_class.float())
    torch.testing.assert_close(out["miou"], per_class[1:].mean().float())
    # geometry: occupied gt = {1,1,2,2}, occupied pred = {1,1,1,2,(2->0 miss)}: tp 3 (1,1,2), fp 1 (0->1), fn 1 (2->0)
    torch.testing.assert_close(out["iou"], torch.tensor(3 / 5))
    torch.testing.assert_close(out["precision"], torch.tensor(3 / 4))
    torch.testing.assert_close(out["recall"], torch.tensor(3 / 4))


@pytest.mark.parametrize("n_classes", [3, 12, 20])
def test_matches_monoscene_over_batches(n_classes: int) -> None:
    rng = np.random.default_rng(n_classes)
    metric = SSCMetric(num_classes=n_classes)
    all_preds, all_gts = [], []
    for _ in range(3):
        gt = rng.integers(0, n_classes, size=(2, 8, 8, 4))
        gt[rng.random(gt.shape) < 0.2] = 255
        gt[rng.random(gt.shape) < 0.4] = 0  # plenty of empty voxels, like real scenes
        pred = np.where(rng.random(gt.shape) < 0.6, np.where(gt == 255, 0, gt), rng.integers(0, n_classes, gt.shape))
        metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
        all_preds.append(pred)
        all_gts.append(gt)
    ours = metric.compute()
    ref = monoscene_ssc_metrics(np.concatenate(all_preds), np.concatenate(all_gts), n_classes)
    torch.testing.assert_close(ours["per_class_iou"].double(), torch.from_numpy(ref["iou_ssc"]), rtol=1e-6, atol=1e-7)
    for key in ("miou", "iou", "precision", "recall"):
        torch.testing.assert_close(
            ours[key].double(), torch.tensor(float(ref[key]), dtype=torch.float64), rtol=1e-6, atol=1e-7
        )


def test_logits_are_argmaxed_and_batch_size_does_not_matter() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 6, 6, 3, generator=gen)
    gt = torch.randint(0, 5, (4, 6, 6, 3), generator=gen)
    whole, split = SSCMetric(5), SSCMetric(5)
    whole.update(logits, gt)
    for i in range(4):
        split.update(logits[i : i + 1].argmax(1), gt[i : i + 1])
    assert torch.equal(whole.confusion, split.confusion)


def test_absent_classes_count_as_zero_and_no_tp_gives_zero_geometry() -> None:
    metric = SSCMetric(4)
    metric.update(torch.zeros(1, 4, dtype=torch.long), torch.tensor([[0, 0, 0, 255]]))
    out = metric.compute()
    assert out["iou"] == 0 and out["precision"] == 0 and out["recall"] == 0
    assert out["miou"] == 0
    assert out["per_class_iou"][0] > 0.99


def test_bad_inputs() -> None:
    metric = SSCMetric(3)
    with pytest.raises(ValueError, match="do not match target"):
        metric.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        metric.update(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 7]]))
    with pytest.raises(ValueError, match="num_classes"):
        SSCMetric(1)


def _ddp_worker(rank: int, world_size: int, port: int, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        gen = torch.Generator().manual_seed(rank)
        gt = torch.randint(0, 4, (2, 5, 5, 2), generator=gen)
        pred = torch.randint(0, 4, (2, 5, 5, 2), generator=gen)
        metric = SSCMetric(4)
        metric.update(pred, gt)
        out = metric.compute()  # synchronises the confusion matrix across ranks
        with metric.sync_context():
            synced = metric.confusion.tolist()
        queue.put((rank, synced, out["miou"].item()))
    finally:
        dist.destroy_process_group()


def test_ddp_sync_sums_confusion_matrices() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_ddp_worker, args=(2, port, queue), nprocs=2, join=True, start_method="spawn")
    results = sorted(queue.get(timeout=60) for _ in range(2))
    expected = SSCMetric(4)
    for rank in range(2):
        gen = torch.Generator().manual_seed(rank)
        gt = torch.randint(0, 4, (2, 5, 5, 2), generator=gen)
        pred = torch.randint(0, 4, (2, 5, 5, 2), generator=gen)
        expected.update(pred, gt)
    reference = expected.compute()["miou"].item()
    for _, confusion, miou in results:
        assert torch.equal(torch.tensor(confusion), expected.confusion)  # every rank sees the global sum
        assert miou == pytest.approx(reference, abs=1e-6)
