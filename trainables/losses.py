"""Segmentation attack losses (ALGORITHMS.md): per-pixel definitions, per-image reduction, a loss bound to labels.

Every loss is maximised by the attacks. Pixels labelled with the ignore value contribute zero loss and zero
gradient. Per image, the per-pixel values are summed and divided by the number of labelled pixels.

`LOSSES` holds the one implementation of each loss (autograd does the gradients); `AttackLoss` binds a loss to a
batch of labels for the attacks: per call, the per-image value that drives APGD's step sizes, the correct pixels, and
the objective to differentiate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from data.classes import IGNORE_INDEX

LOSS_NAMES = ("ce", "mce", "mce-bal", "js", "segpgd", "cospgd", "mask-sph")
# what drives APGD's step-size checkpoints and best-point restarts: per-image cross-entropy or the attack loss itself
TRACKS = ("ce", "own")

_LOG2 = math.log(2.0)


def check_loss_name(name: str) -> str:
    """Return `name` if it is a known attack loss, else raise naming the valid ones."""
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown attack loss {name!r}; valid losses: {', '.join(LOSS_NAMES)}")
    return name


def check_track_name(track: str) -> str:
    """Return `track` if it names a tracked quantity, else raise naming the valid ones."""
    if track not in TRACKS:
        raise ValueError(f"unknown track {track!r}; valid: {', '.join(TRACKS)} (ce: per-image cross-entropy, "
                         "own: the attack loss itself)")
    return track


def split_labels(y: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Labels -> (target with ignored pixels set to class 0, bool mask of labelled pixels)."""
    valid = y != ignore_index
    return torch.where(valid, y, torch.zeros_like(y)), valid


def check_labels(y: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX, where: str = "labels") -> None:
    """Raise if a label lies outside [0, num_classes) and is not the ignore value."""
    if y.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or y.dtype == torch.bool:
        raise ValueError(f"{where}: labels must be an integer tensor, got dtype {y.dtype}")
    bad = (y != ignore_index) & ((y < 0) | (y >= num_classes))
    if bool(bad.any()):
        values = torch.unique(y[bad]).tolist()[:10]
        raise ValueError(
            f"{where}: label values {values} are outside [0, {num_classes}) and are not the ignore value "
            f"{ignore_index}; valid labels are 0..{num_classes - 1} and {ignore_index}"
        )


