"""The supported timm backbones, built without downloads, each returning a list of NCHW feature maps.

Every backbone module keeps the timm classifier under the attribute `model`, so a classifier checkpoint key `k`
is the backbone key `model.k` (see `weights.CLASSIFIER_PREFIX`).
"""

from __future__ import annotations

import math
from functools import partial

import timm
import torch
import torch.nn.functional as F
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
    """A timm ViT (head removed) returning its final-normed patch tokens as one N x C x H/16 x W/16 map, as the
    paper's Segmenter encoder computes them: every LayerNorm with eps 1e-5, the class token first, and the position
    embeddings resized bilinearly (align_corners=False) only when the token grid differs from theirs.

    The grid of `pos_embed` is square (14 x 14 for the 224 classifier checkpoints; a whole-model checkpoint may
    bring another, see `checkpoints.load_model_weights`); the input must be a multiple of 16 (the model pads).
    """

    def __init__(self, name: str, drop_path_rate: float = 0.0):
        super().__init__()
        self.model = timm.create_model(
            name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=1e-5),
        )
        self.channels = [self.model.embed_dim]
        self.reduction = self.model.patch_embed.patch_size[0]

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """pos_embed for a token grid: class token's as it is, the patch part resized bilinearly when it differs."""
        pos = self.model.pos_embed
        side = math.isqrt(pos.shape[1] - 1)
        if (side, side) == tuple(grid):
            return pos
        patches = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
        return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        m = self.model
        tokens = m.patch_embed.proj(x)
        n, c, h, w = tokens.shape
        tokens = torch.cat([m.cls_token.expand(n, -1, -1), tokens.flatten(2).transpose(1, 2)], dim=1)
        tokens = m.pos_drop(tokens + self.position_embedding((h, w)))
        for block in m.blocks:
            tokens = block(tokens)
        tokens = m.norm(tokens)[:, 1:]
        return [tokens.transpose(1, 2).reshape(n, c, h, w)]


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
