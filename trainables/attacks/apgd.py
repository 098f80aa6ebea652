"""APGD (Croce & Hein, 2020) for segmentation, with radius reduction (red-ε), as specified in ALGORITHMS.md.

Per image the attack keeps the point with the highest tracked value (for step-size control and restarts:
per-image cross-entropy by default, as the reference code does, or the attack loss itself) and, separately, the
point with the lowest pixel accuracy, which is what it returns. The step direction is always the sign of the
attack loss's gradient. Everything per iteration stays on the device and is vectorised over the batch; the only
host synchronisation per iteration is the check whether an image has reached 0% accuracy, in which case it
leaves the active batch (and the stage ends when none is left).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from data.classes import IGNORE_INDEX
from trainables.attacks.common import (
    box,
    check_batch,
    check_count,
    check_eps,
    check_loss,
    check_track,
    check_valid,
    eval_mode,
    layout,
    loss_and_input_grad,
)
from trainables.attacks.pgd import make_generator, uniform_start
from trainables.losses import AttackLoss

log = logging.getLogger(__name__)

# red-ε: (radius as a multiple of ε, share of the iteration budget); only the last stage's point is valid.
RED_EPS_STAGES = ((2.0, 0.3), (1.5, 0.3), (1.0, 0.4))
MOMENTUM = 0.75
INCREASE_THRESHOLD = 0.75


def _floor(value: float) -> int:
    return int(math.floor(value + 1e-9))


def stage_plan(n_iter: int, red_eps: bool) -> list[tuple[float, int]]:
    """(radius factor, iterations) per stage: 30% / 30% / 40% at 2ε, 1.5ε, ε with red-ε, else all at ε."""
    if not red_eps:
        return [(1.0, n_iter)]
    first, second = _floor(0.3 * n_iter), _floor(0.3 * n_iter)
    sizes = (first, second, n_iter - first - second)
    return [(factor, size) for (factor, _), size in zip(RED_EPS_STAGES, sizes, strict=True) if size > 0]


def checkpoints(n_iter: int) -> list[int]:
    """Iterations after which step sizes are reviewed: first after max(⌊0.22N⌋,1), the interval shrinking by
    max(⌊0.03N⌋,1) per checkpoint down to max(⌊0.06N⌋,1)."""
    interval = max(_floor(0.22 * n_iter), 1)
    decrement, minimum = max(_floor(0.03 * n_iter), 1), max(_floor(0.06 * n_iter), 1)
    points, at = [], interval
    while at < n_iter:
        points.append(at)
        interval = max(interval - decrement, minimum)
        at += interval
    return points


def _where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


def _take(into: Tensor, source: Tensor, mask: Tensor) -> None:
    """In place, replace the images of `into` where mask (N,) is set by those of `source` (both finite).

    lerp with weights 0 and 1 is exact (ATen evaluates start + w·(end − start) for w < 0.5 and
    end − (end − start)·(1 − w) otherwise) and several times cheaper than torch.where on CPU.
    """
    into.lerp_(source, mask.to(into.dtype).view(-1, *([1] * (into.dim() - 1))))


@dataclass
class _Images:
    """Per active image: the iterate, its predecessor and gradient, the step size and ball, and what was found."""

    index: Tensor  # position in the batch
    cur: Tensor
    prev: Tensor
    grad: Tensor
    step: Tensor
    low: Tensor
    high: Tensor
    best_loss: Tensor  # highest tracked value so far, its point and gradient: where a halved step restarts
    best_x: Tensor
    best_grad: Tensor
    review_loss: Tensor  # best_loss at the last checkpoint
    ups: Tensor  # iterations since the last checkpoint whose value rose
    halved: Tensor  # step halved at the last checkpoint
    prev_loss: Tensor
    ret_x: Tensor  # lowest-accuracy point so far: what the stage returns
    ret_correct: Tensor

    @classmethod
    def first(cls, index: Tensor, cur: Tensor, value: Tensor, correct: Tensor, grad: Tensor, step: Tensor,
              low: Tensor, high: Tensor) -> _Images:
        """The state after the first iteration: every record is the starting point."""
        return cls(index=index, cur=cur, prev=cur, grad=grad, step=step, low=low, high=high, best_loss=value,
                   best_x=cur.clone(), best_grad=grad.clone(), review_loss=value, ups=torch.zeros_like(correct),
                   halved=torch.zeros_like(correct, dtype=torch.bool), prev_loss=value, ret_x=cur.clone(),
                   ret_correct=correct)

    def record(self, value: Tensor, correct: Tensor, grad: Tensor) -> None:
        """Count a rise of the tracked value, keep the best-value and the lowest-accuracy points."""
        self.grad = grad
        self.ups = self.ups + (value > self.prev_loss)
        better = value > self.best_loss
        self.best_loss = torch.where(better, value, self.best_loss)
        _take(self.best_x, self.cur, better)
        # a gradient may be non-finite, so no lerp; written in place into the stage's own copy
        torch.where(better.view(-1, 1, 1, 1), grad, self.best_grad, out=self.best_grad)
        lower = correct < self.ret_correct
        self.ret_correct = torch.where(lower, correct, self.ret_correct)
        _take(self.ret_x, self.cur, lower)
        self.prev_loss = value

    def keep(self, mask: Tensor) -> _Images:
        """The images where mask is set."""
        return _Images(**{f.name: getattr(self, f.name)[mask] for f in fields(self)})

    def review(self, interval: int) -> None:
        """A checkpoint: halve the step where the value rose too rarely or stalled, and restart those images from
        their best point with its gradient and no momentum."""
        halve = (self.ups < INCREASE_THRESHOLD * interval) | (~self.halved & (self.best_loss <= self.review_loss))
        self.step = torch.where(halve, 0.5 * self.step, self.step)
        self.cur = _where(halve, self.best_x, self.cur)
        self.prev = _where(halve, self.best_x, self.prev)
        self.grad = _where(halve, self.best_grad, self.grad)
        self.halved, self.review_loss, self.ups = halve, self.best_loss, torch.zeros_like(self.ups)

    @torch.no_grad()
    def advance(self, momentum: bool) -> None:
        """The signed-gradient step projected onto the ball, then (after the first) the momentum mix, projected."""
        z = torch.addcmul(self.cur, self.step.view(-1, 1, 1, 1), self.grad.sign()).clamp_(min=self.low, max=self.high)
        if momentum:
            # x + a(z − x) + (1 − a)(x − x_prev) = a·z + 2(1 − a)·x − (1 − a)·x_prev
            z = z.mul_(MOMENTUM).add_(self.cur, alpha=2 * (1 - MOMENTUM)).add_(self.prev, alpha=-(1 - MOMENTUM))
            z = z.clamp_(min=self.low, max=self.high)
        self.prev, self.cur = self.cur, z


def _stage(
    model: nn.Module, x: Tensor, loss: AttackLoss, start: Tensor, radius: float, n_iter: int, early_exit: bool = True
) -> tuple[Tensor, Tensor]:
    """One APGD run at a fixed radius from `start`: per image the lowest-accuracy iterate and its correct pixels.

    The "loss" compared at checkpoints and for the best point is `loss`'s per-image value (its `track`)."""
    n = x.shape[0]
    result = start.clone()
    result_correct = torch.full((n,), -1, dtype=torch.long, device=x.device)
    active_loss = loss
    review = set(checkpoints(n_iter))
    last_review = 0
    memory_format = layout(x)
    images: _Images | None = None
    for i in range(n_iter):
        cur = start if images is None else images.cur
        value, correct, grad = loss_and_input_grad(model, cur, active_loss, step=i, total_steps=n_iter,
                                                   memory_format=memory_format)
        if images is None:
            step = torch.full((n,), 2.0 * radius, dtype=x.dtype, device=x.device)
            images = _Images.first(torch.arange(n, device=x.device), start, value, correct, grad, step,
                                   *box(x, radius))
        else:
            images.record(value, correct, grad)

        finished = images.ret_correct == 0
        # the one host sync per iteration: 0% accuracy cannot improve, the image leaves
        if early_exit and bool(finished.any()):
            result[images.index[finished]] = images.ret_x[finished]
            result_correct[images.index[finished]] = 0
            keep = ~finished
            if not bool(keep.any()):
                log.debug("apgd stage radius %.5g: all images at 0%% accuracy after %d iterations", radius, i + 1)
                return result, result_correct
            images = images.keep(keep)
            active_loss = loss.select(images.index)

        if i in review:
            images.review(i - last_review)
            last_review = i
        if i + 1 < n_iter:
            images.advance(momentum=i > 0)
    result[images.index] = images.ret_x
    result_correct[images.index] = images.ret_correct
    return result, result_correct


def apgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    n_iter: int,
    loss: str,
    red_eps: bool = True,
    random_start: bool = True,
    ignore_index: int = IGNORE_INDEX,
    seed: int | None = None,
    track: str = "ce",
    early_exit: bool = True,
) -> Tensor:
    """APGD on a segmentation loss; returns per image the lowest-accuracy point found, inside the ε-ball and [0, 1].

    eps is in [0, 1] pixel units (8/255 for 8 in 1/255). With red_eps the budget runs 30% / 30% / 40% at radii
    2ε, 1.5ε, ε, each stage starting from the previous stage's returned point projected onto the new ball;
    only the final stage's points (radius ε) are returned. The first stage starts at a uniform random point of
    its ball when random_start (drawn from a generator seeded with `seed`, or torch's global one when None).
    track: what drives the step-size checkpoints and the best point restarted from, "ce" (per-image cross-entropy,
    the reference code's choice and stronger for the masked losses) or "own" (the attack loss itself); the
    gradient is the attack loss's either way. early_exit=False keeps images at 0% accuracy in the batch to the end
    (their returned point cannot change): a fixed full batch, to benchmark the cost of one iteration.
    """
    where = "apgd"
    eps = check_eps(eps, where)
    n_iter = check_count(n_iter, where, "n_iter", 1)
    check_loss(loss, where)
    check_track(track, where)
    check_batch(x, y, where, ignore_index)
    x = x.detach()
    bound = AttackLoss(loss, y, ignore_index, track=track)
    plan = stage_plan(n_iter, red_eps)
    with eval_mode(model):
        point = uniform_start(x, plan[0][0] * eps, make_generator(seed, x.device)) if random_start else x.clone()
        for factor, iterations in plan:
            radius = factor * eps
            low, high = box(x, radius)
            point, correct = _stage(model, x, bound, torch.clamp(point, low, high), radius, iterations,
                                    early_exit)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("apgd %s radius %.5g (%d it): correct pixels %s", loss, radius, iterations, correct.tolist())
    return check_valid(point, x, eps, where)
