"""Metrics: confusion matrix, aAcc / mAcc / mIoU accumulated over the dataset, per-image counts, stuff-PQ."""

import math

import pytest
import torch

from trainables.metrics import (
    confusion_matrix,
    intersection_union,
    label_area,
    scores,
    scores_from_counts,
    stuff_pq,
)

IGN = 255


def test_confusion_matrix_counts_pairs_and_skips_ignored_pixels():
    target = torch.tensor([[[0, 0, 1], [2, IGN, 1]]])
    pred = torch.tensor([[[0, 1, 1], [1, 2, 1]]])
    conf = confusion_matrix(pred, target, 3)
    want = torch.zeros(3, 3, dtype=torch.long)
    for t, p in [(0, 0), (0, 1), (1, 1), (2, 1), (1, 1)]:
        want[t, p] += 1
    assert conf.dtype == torch.int64
    assert torch.equal(conf, want)


def test_scores_by_hand():
    # rows true, columns predicted
    conf = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 2, 0]])
    s = scores(conf)
    assert s["aacc"] == pytest.approx(5 / 8)
    assert s["macc"] == pytest.approx((3 / 4 + 2 / 2 + 0 / 2) / 3)
    # IoU: class 0: 3/(4+3-3); class 1: 2/(2+5-2); class 2: 0/(2+0-0)
    assert s["miou"] == pytest.approx((3 / 4 + 2 / 5 + 0) / 3)
    # a class neither present nor predicted does not count
    padded = torch.zeros(4, 4, dtype=torch.long)
    padded[:3, :3] = conf
    assert scores(padded) == pytest.approx(s)
    assert all(math.isnan(v) for v in scores(torch.zeros(2, 2, dtype=torch.long)).values())


def test_miou_is_accumulated_over_images_not_averaged_per_image():
    target = torch.tensor([[[0, 0, 0, 1]], [[1, 1, 1, 1]]])
    pred = torch.tensor([[[0, 0, 0, 0]], [[1, 1, 1, 1]]])
    total = scores(confusion_matrix(pred, target, 2))
    # class 0: I=3, U=4; class 1: I=4, U=5 over the dataset
    assert total["miou"] == pytest.approx((3 / 4 + 4 / 5) / 2)
    per_image = [scores(confusion_matrix(pred[i:i + 1], target[i:i + 1], 2))["miou"] for i in range(2)]
    assert sum(per_image) / 2 != pytest.approx(total["miou"])


def test_per_image_counts_agree_with_per_image_confusion_matrices():
    g = torch.Generator().manual_seed(0)
    k = 6
    target = torch.randint(0, k, (5, 9, 11), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = IGN
    pred = torch.randint(0, k, (5, 9, 11), generator=g)
    inter, union, correct, labelled = intersection_union(pred, target, k)
    area = label_area(target, k)
    for i in range(5):
        conf = confusion_matrix(pred[i], target[i], k)
        tp = conf.diagonal()
        assert torch.equal(inter[i], tp)
        assert torch.equal(union[i], conf.sum(0) + conf.sum(1) - tp)
        assert torch.equal(area[i], conf.sum(1))
        assert correct[i] == tp.sum() and labelled[i] == conf.sum()
    assert scores_from_counts(inter, union, area) == pytest.approx(scores(confusion_matrix(pred, target, k)))


def test_stuff_pq_by_hand():
    # class 0 IoU 6/7 (match), class 1 IoU 2/4 (no match: needs > 0.5), class 2 predicted only; the ignored
    # last pixel belongs to no segment
    target = torch.tensor([[[0, 0, 0, 0, 0, 0, 0, 1, 1, 1, IGN]]])
    pred = torch.tensor([[[0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2]]])
    inter, union, _, _ = intersection_union(pred, target, 3)
    assert inter[0].tolist() == [6, 2, 0] and union[0].tolist() == [7, 4, 1]
    pq = stuff_pq(pred, target, 3)
    # class 0: TP (IoU 6/7); class 1: FN + FP; class 2: FP
    pq0, pq1, pq2 = 6 / 7, 0.0, 0.0
    assert pq["pq"] == pytest.approx((pq0 + pq1 + pq2) / 3)
    assert pq["sq"] == pytest.approx((6 / 7 + 0 + 0) / 3)
    assert pq["rq"] == pytest.approx((1 + 0 + 0) / 3)
    perfect = stuff_pq(target.clamp(max=1), target, 3)
    assert perfect == {"pq": 1.0, "sq": 1.0, "rq": 1.0}


def test_bad_labels_and_predictions_raise():
    target = torch.tensor([[[0, 3]]])
    with pytest.raises(ValueError, match=r"label values \[3\] are outside \[0, 3\)"):
        confusion_matrix(torch.zeros_like(target), target, 3)
    with pytest.raises(ValueError, match=r"predicted classes \[7\]"):
        intersection_union(torch.tensor([[[0, 7]]]), torch.tensor([[[0, 1]]]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long), 3)
