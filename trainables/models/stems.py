"""The convolutional stem (CvSt) of the robust ConvNeXts, laid out so published `stem.stem.*` keys load as they are."""

from __future__ import annotations

from timm.layers import LayerNorm2d
from torch import nn

STEMS = ("patch", "cvst")


class ConvStem(nn.Module):
    """Two 3x3 stride-2 convs (3 -> C/2 -> C), each followed by channels-first LayerNorm and GELU: stride 4, C out.

    The inner Sequential is named `stem` and indexed 0..5 (conv, LN, GELU, conv, LN, GELU), so the parameters
    are `stem.0.*`, `stem.1.*`, `stem.3.*`, `stem.4.*`, as in the published CvSt checkpoints.
    """

    def __init__(self, out_channels: int, in_channels: int = 3):
        super().__init__()
        if out_channels % 2:
            raise ValueError(f"CvSt stem: out_channels must be even, got {out_channels}")
        mid = out_channels // 2
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, mid, kernel_size=3, stride=2, padding=1),
            LayerNorm2d(mid, eps=1e-6),
            nn.GELU(),
            nn.Conv2d(mid, out_channels, kernel_size=3, stride=2, padding=1),
            LayerNorm2d(out_channels, eps=1e-6),
            nn.GELU(),
        )

    def forward(self, x):
        return self.stem(x)


def set_convnext_stem(convnext: nn.Module, stem: str) -> nn.Module:
    """Replace a timm ConvNeXt's 4x4 patchify stem by the CvSt stem (same stride 4, same channels); in place."""
    if stem not in STEMS:
        raise ValueError(f"model.stem = {stem!r}: must be one of {', '.join(STEMS)}")
    if stem == "cvst":
        convnext.stem = ConvStem(convnext.stem[0].out_channels)
    return convnext
