"""Test helpers: generated segmentation images and a small conv net trained on them (once per test session)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.classes import IGNORE_INDEX

NUM_CLASSES = 4
SIZE = 64
# class 0 is background; classes 1..3 are shapes told apart by colour
_COLOURS = 0.5 + 0.06 * torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])


def make_batch(n: int, seed: int, size: int = SIZE) -> tuple[Tensor, Tensor]:
    """n images in [0, 1] with 1-4 coloured rectangles on a noisy background; 1-pixel shape borders ignored."""
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            cls = int(torch.randint(1, NUM_CLASSES, (1,), generator=g))
            h, w = (int(v) for v in torch.randint(size // 6, size // 2, (2,), generator=g))
            top = int(torch.randint(0, size - h, (1,), generator=g))
            left = int(torch.randint(0, size - w, (1,), generator=g))
            y[i, top:top + h, left:left + w] = cls
    x = _COLOURS[y].permute(0, 3, 1, 2).clone()
    x += 0.06 * torch.randn(x.shape, generator=g)
    x += 0.04 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)  # per-image colour shift
    edges = F.max_pool2d(y.unsqueeze(1).float(), 3, 1, 1).squeeze(1) != -F.max_pool2d(
        -y.unsqueeze(1).float(), 3, 1, 1).squeeze(1)
    y[edges] = IGNORE_INDEX
    return x.clamp(0, 1), y


class ToySegNet(nn.Module):
    """Conv segmentation net: normalisation inside, stride-2 encoder, dilated context, bilinear upsampling."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 16):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1))
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=2, dilation=2), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, num_classes, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        logits = self.body((x - self.mean) / self.std)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


@functools.cache
def trained_toy_model(steps: int = 300, adversarial: bool = False) -> ToySegNet:
    """A ToySegNet trained on generated batches (with 1-step PGD at 8/255 when adversarial), in eval mode."""
    from trainables.attacks import pgd

    torch.manual_seed(0)
    model = ToySegNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    for step in range(steps):
        x, y = make_batch(8, seed=1000 + step)
        if adversarial:
            x = pgd(model, x, y, eps=8 / 255, steps=1, step_size=10 / 255, random_start=True, seed=step)
        model.train()
        loss = F.cross_entropy(model(x), y, ignore_index=IGNORE_INDEX)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


@pytest.fixture(scope="module")
def model():
    """The toy net trained once, with one torch thread while a module uses it (small tensors)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is faster, and robust to a busy machine
    yield trained_toy_model()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch():
    return make_batch(8, seed=7)
