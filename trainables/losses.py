"""Segmentation attack losses (ALGORITHMS.md): per-pixel definitions, per-image reduction, a loss bound to labels.

Every loss is maximised by the attacks. Pixels labelled with the ignore value contribute zero loss and zero
gradient. Per image, the per-pixel values are summed and divided by the number of labelled pixels.

`LOSSES` holds the one implementation of each loss, written on `PixelTerms` (what the losses share, computed once per
batch: cross-entropy, the correct mask); autograd does the gradients, cross-entropy's being its closed form
(`_CrossEntropy`, the one place it is computed). `AttackLoss` binds a loss to a batch of labels for the attacks: per
call, the per-image value that drives APGD's step sizes, the correct pixels, and the objective to differentiate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
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


def class_sum(t: Tensor) -> Tensor:
    """Sum over the class dimension of N×K×H×W as a batched matrix product: differentiable, and on a CPU several
    times faster than sum(1), whose reduction strides across the class planes."""
    n, k = t.shape[:2]
    return torch.bmm(t.new_ones(n, 1, k), t.reshape(n, k, -1)).view(n, *t.shape[2:])


class _CrossEntropy(torch.autograd.Function):
    """Per-pixel cross-entropy (0 on ignored pixels) from the per-pixel maximum logit, with its closed-form gradient
    (softmax − onehot): F.cross_entropy's values, at a fraction of its CPU cost over N×K×H×W logits (one pass for
    the shifted exponentials, class sums as matrix products, no one-hot or log-softmax tensor). The one place
    cross-entropy is computed; every loss built on it gets its gradient through autograd. A workspace of the
    logits' shape may be passed: the exponentials and then the gradient are written into it (fresh tensors of
    this size cost page faults on every call), so it must not be reused before this backward has run, which may
    then run once only; it must have the logits' shape and dtype (`AttackLoss` keeps one that does)."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, valid: Tensor, top: Tensor, workspace: Tensor | None) -> Tensor:
        ctx.in_place = workspace is not None
        if not ctx.in_place:
            workspace = torch.empty_like(logits, memory_format=torch.contiguous_format)
        # exp(u − max) as 2^(log2(e)·u − log2(e)·max): one fused pass for shift and scale, and exp2 is several
        # times faster than exp on a CPU
        exp = torch.add((-_LOG2E) * top.unsqueeze(1), logits, alpha=_LOG2E, out=workspace).exp2_()
        total = class_sum(exp)
        u_y = logits.gather(1, target.unsqueeze(1)).squeeze(1)
        ce = total.log().add_(top).sub_(u_y).mul_(valid)
        ctx.save_for_backward(exp, total, target, valid)
        return ce

    @staticmethod
    def backward(ctx, grad_ce: Tensor):
        exp, total, target, valid = ctx.saved_tensors
        weight = grad_ce * valid
        scale = (weight / total).unsqueeze(1)
        grad = exp.mul_(scale) if ctx.in_place else exp * scale  # in the workspace: one backward, no new tensor
        grad.scatter_add_(1, target.unsqueeze(1), -weight.unsqueeze(1))
        return grad, None, None, None, None


