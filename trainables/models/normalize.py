"""ImageNet mean/std normalisation as a layer, so models take images in [0, 1] and attacks work in pixel space."""

from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

IMAGENET_MEAN = tuple(float(v) for v in IMAGENET_DEFAULT_MEAN)
IMAGENET_STD = tuple(float(v) for v in IMAGENET_DEFAULT_STD)


class ImageNetNormalize(nn.Module):
    """(x - mean) / std per RGB channel; constants are non-persistent buffers, so state dicts stay plain."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
