"""Sign-gradient ℓ∞ attacks: PGD (adversarial training), FGSM, iterative FGSM and iterative least-likely class.

All take images in [0, 1] and ε in [0, 1] pixel units, run the model in eval mode (restoring its mode
afterwards) and return a detached point checked to lie in the ε-ball and in [0, 1].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from data.classes import IGNORE_INDEX
from trainables.attacks.common import (
    box,
    check_batch,
    check_count,
    check_eps,
    check_loss,
    check_valid,
    eval_mode,
    layout,
    loss_and_input_grad,
)
from trainables.losses import AttackLoss


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator seeded with `seed` on `device`, or None (torch's global generator) when seed is None."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


def uniform_start(x: Tensor, radius: float, generator: torch.Generator | None) -> Tensor:
    """A uniform random point of the ℓ∞ ball of `radius` around x, clipped to [0, 1]."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + (2.0 * noise - 1.0) * radius).clamp_(0.0, 1.0)


def _check_step_size(step_size: float, where: str) -> float:
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not step_size > 0:
        raise ValueError(f"{where}: step_size = {step_size!r}; must be a number > 0 (pixel units, e.g. 0.01)")
    return float(step_size)


def _sign_iterations(
    model: nn.Module, x: Tensor, start: Tensor, loss: AttackLoss, eps: float, steps: int, step_size: float,
    direction: float,
) -> Tensor:
    low, high = box(x, eps)
    x_adv, memory_format = start, layout(x)
    for t in range(steps):
        _, _, grad = loss_and_input_grad(model, x_adv, loss, step=t, total_steps=steps, memory_format=memory_format)
        x_adv = torch.clamp(x_adv + (direction * step_size) * grad.sign(), low, high)
    return x_adv.detach()


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    loss: str = "ce",
    random_start: bool = False,
    ignore_index: int = IGNORE_INDEX,
    seed: int | None = None,
    host_checks: bool = True,
) -> Tensor:
    """PGD: x_{t+1} = clip_[0,1](clip_ε(x_t + step_size·sign(∇loss))); returns the last iterate (steps 0: x).

    `host_checks=False` skips the checks that read tensor values on the host (image range, labels, the result's
    validity) and leaves the model's mode alone, for a caller that puts the model in eval mode itself and reads
    `value_checks` of the result later (the training step: one host synchronisation per step)."""
    where = "pgd"
    eps = check_eps(eps, where)
    steps = check_count(steps, where, "steps", 0)
    step_size = _check_step_size(step_size, where)
    check_loss(loss, where)
    if host_checks:
        check_batch(x, y, where, ignore_index)
    x = x.detach()
    if steps == 0:
        return x.clone()
    start = uniform_start(x, eps, make_generator(seed, x.device)) if random_start else x.clone()
    bound = AttackLoss(loss, y, ignore_index, check=host_checks)
    if not host_checks:
        return _sign_iterations(model, x, start, bound, eps, steps, step_size, 1.0)
    with eval_mode(model):
        x_adv = _sign_iterations(model, x, start, bound, eps, steps, step_size, 1.0)
    return check_valid(x_adv, x, eps, where)


def fgsm(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, loss: str = "ce", ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """FGSM: one signed-gradient step of size ε from x."""
    return pgd(model, x, y, eps=eps, steps=1, step_size=max(check_eps(eps, "fgsm"), 1e-12), loss=loss,
               ignore_index=ignore_index)


def ifgsm_steps(eps: float) -> int:
    """Iterations of the panoptic seed's iterative attacks: min(ε + 4, 1.25ε) with ε in 1/255 (at least 1)."""
    eps_255 = round(check_eps(eps, "ifgsm") * 255.0, 6)
    return max(1, math.floor(min(eps_255 + 4.0, 1.25 * eps_255)))


def ifgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int | None = None,
    step_size: float = 1.0 / 255.0,
    loss: str = "ce",
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Iterative FGSM of the panoptic seed: step 1/255, min(ε + 4, 1.25ε) iterations (ε in 1/255), no random start."""
    steps = ifgsm_steps(eps) if steps is None else steps
    return pgd(model, x, y, eps=eps, steps=steps, step_size=step_size, loss=loss, ignore_index=ignore_index)


def least_likely(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int | None = None,
    step_size: float = 1.0 / 255.0,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Iterative least-likely class: descend CE towards each pixel's least likely class on the clean image.

    Pixels labelled with the ignore value are left out (y is used only for that).
    """
    where = "least_likely"
    eps = check_eps(eps, where)
    steps = ifgsm_steps(eps) if steps is None else check_count(steps, where, "steps", 1)
    step_size = _check_step_size(step_size, where)
    check_batch(x, y, where, ignore_index)
    x = x.detach()
    with eval_mode(model), torch.no_grad():
        target = model(x).argmin(1)
    target = torch.where(y == ignore_index, torch.full_like(target, ignore_index), target)
    with eval_mode(model):
        x_adv = _sign_iterations(model, x, x.clone(), AttackLoss("ce", target, ignore_index), eps, steps,
                                 step_size, -1.0)
    return check_valid(x_adv, x, eps, where)