class _TrueClassCosine(torch.autograd.Function):
    """Per pixel u_y / max(‖u‖₂, 1e-12), the true-class entry of the ℓ2-normalised logits, with its closed-form
    gradient g·(δ_ky / ‖u‖ − u_y·u_k / ‖u‖³) (below the clamp g·δ_ky / 1e-12, finite where autograd's sqrt gives
    NaN): one pass over N×K×H×W for the squares and one for the gradient, where autograd spends six (the squares,
    their backward twice, the gather's scatter into zeros, the sums of the branches). A workspace of the logits'
    shape and dtype holds the squares and then the gradient; like `_CrossEntropy`'s, it must not be reused before
    this backward has run."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, workspace: Tensor | None) -> Tensor:
        squares = torch.mul(logits, logits, out=workspace)
        norm = class_sum(squares).sqrt_()
        safe = norm.clamp_min(1e-12)
        u_y = logits.gather(1, target.unsqueeze(1)).squeeze(1)
        ctx.save_for_backward(logits, target, norm, safe, u_y)
        ctx.workspace = workspace
        return u_y / safe

    @staticmethod
    def backward(ctx, grad_cos: Tensor):
        logits, target, norm, safe, u_y = ctx.saved_tensors
        along = torch.where(norm >= 1e-12, -grad_cos * u_y / (safe * safe * safe), torch.zeros_like(safe))
        grad = torch.mul(logits, along.unsqueeze(1), out=ctx.workspace)
        grad.scatter_add_(1, target.unsqueeze(1), (grad_cos / safe).unsqueeze(1))
        return grad, None, None


class PixelTerms:
    """What the losses share for one batch of logits and labels, each computed once: the target with ignored
    pixels at class 0, the labelled mask, the per-pixel maximum, the correct mask and the (differentiable) CE.
    `workspaces`: two tensors of the logits' shape and dtype that the closed-form gradients write into (CE's, and
    Mask-Sph's), kept by the caller across calls; without them each call allocates."""

    def __init__(self, logits: Tensor, y: Tensor, ignore_index: int = IGNORE_INDEX,
                 workspaces: tuple[Tensor, Tensor | None] | None = None):
        self.logits, self.y, self.ignore_index = logits, y, ignore_index
        self.workspace, self.aux_workspace = workspaces if workspaces is not None else (None, None)
        self.target, self.valid = split_labels(y, ignore_index)
        self._ce: Tensor | None = None
        self._correct: Tensor | None = None
        detached = logits.detach()
        self.top = detached.amax(1)
        self.u_y = detached.gather(1, self.target.unsqueeze(1)).squeeze(1)

    @property
    def ce(self) -> Tensor:
        """Cross-entropy per pixel, 0 on ignored pixels."""
        if self._ce is None:
            self._ce = _CrossEntropy.apply(self.logits, self.target, self.valid, self.top, self.workspace)
        return self._ce

    @property
    def correct(self) -> Tensor:
        """Labelled pixels whose true-class logit is the maximum (argmax differs only on exact ties)."""
        if self._correct is None:
            self._correct = (self.u_y >= self.top) & self.valid
        return self._correct


def ce_pixel(t: PixelTerms, step: int = 0, total_steps: int = 1) -> Tensor:
    """Cross-entropy per pixel."""
    return t.ce


def mce_pixel(t: PixelTerms, step: int = 0, total_steps: int = 1) -> Tensor:
    """Mask-CE: cross-entropy on currently correct pixels only (the mask is not differentiated)."""
    return t.ce * t.correct


def mce_bal_pixel(t: PixelTerms, step: int = 0, total_steps: int = 1) -> Tensor:
    """Mask-CE-Bal: Mask-CE weighted by 1 / (labelled pixels of the pixel's class in its image)."""
    weights = class_balance_weights(t.y, t.logits.shape[1], t.ignore_index, t.logits.dtype)
    return mce_pixel(t) * weights


def js_pixel(t: PixelTerms, step: int = 0, total_steps: int = 1) -> Tensor:
    """Jensen-Shannon divergence between softmax(logits) and the one-hot label, summed over classes (≤ log 2).

    With q the probability of the true class it reduces to ½[q·log(2q/(1+q)) + (1−q)·log 2 − log((1+q)/2)].
    """
    log_q = -t.ce
    q = log_q.exp()
    log1p_q = torch.log1p(q)
    js = 0.5 * (q * (_LOG2 + log_q - log1p_q) + (1.0 - q) * _LOG2 - (log1p_q - _LOG2))
    return js * t.valid


def segpgd_pixel(t: PixelTerms, step: int = 0, total_steps: int = 1) -> Tensor:
    """SegPGD: CE weighted by 1−λ on correct and λ on wrong pixels, λ = step / (2·total_steps)."""
    lam = step / (2.0 * total_steps)
    weight = (lam + (1.0 - 2.0 * lam) * t.correct.to(t.logits.dtype)) * t.valid
    return t.ce * weight


