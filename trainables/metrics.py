"""Segmentation metrics from per-class pixel counts (ALGORITHMS.md): aAcc, mAcc, mIoU and stuff-PQ with SQ and RQ.

All counting is done with `torch.bincount` over (image, class) keys, never a Python loop over classes or
pixels. Scores are fractions in [0, 1]; a score with nothing to average over is NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from data.classes import IGNORE_INDEX

_NAN = float("nan")


def _check(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(target.shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    valid = target != ignore_index
    bad_target = valid & ((target < 0) | (target >= num_classes))
    bad_pred = valid & ((pred < 0) | (pred >= num_classes))
    if bool(bad_target.any()):
        values = torch.unique(target[bad_target]).tolist()[:10]
        raise ValueError(
            f"label values {values} are outside [0, {num_classes}) and not the ignore value {ignore_index}"
        )
    if bool(bad_pred.any()):
        values = torch.unique(pred[bad_pred]).tolist()[:10]
        raise ValueError(f"predicted classes {values} are outside [0, {num_classes})")
    return valid


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """K×K int64 counts, rows = true class, columns = predicted class; ignored pixels are not counted."""
    valid = _check(pred, target, num_classes, ignore_index)
    keys = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(keys, minlength=num_classes * num_classes).view(num_classes, num_classes)


def _per_image_counts(keys: Tensor, num_images: int, num_classes: int) -> Tensor:
    return torch.bincount(keys, minlength=num_images * num_classes).view(num_images, num_classes)


def intersection_union(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per image (pred, target N×H×W): intersection N×K, union N×K, correct pixels N, labelled pixels N."""
    inter, union, area = _per_image_areas(pred, target, num_classes, ignore_index)
    return inter, union, inter.sum(1), area.sum(1)


def label_area(target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per image, the number of labelled pixels of each class (N×K int64)."""
    return _per_image_areas(target, target, num_classes, ignore_index)[2]


def _per_image_areas(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int):
    valid = _check(pred, target, num_classes, ignore_index)
    n = target.shape[0]
    image = torch.arange(n, device=target.device).view(n, *([1] * (target.dim() - 1))).expand_as(target)
    target_keys = (image * num_classes + target.long())[valid]
    pred_keys = (image * num_classes + pred.long())[valid]
    hit = (pred == target)[valid]
    area_label = _per_image_counts(target_keys, n, num_classes)
    area_pred = _per_image_counts(pred_keys, n, num_classes)
    inter = _per_image_counts(target_keys[hit], n, num_classes)
    return inter, area_label + area_pred - inter, area_label


def _mean(values: Tensor, mask: Tensor) -> float:
    return float(values[mask].mean()) if bool(mask.any()) else _NAN


def scores_from_counts(inter: Tensor, union: Tensor, area: Tensor) -> dict[str, float]:
    """aAcc, mAcc, mIoU from per-class totals (K,) or per-image counts (N×K, summed first).

    mIoU averages over classes with union > 0 and mAcc over classes present in the labels, both from counts
    accumulated over all images (not per-image averages).
    """
    if inter.dim() == 2:
        inter, union, area = inter.sum(0), union.sum(0), area.sum(0)
    inter, union, area = inter.double(), union.double(), area.double()
    total = float(area.sum())
    return {
        "miou": _mean(inter / union.clamp_min(1), union > 0),
        "aacc": float(inter.sum()) / total if total > 0 else _NAN,
        "macc": _mean(inter / area.clamp_min(1), area > 0),
    }


def scores(conf: Tensor) -> dict[str, float]:
    """aAcc, mAcc, mIoU from a K×K confusion matrix (rows true, columns predicted)."""
    tp = conf.diagonal()
    area = conf.sum(1)
    return scores_from_counts(tp, area + conf.sum(0) - tp, area)


def stuff_pq_from_counts(inter: Tensor, union: Tensor, area: Tensor) -> dict[str, float]:
    """Stuff panoptic quality from per-image counts (N×K): each class is one segment per image.

    A predicted and a true segment of the same class match when their IoU exceeds 0.5; per class
    PQ = ΣIoU(matches) / (TP + FP/2 + FN/2), SQ = ΣIoU / TP, RQ = TP / (TP + FP/2 + FN/2), averaged over
    classes with at least one segment (SQ counts 0 for a class without matches). Ignored pixels belong to no
    segment.
    """
    inter, union, area = inter.double(), union.double(), area.double()
    pred_area = union - area + inter
    match = 2 * inter > union
    iou = torch.where(match, inter / union.clamp_min(1), torch.zeros_like(inter)).sum(0)
    tp = match.sum(0).double()
    fn = ((area > 0) & ~match).sum(0).double()
    fp = ((pred_area > 0) & ~match).sum(0).double()
    denominator = tp + 0.5 * fp + 0.5 * fn
    present = denominator > 0
    if not bool(present.any()):
        return {"pq": _NAN, "sq": _NAN, "rq": _NAN}
    safe = denominator.clamp_min(1e-12)
    return {
        "pq": float((iou / safe)[present].mean()),
        "sq": float((iou / tp.clamp_min(1))[present].mean()),
        "rq": float((tp / safe)[present].mean()),
    }


def stuff_pq(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> dict[str, float]:
    """Stuff-PQ, SQ and RQ of a batch of predictions (N×H×W); see `stuff_pq_from_counts`."""
    inter, union, area = _per_image_areas(pred, target, num_classes, ignore_index)
    return stuff_pq_from_counts(inter, union, area)