def class_balance_weights(
    y: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Per pixel, 1 / (labelled pixels of its class in its image); 0 on ignored pixels (N×H×W float)."""
    target, valid = split_labels(y, ignore_index)
    n = y.shape[0]
    image = torch.arange(n, device=y.device).view(n, 1, 1).expand_as(target)
    keys = (image * num_classes + target)[valid]
    counts = torch.bincount(keys, minlength=n * num_classes).view(n, num_classes)
    per_pixel = counts.gather(1, target.reshape(n, -1)).view_as(target)
    return valid.to(dtype) / per_pixel.clamp_min(1).to(dtype)


def _correct(logits: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    return (logits.detach().argmax(1) == target) & valid


def _ce(logits: Tensor, y: Tensor, ignore_index: int) -> Tensor:
    return F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="none")


def ce_pixel(logits: Tensor, y: Tensor, *, ignore_index: int = IGNORE_INDEX, step: int = 0, total_steps: int = 1):
    """Cross-entropy per pixel."""
    return _ce(logits, y, ignore_index)


def mce_pixel(logits: Tensor, y: Tensor, *, ignore_index: int = IGNORE_INDEX, step: int = 0, total_steps: int = 1):
    """Mask-CE: cross-entropy on currently correct pixels only (the mask is not differentiated)."""
    target, valid = split_labels(y, ignore_index)
    return _ce(logits, y, ignore_index) * _correct(logits, target, valid)


def mce_bal_pixel(
    logits: Tensor, y: Tensor, *, ignore_index: int = IGNORE_INDEX, step: int = 0, total_steps: int = 1
):
    """Mask-CE-Bal: Mask-CE weighted by 1 / (labelled pixels of the pixel's class in its image)."""
    weights = class_balance_weights(y, logits.shape[1], ignore_index, logits.dtype)
    return mce_pixel(logits, y, ignore_index=ignore_index) * weights


def js_pixel(logits: Tensor, y: Tensor, *, ignore_index: int = IGNORE_INDEX, step: int = 0, total_steps: int = 1):
    """Jensen-Shannon divergence between softmax(logits) and the one-hot label, summed over classes (≤ log 2).

    With q the probability of the true class it reduces to ½[q·log(2q/(1+q)) + (1−q)·log 2 − log((1+q)/2)].
    """
    target, valid = split_labels(y, ignore_index)
    log_q = -F.cross_entropy(logits, target, reduction="none")
    q = log_q.exp()
    log1p_q = torch.log1p(q)
    js = 0.5 * (q * (_LOG2 + log_q - log1p_q) + (1.0 - q) * _LOG2 - (log1p_q - _LOG2))
    return js * valid


def segpgd_pixel(
    logits: Tensor, y: Tensor, *, ignore_index: int = IGNORE_INDEX, step: int = 0, total_steps: int = 1
):
    """SegPGD: CE weighted by 1−λ on correct and λ on wrong pixels, λ = step / (2·total_steps)."""
    target, valid = split_labels(y, ignore_index)
    lam = step / (2.0 * total_steps)
    correct = _correct(logits, target, valid)
    weight = (lam + (1.0 - 2.0 * lam) * correct.to(logits.dtype)) * valid
    return _ce(logits, y, ignore_index) * weight


def cospgd_pixel(
    logits: Tensor, y: Tensor, *, ignore_index: int = IGNORE_INDEX, step: int = 0, total_steps: int = 1
):
    """CosPGD: CE weighted by the (detached) cosine similarity of sigmoid(logits) and the one-hot label."""
    target, valid = split_labels(y, ignore_index)
    with torch.no_grad():
        s = torch.sigmoid(logits)
        cos = s.gather(1, target.unsqueeze(1)).squeeze(1) / s.norm(dim=1).clamp_min(1e-12)
    return _ce(logits, y, ignore_index) * cos * valid


def mask_sph_pixel(
    logits: Tensor, y: Tensor, *, ignore_index: int = IGNORE_INDEX, step: int = 0, total_steps: int = 1
):
    """Mask-Sph: minus the true-class entry of the ℓ2-normalised logits, on currently correct pixels only."""
    target, valid = split_labels(y, ignore_index)
    u_y = logits.gather(1, target.unsqueeze(1)).squeeze(1)
    return -(u_y / logits.norm(dim=1).clamp_min(1e-12)) * _correct(logits, target, valid)


LOSSES: dict[str, Callable[..., Tensor]] = {
    "ce": ce_pixel,
    "mce": mce_pixel,
    "mce-bal": mce_bal_pixel,
    "js": js_pixel,
    "segpgd": segpgd_pixel,
    "cospgd": cospgd_pixel,
    "mask-sph": mask_sph_pixel,
}


def per_image_loss(
    name: str,
    logits: Tensor,
    y: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    step: int = 0,
    total_steps: int = 1,
) -> Tensor:
    """Per-image loss (N,): the per-pixel loss summed over the image and divided by its labelled pixels."""
    pixel = LOSSES[check_loss_name(name)](logits, y, ignore_index=ignore_index, step=step, total_steps=total_steps)
    labelled = (y != ignore_index).sum((1, 2)).clamp_min(1).to(pixel.dtype)
    return pixel.sum((1, 2)) / labelled


class AttackLoss:
    """One attack loss bound to a batch of labels: per call, per-image value, correct pixels and the objective.

    The objective is the scalar Σ_i s_i·loss_i (loss_i the per-image loss of `per_image_loss`, s_i a per-image
    power of two that brings the largest per-pixel weight of image i into (½, 1]), whose autograd gradient is
    what the attacks step along: per-pixel logit gradients stay near 1, so a float16 backward pass through the
    model does not underflow, and in float32 the scaling is exact (the sign, all the attacks use, is unchanged).
    The per-image value is the loss (track="own") or the mean cross-entropy over labelled pixels (track="ce", as
    the reference's APGD drives step sizes and restarts). The loss itself is always the one of `LOSSES`,
    computed in float32 (or float64) whatever the logits' dtype, also inside an autocast region.
    """

    def __init__(self, name: str, y: Tensor, ignore_index: int = IGNORE_INDEX, track: str = "own",
                 check: bool = True):
        self.check = check  # False: the caller checks the labels (a check reads a value on the host)
        self.name = check_loss_name(name)
        self.track = check_track_name(track)
        self.y = y
        self.ignore_index = ignore_index
        self.target, self.valid = split_labels(y, ignore_index)
        self.num_classes: int | None = None
        self.grad_scale: Tensor | None = None

    def _finalise(self, num_classes: int, dtype: torch.dtype) -> None:
        if self.check:
            check_labels(self.y, num_classes, self.ignore_index, where=f"attack loss {self.name!r}")
        weight = self.valid.to(dtype) / self.valid.sum((1, 2)).clamp_min(1).to(dtype).view(-1, 1, 1)
        if self.name == "mce-bal":
            weight = weight * class_balance_weights(self.y, num_classes, self.ignore_index, dtype)
        peak = weight.flatten(1).amax(1)
        self.grad_scale = torch.where(peak > 0, torch.exp2(torch.floor(-torch.log2(peak))), torch.ones_like(peak))
        self.num_classes = num_classes

    def select(self, index: Tensor) -> AttackLoss:
        """The same loss restricted to the images at `index` (for shrinking the active batch)."""
        sub = AttackLoss(self.name, self.y[index], self.ignore_index, self.track, check=False)
        sub.num_classes = self.num_classes
        sub.grad_scale = None if self.grad_scale is None else self.grad_scale[index]
        return sub

    def __call__(self, logits: Tensor, *, step: int = 0, total_steps: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """logits N×K×H×W -> (per-image value N, correct pixels N (int64), the differentiable objective)."""
        with torch.autocast(logits.device.type, enabled=False):
            if logits.dtype not in (torch.float32, torch.float64):
                logits = logits.float()
            if self.num_classes is None:
                self._finalise(logits.shape[1], logits.dtype)
            elif logits.shape[1] != self.num_classes:
                raise ValueError(f"logits have {logits.shape[1]} classes, the loss was set up for {self.num_classes}")
            loss = per_image_loss(self.name, logits, self.y, ignore_index=self.ignore_index, step=step,
                                  total_steps=total_steps)
            objective = (loss * self.grad_scale.to(loss.dtype)).sum()
            with torch.no_grad():
                correct = ((logits.argmax(1) == self.target) & self.valid).sum((1, 2))
                value = loss.detach() if self.track == "own" else per_image_loss(
                    "ce", logits, self.y, ignore_index=self.ignore_index)
        return value, correct, objective
