"""Segmentation attack losses (ALGORITHMS.md): per-pixel definitions, per-image reduction, and a fused loss+gradient.

Every loss is maximised by the attacks. Pixels labelled with the ignore value contribute zero loss and zero
gradient. Per image, the per-pixel values are summed and divided by the number of labelled pixels.

`LOSSES` holds plain autograd implementations (the reference, also used by tests and for ad-hoc use);
`FusedLoss` computes the same per-image loss, the per-image count of correctly classified pixels and the
gradient with respect to the logits in closed form from one pass over the logits, which is what the attacks
call at every iteration so that the loss costs as little as possible next to the model's forward and backward.
With track="ce" its per-image value is plain cross-entropy instead of the loss itself (the reference's APGD drives
step sizes and restarts with CE while taking the gradient of the attack loss); with scaled=True its gradient is
multiplied per image by a power of two that keeps per-pixel logit gradients near 1, so that a float16 backward pass
through the model does not underflow (the sign, all the attacks use, is unchanged).
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
_LOG2E = 1.0 / math.log(2.0)


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


def _class_max(logits: Tensor) -> Tensor:
    """Per-pixel maximum over classes of N×K×H×W logits.

    On a single CPU thread a running elementwise maximum over the K class planes streams memory in order and
    takes ~0.7x the time of amax(1), whose reduction strides across planes; with more threads amax(1) wins
    (~0.75x the loop at 2 threads, whose K small kernels each pay dispatch and thread start-up), and
    elsewhere amax(1) is one kernel, not K.
    """
    if logits.device.type != "cpu" or logits.shape[1] < 2 or torch.get_num_threads() > 1:
        return logits.amax(1)
    top = torch.maximum(logits[:, 0], logits[:, 1])
    for c in range(2, logits.shape[1]):
        torch.maximum(top, logits[:, c], out=top)
    return top


class FusedLoss:
    """One attack loss bound to a batch of labels: per call, per-image value, correct pixels and d(loss)/d(logits).

    The gradient of every loss here has the closed form α·(softmax − onehot) (α·logits + β·onehot for
    Mask-Sph) with per-pixel scalars α, β, so one pass over the logits gives loss, accuracy and gradient,
    with no autograd graph through the loss. The per-image value is the loss (track="own") or the mean
    cross-entropy over labelled pixels (track="ce"); the gradient is always the loss's. Label-dependent constants
    are computed once, on the first call (which also checks the labels against the number of classes the logits
    have). The returned gradient lives in a workspace that the next call overwrites (reuse_buffer=False gives a
    fresh tensor each call).
    """

    def __init__(self, name: str, y: Tensor, ignore_index: int = IGNORE_INDEX, reuse_buffer: bool = True,
                 track: str = "own"):
        self.name = check_loss_name(name)
        self.track = check_track_name(track)
        self.y = y
        self.ignore_index = ignore_index
        self.reuse_buffer = reuse_buffer
        self.target, self.valid = split_labels(y, ignore_index)
        self.labelled = self.valid.sum((1, 2))
        self.num_classes: int | None = None
        self.base: Tensor | None = None
        self.plain: Tensor | None = None
        self.grad_scale: Tensor | None = None
        self._buffer: Tensor | None = None
        self._ones: Tensor | None = None

    def _finalise(self, num_classes: int, dtype: torch.dtype) -> None:
        check_labels(self.y, num_classes, self.ignore_index, where=f"attack loss {self.name!r}")
        plain = self.valid.to(dtype) / self.labelled.clamp_min(1).to(dtype).view(-1, 1, 1)
        base = plain
        if self.name == "mce-bal":
            base = base * class_balance_weights(self.y, num_classes, self.ignore_index, dtype)
        self.base = base
        self.plain = plain if self.track == "ce" else None
        # per image, the power of two that brings the largest per-pixel weight into (½, 1] (1 without labels):
        # exact in floating point, so a float32 gradient only changes scale, never rounding or sign
        peak = base.flatten(1).amax(1)
        self.grad_scale = torch.where(peak > 0, torch.exp2(torch.floor(-torch.log2(peak))), torch.ones_like(peak))
        self.num_classes = num_classes

    def select(self, index: Tensor) -> FusedLoss:
        """The same loss restricted to the images at `index` (for shrinking the active batch)."""
        sub = FusedLoss.__new__(FusedLoss)
        sub.name, sub.track, sub.ignore_index, sub.reuse_buffer = self.name, self.track, self.ignore_index, \
            self.reuse_buffer
        sub.y, sub.target, sub.valid = self.y[index], self.target[index], self.valid[index]
        sub.labelled = self.labelled[index]
        sub.num_classes = self.num_classes
        sub.base, sub.plain, sub.grad_scale = (None if t is None else t[index]
                                               for t in (self.base, self.plain, self.grad_scale))
        sub._buffer = sub._ones = None
        return sub

    def _workspace(self, logits: Tensor) -> Tensor:
        buf = self._buffer
        if (
            not self.reuse_buffer
            or buf is None
            or buf.shape != logits.shape
            or buf.dtype != logits.dtype
            or buf.device != logits.device
        ):
            buf = torch.empty_like(logits, memory_format=torch.contiguous_format)
            if self.reuse_buffer:
                self._buffer = buf
        return buf

    def _class_sum(self, buf: Tensor) -> Tensor:
        """Sum over the class dimension of N×K×H×W as a batched matrix product (much faster than sum(1) on CPU)."""
        n, k = buf.shape[:2]
        ones = self._ones
        if ones is None or ones.shape != (n, 1, k) or ones.dtype != buf.dtype or ones.device != buf.device:
            ones = self._ones = torch.ones(n, 1, k, dtype=buf.dtype, device=buf.device)
        return torch.bmm(ones, buf.view(n, k, -1)).view(n, *buf.shape[2:])

    @torch.no_grad()
    def __call__(
        self, logits: Tensor, *, step: int = 0, total_steps: int = 1, scaled: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """logits N×K×H×W -> (value N, correct pixels N (int64), gradient of loss.sum() w.r.t. logits).

        value is the per-image loss (track="own") or mean cross-entropy (track="ce"). scaled: image i's gradient
        is multiplied by `grad_scale[i]`, a power of two bringing its largest per-pixel weight into (½, 1].
        Computed in float32 (or float64) whatever the logits' dtype, also inside an autocast region.
        """
        with torch.autocast(logits.device.type, enabled=False):
            return self._fused(logits.detach(), step, total_steps, scaled)

    def _fused(self, logits: Tensor, step: int, total_steps: int, scaled: bool) -> tuple[Tensor, Tensor, Tensor]:
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        if self.num_classes is None:
            self._finalise(logits.shape[1], logits.dtype)
        elif logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes, the loss was set up for {self.num_classes}")
        target, valid, base = self.target, self.valid, self.base
        index = target.unsqueeze(1)
        # A pixel counts as correct when its true-class logit is the maximum (differs from argmax only on
        # exact ties, where argmax picks the lowest class index).
        top = _class_max(logits)
        u_y = logits.gather(1, index).squeeze(1)
        correct_px = (u_y >= top) & valid
        correct = correct_px.sum((1, 2))
        buf = self._workspace(logits)
        scale = self.grad_scale.view(-1, 1, 1) if scaled else None
        tracked = None

        if self.name != "mask-sph" or self.track == "ce":
            # exp(u − max) as 2^(log2(e)·u − log2(e)·max): one fused pass for shift and scale, and exp2 is several
            # times faster than exp on CPU
            torch.add((-_LOG2E) * top.unsqueeze(1), logits, alpha=_LOG2E, out=buf)
            buf.exp2_()
            expsum = self._class_sum(buf)
            ce = torch.log(expsum).add_(top).sub_(u_y)
            if self.track == "ce":
                tracked = (ce * self.plain).sum((1, 2))

        if self.name == "mask-sph":
            torch.mul(logits, logits, out=buf)
            norm = self._class_sum(buf).sqrt_().clamp_min_(1e-12)
            w = base * correct_px
            loss = (-w * u_y / norm).sum((1, 2))
            if scale is not None:
                w = w * scale
            alpha = w * u_y / norm.pow(3)
            beta = -w / norm
            torch.mul(logits, alpha.unsqueeze(1), out=buf)
            buf.scatter_add_(1, index, beta.unsqueeze(1))
            return loss if tracked is None else tracked, correct, buf

        if self.name == "js":
            q = ce.neg().exp_()
            one_q = q + 1.0
            log1p_q = torch.log(one_q)  # q is in [0, 1]; log1p is not vectorised on CPU
            # the docstring's JS, rearranged: log 2 − ½·[q·CE + (1+q)·log(1+q)]; base sums to 1 per image
            # with labelled pixels (0 without), so the log 2 term is log 2 on those images
            half = 0.5 * base
            inner = torch.mul(q, ce).addcmul_(one_q, log1p_q)
            loss = _LOG2 * (self.labelled > 0).to(base.dtype) - inner.mul_(half).sum((1, 2))
            # dJS/dq = ½·log(q/(1+q)) = −½·(CE + log(1+q)) and dq/du = q·(onehot − softmax)
            alpha = q.mul_(half).mul_(ce.add_(log1p_q))
        else:
            if self.name == "ce":
                w = base
            elif self.name in ("mce", "mce-bal"):
                w = base * correct_px
            elif self.name == "segpgd":
                lam = step / (2.0 * total_steps)
                w = base * (lam + (1.0 - 2.0 * lam) * correct_px.to(base.dtype))
            else:  # cospgd
                s = torch.sigmoid(logits)
                cos = torch.sigmoid(u_y) / s.mul_(s).sum(1).sqrt_().clamp_min_(1e-12)
                w = base * cos
            loss = (w * ce).sum((1, 2))
            alpha = w
        if scale is not None:
            alpha = alpha * scale
        buf.mul_((alpha / expsum).unsqueeze(1))
        buf.scatter_add_(1, index, -alpha.unsqueeze(1))
        return loss if tracked is None else tracked, correct, buf