def cospgd_pixel(t: PixelTerms, step: int = 0, total_steps: int = 1) -> Tensor:
    """CosPGD: CE weighted by the (detached) cosine similarity of sigmoid(logits) and the one-hot label."""
    with torch.no_grad():
        s = torch.sigmoid(t.logits)
        cos = s.gather(1, t.target.unsqueeze(1)).squeeze(1) / class_sum(s * s).sqrt().clamp_min(1e-12)
    return t.ce * cos * t.valid


def mask_sph_pixel(t: PixelTerms, step: int = 0, total_steps: int = 1) -> Tensor:
    """Mask-Sph: minus the true-class entry of the ℓ2-normalised logits, on currently correct pixels only."""
    return -_TrueClassCosine.apply(t.logits, t.target, t.aux_workspace) * t.correct


LOSSES: dict[str, Callable[..., Tensor]] = {
    "ce": ce_pixel,
    "mce": mce_pixel,
    "mce-bal": mce_bal_pixel,
    "js": js_pixel,
    "segpgd": segpgd_pixel,
    "cospgd": cospgd_pixel,
    "mask-sph": mask_sph_pixel,
}


def pixel_loss(name: str, logits: Tensor, y: Tensor, *, ignore_index: int = IGNORE_INDEX, step: int = 0,
               total_steps: int = 1) -> Tensor:
    """Per-pixel loss `name` (N×H×W) of logits N×K×H×W against labels N×H×W."""
    return LOSSES[check_loss_name(name)](PixelTerms(logits, y, ignore_index), step, total_steps)


def labelled_weight(valid: Tensor, dtype: torch.dtype) -> Tensor:
    """Per pixel (N×H×W), 1 / (labelled pixels of its image) on labelled pixels and 0 on ignored ones."""
    return valid.to(dtype) / valid.sum((1, 2)).clamp_min(1).to(dtype).view(-1, 1, 1)


def image_mean(pixel: Tensor, t: PixelTerms, weight: Tensor | None = None) -> Tensor:
    """Per image (N,): the per-pixel values summed over the image and divided by its labelled pixels (`weight`:
    `labelled_weight` of the batch, when the caller keeps it across calls)."""
    if weight is None:
        weight = labelled_weight(t.valid, pixel.dtype)
    return (pixel * weight).sum((1, 2))


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
    t = PixelTerms(logits, y, ignore_index)
    return image_mean(LOSSES[check_loss_name(name)](t, step, total_steps), t)


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
        self.weight: Tensor | None = None  # labelled_weight of the batch, in the loss's dtype
        # reused by every call (an objective's backward runs before the next): CE's and Mask-Sph's gradients
        self._workspaces: tuple[Tensor, Tensor | None] | None = None

    def _finalise(self, num_classes: int, dtype: torch.dtype) -> None:
        if self.check:
            check_labels(self.y, num_classes, self.ignore_index, where=f"attack loss {self.name!r}")
        self.weight = weight = labelled_weight(self.valid, dtype)
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
        sub.weight = None if self.weight is None else self.weight[index]
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
            if self._workspaces is None or self._workspaces[0].shape != logits.shape or \
                    self._workspaces[0].dtype != logits.dtype or self._workspaces[0].device != logits.device:
                ce = torch.empty_like(logits, memory_format=torch.contiguous_format)
                aux = torch.empty_like(ce) if self.name == "mask-sph" else None
                self._workspaces = (ce, aux)
            terms = PixelTerms(logits, self.y, self.ignore_index, self._workspaces)
            weight = self.weight.to(logits.dtype)
            loss = image_mean(LOSSES[self.name](terms, step, total_steps), terms, weight)
            objective = (loss * self.grad_scale.to(loss.dtype)).sum()
            correct = terms.correct.sum((1, 2))
            value = loss.detach() if self.track == "own" else image_mean(terms.ce.detach(), terms, weight)
        return value, correct, objective
