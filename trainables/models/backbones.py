"""The supported timm backbones, built without downloads, each returning a list of NCHW feature maps.

Every backbone module keeps the timm classifier under the attribute `model`, so a classifier checkpoint key `k`
is the backbone key `model.k` (see `weights.CLASSIFIER_PREFIX`).
"""

from __future__ import annotations

import timm
import torch
from timm.layers import LayerNorm2d
from torch import nn

from trainables.models.stems import STEMS, set_convnext_stem

CONVNEXTS = ("convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny", "convnext_small")
VITS = ("vit_small_patch16_224",)
BACKBONES = CONVNEXTS + VITS


def family(name: str) -> str:
    """'convnext' or 'vit' for a supported backbone name; ValueError listing the valid names otherwise."""
    if name in CONVNEXTS:
        return "convnext"
    if name in VITS:
        return "vit"
    raise ValueError(f"model.backbone = {name!r}: unknown backbone; valid: {', '.join(BACKBONES)}")


class ViTPatchTokens(nn.Module):
    """A timm ViT (head removed) returning its final-normed patch tokens as one N x C x H/16 x W/16 map.

    Position embeddings are interpolated to the input's token grid at every call (timm `dynamic_img_size`),
    so the 224x224 checkpoint's `pos_embed` loads unchanged and any multiple of 16 works.
    """

    def __init__(self, name: str, drop_path_rate: float = 0.0):
        super().__init__()
        self.model = timm.create_model(
            name, pretrained=False, num_classes=0, dynamic_img_size=True, drop_path_rate=drop_path_rate
        )
        self.channels = [self.model.embed_dim]
        self.reduction = self.model.patch_embed.patch_size[0]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)


class ConvNeXtFeatures(nn.Module):
    """A timm ConvNeXt (head removed) returning its four stage outputs, each through its own channels-first
    LayerNorm (`norm0..3`, eps 1e-6) as the paper's backbone does; the next stage continues from the un-normed map.
    """

    def __init__(self, name: str, stem: str = "patch", drop_path_rate: float = 0.0):
        super().__init__()
        getter = timm.create_model(
            name, pretrained=False, features_only=True, feature_cls="getter", out_indices=(0, 1, 2, 3),
            drop_path_rate=drop_path_rate,
        )
        self.model = set_convnext_stem(getter.model, stem)
        self.channels = getter.feature_info.channels()
        self.reduction = getter.feature_info.reduction()[-1]
        for index, channels in enumerate(self.channels):
            self.add_module(f"norm{index}", LayerNorm2d(channels, eps=1e-6))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stages = self.model.forward_intermediates(x, indices=[0, 1, 2, 3], output_fmt="NCHW", intermediates_only=True)
        return [getattr(self, f"norm{index}")(stage) for index, stage in enumerate(stages)]


def create_backbone(name: str, stem: str = "patch", drop_path_rate: float = 0.0) -> nn.Module:
    """A randomly initialised backbone with `.channels` (per output map) and `.reduction` (total stride)."""
    kind = family(name)
    if stem not in STEMS:
        raise ValueError(f"model.stem = {stem!r}: must be one of {', '.join(STEMS)}")
    if kind == "vit":
        if stem != "patch":
            raise ValueError(f"model.stem = {stem!r}: the CvSt stem exists for ConvNeXt backbones only; use 'patch' "
                             f"with {name}")
        return ViTPatchTokens(name, drop_path_rate)
    return ConvNeXtFeatures(name, stem, drop_path_rate)
