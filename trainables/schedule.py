"""Learning-rate schedule of the PIR-AT recipe: linear warm-up, then polynomial decay to zero."""

from __future__ import annotations

import torch


def warmup_poly_factor(step: int, *, total_steps: int, warmup_steps: int, power: float) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / remaining, 1.0)
    return (1.0 - progress) ** power


def warmup_poly(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, power: float):
    """A LambdaLR stepping once per optimizer step; its state_dict goes into checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_poly_factor(step, total_steps=total_steps, warmup_steps=warmup_steps, power=power),
    )
