"""UPerNet decoder as the paper trains it: pyramid pooling on the last stage, FPN, fusion, a 1x1 classifier, no
dropout; plus the auxiliary FCN head on stage 3 whose loss is added with weight AUX_WEIGHT in training.

Module names follow the published PIR-AT checkpoints (`psp_modules`, `lateral_convs`, `fpn_convs`,
`fpn_bottleneck`, each unit `conv` + `batch_norm`), so their `decode_head.*` and `auxiliary_head.*` keys load as
they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Weight of the auxiliary head's cross-entropy in the training loss (the reference trains with 0.4).
AUX_WEIGHT = 0.4
# The feature map (0-based stage) the auxiliary head reads: stage 3 of 4, stride 16.
AUX_STAGE = 2
POOL_SCALES = (1, 2, 3, 6)


class ConvBNReLU(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-5) + ReLU, the unit every UPerNet layer is made of."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.batch_norm = nn.BatchNorm2d(out_channels)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.batch_norm(self.conv(x)))


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UPerNetHead(nn.Module):
    """Maps four feature maps (strides 4, 8, 16, 32) to class logits at stride 4.

    Top-down, each level adds the already-summed coarser level; the pyramid-pooling level skips the FPN conv.
    """

    def __init__(self, in_channels: list[int], width: int, num_classes: int):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"UPerNet needs 4 feature maps, got channels {in_channels}")
        last = in_channels[-1]
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvBNReLU(last, width, 1)) for scale in POOL_SCALES
        )
        self.bottleneck = ConvBNReLU(last + len(POOL_SCALES) * width, width, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, width, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(width, width, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * width, width, 3)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def _pyramid(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [_resize(branch(x), size) for branch in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features[:-1], strict=True)]
        laterals.append(self._pyramid(features[-1]))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1], strict=True)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0], *(_resize(o, size) for o in outs[1:])], dim=1))
        return self.classifier(fused)


class FCNHead(nn.Module):
    """The auxiliary head: one 3x3 ConvBNReLU on feature map AUX_STAGE, then a 1x1 classifier."""

    def __init__(self, in_channels: int, width: int, num_classes: int, stage: int = AUX_STAGE):
        super().__init__()
        self.stage = stage
        self.convs = nn.Sequential(ConvBNReLU(in_channels, width, 3))
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.convs(features[self.stage]))
