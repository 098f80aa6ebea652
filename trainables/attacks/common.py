"""What every attack shares: input checks, the validity guard, eval mode, and one loss-and-input-gradient step."""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from data.classes import IGNORE_INDEX
from trainables.losses import AttackLoss, check_labels, check_loss_name, check_track_name

# Slack for float32 rounding of x ± ε; the same constant the validity guard uses.
VALIDITY_TOLERANCE = 1e-6


class AttackValidityError(RuntimeError):
    """An attack returned a point outside the ε-ball or outside [0, 1]."""


def check_eps(eps: float, where: str) -> float:
    """ε as a float in [0, 1] (pixel units); anything else raises with the accepted range."""
    if isinstance(eps, Tensor) and eps.numel() == 1:
        eps = eps.item()
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{where}: eps must be a number in [0, 1] (pixel units), got {eps!r}")
    eps = float(eps)
    if not eps >= 0:
        raise ValueError(f"{where}: eps = {eps:g} is negative or NaN; eps must lie in [0, 1] (e.g. 8/255 = 0.0314)")
    if eps > 1:
        raise ValueError(
            f"{where}: eps = {eps:g} > 1; attacks take eps in [0, 1] pixel units (8/255 = 0.0314); "
            "convert budgets given in units of 1/255 with trainables.units.to_unit"
        )
    return eps


def check_count(value: int, where: str, name: str, minimum: int) -> int:
    """An integer >= minimum (iterations, steps), else a clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{where}: {name} = {value!r}; must be an integer >= {minimum}")
    return int(value)


def check_batch(
    x: Tensor, y: Tensor, where: str, ignore_index: int = IGNORE_INDEX, num_classes: int | None = None
) -> None:
    """Images N×C×H×W floating in [0, 1]; labels N×H×W integer; labels in [0, K) ∪ {ignore} when K is given."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{where}: images must be a floating tensor N×C×H×W, got {shape}")
    if not isinstance(y, Tensor) or y.dim() != 3 or y.shape[0] != x.shape[0] or y.shape[1:] != x.shape[2:]:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        expected = (x.shape[0], *x.shape[2:])
        raise ValueError(f"{where}: labels must be N×H×W = {expected} to match the images, got {shape}")
    if x.numel() == 0:
        raise ValueError(f"{where}: empty batch {tuple(x.shape)}")
    _check_range(float(x.min()), float(x.max()), where)
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"{where}: labels must be an integer tensor, got dtype {y.dtype}")
    if num_classes is not None:
        check_labels(y, num_classes, ignore_index, where=where)


def check_valid(x_adv: Tensor, x: Tensor, eps: float, where: str = "attack") -> Tensor:
    """Raise AttackValidityError unless ‖x_adv − x‖∞ ≤ eps + 1e-6 and 0 ≤ x_adv ≤ 1; return x_adv."""
    if x_adv.shape != x.shape:
        raise AttackValidityError(f"{where}: output shape {tuple(x_adv.shape)} differs from input {tuple(x.shape)}")
    dist = float((x_adv.detach() - x.detach()).abs().amax()) if x.numel() else 0.0
    _check_validity(dist, float(x_adv.min()), float(x_adv.max()), eps, where)
    return x_adv


def _check_range(low: float, high: float, where: str) -> None:
    if not (low >= 0.0 and high <= 1.0):
        raise ValueError(
            f"{where}: image values span [{low:g}, {high:g}]; images must lie in [0, 1] "
            "(the model normalises internally)"
        )


def _check_validity(dist: float, low: float, high: float, eps: float, where: str) -> None:
    if not dist <= eps + VALIDITY_TOLERANCE:
        raise AttackValidityError(
            f"{where}: ‖x_adv − x‖∞ = {dist:.8g} exceeds eps = {eps:.8g} (+{VALIDITY_TOLERANCE:g}); result rejected"
        )
    if not (low >= 0.0 and high <= 1.0):
        raise AttackValidityError(f"{where}: x_adv spans [{low:g}, {high:g}], outside [0, 1]; result rejected")


def value_checks(x: Tensor, y: Tensor, x_adv: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """On the device, the values that check_batch, the labels' check and check_valid read, as float64
    [min x, max x, ‖x_adv − x‖∞, min x_adv, max x_adv, labels outside the classes], for one host transfer."""
    bad = ((y != ignore_index) & ((y < 0) | (y >= num_classes))).sum()
    dist = (x_adv.detach() - x.detach()).abs().amax()
    return torch.stack([t.double() for t in (x.min(), x.max(), dist, x_adv.min(), x_adv.max(), bad)])


def raise_on_values(values: list[float], eps: float, num_classes: int, where: str) -> None:
    """Raise what check_batch, the labels' check or check_valid would have raised for `value_checks`'s values."""
    low, high, dist, adv_low, adv_high, bad = values
    _check_range(low, high, where)
    if bad:
        raise ValueError(f"{where}: {int(bad)} label values are outside [0, {num_classes}) and are not the ignore "
                         f"value; valid labels are 0..{num_classes - 1} and the ignore value")
    _check_validity(dist, adv_low, adv_high, eps, where)


def check_loss(loss: str, where: str) -> str:
    """A known loss name, else an error listing the valid ones (prefixed with the caller)."""
    try:
        return check_loss_name(loss)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def check_track(track: str, where: str) -> str:
    """A known tracked quantity ("ce" or "own"), else an error listing the valid ones (prefixed with the caller)."""
    try:
        return check_track_name(track)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the attack with the model in eval mode and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def box(x: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds of the ℓ∞ ball of `radius` around x intersected with [0, 1]."""
    return (x - radius).clamp_(0.0, 1.0), (x + radius).clamp_(0.0, 1.0)


def layout(x: Tensor) -> torch.memory_format:
    """The memory format of an N×C×H×W batch: channels_last when stored so, else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def loss_and_input_grad(
    model: nn.Module,
    x_adv: Tensor,
    loss: AttackLoss,
    step: int = 0,
    total_steps: int = 1,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[Tensor, Tensor, Tensor]:
    """One forward and backward: per-image value of `loss`, per-image correct pixels, and the input gradient.

    The gradient is that of `AttackLoss`'s objective Σ_i s_i·loss_i (s_i a per-image power of two): about the
    summed rather than pixel-averaged loss, so that under float16 autocast the per-pixel gradients (~1/pixels)
    do not underflow to 0 in the backward pass. The attacks use its sign only, which s_i does not change, and in
    float32 the scaling is exact. The model sees x_adv in `memory_format` (the clean batch's layout).
    """
    x_adv = x_adv.detach().contiguous(memory_format=memory_format).requires_grad_(True)
    with torch.enable_grad():
        logits = model(x_adv)
        if logits.dim() != 4 or logits.shape[0] != x_adv.shape[0] or logits.shape[2:] != x_adv.shape[2:]:
            raise ValueError(
                f"model output {tuple(logits.shape)} is not N×K×H×W logits for input {tuple(x_adv.shape)}"
            )
        value, correct, objective = loss(logits, step=step, total_steps=total_steps)
        (grad,) = torch.autograd.grad(objective, x_adv)
    return value, correct, grad
