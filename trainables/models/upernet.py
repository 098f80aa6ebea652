"""UPerNet decoder: pyramid pooling on the last stage, FPN over the four stages, fusion and a 1x1 classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU, the unit every UPerNet layer is made of."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """Average-pool the map to each scale, project, upsample back, concatenate with the map and fuse (3x3)."""

    def __init__(self, in_channels: int, width: int, scales: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvBNReLU(in_channels, width, 1)) for scale in scales
        )
        self.bottleneck = ConvBNReLU(in_channels + len(scales) * width, width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [_resize(branch(x), size) for branch in self.branches]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UPerNetHead(nn.Module):
    """Maps four feature maps (strides 4, 8, 16, 32) to class logits at stride 4."""

    def __init__(self, in_channels: list[int], width: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"UPerNet needs 4 feature maps, got channels {in_channels}")
        self.ppm = PyramidPooling(in_channels[-1], width)
        self.lateral = nn.ModuleList(ConvBNReLU(c, width, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(ConvBNReLU(width, width, 3) for _ in in_channels[:-1])
        self.fuse = ConvBNReLU(len(in_channels) * width, width, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        top = self.ppm(features[-1])
        laterals = [conv(f) for conv, f in zip(self.lateral, features[:-1], strict=True)] + [top]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn, laterals[:-1], strict=True)] + [top]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0], *(_resize(o, size) for o in outs[1:])], dim=1))
        return self.classifier(self.dropout(fused))
