"""Segmenter's mask-transformer decoder: class embeddings attend jointly with patch tokens; masks by dot product."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn


class MaskTransformerHead(nn.Module):
    """Maps one N x C x h x w token map to N x K x h x w logits (Strudel et al., 2021, mask transformer).

    Patch tokens are projected to `width`, concatenated with K learned class embeddings, passed through
    `layers` transformer blocks, and each class mask is the scalar product of L2-normalised patch and class
    features, followed by a LayerNorm over classes.
    """

    def __init__(self, in_channels: int, width: int, num_classes: int, layers: int = 2, head_dim: int = 64):
        super().__init__()
        heads = max(1, width // head_dim)
        if width % heads:
            raise ValueError(f"Segmenter decoder width {width} must be a multiple of {heads} heads")
        self.num_classes = num_classes
        self.proj_in = nn.Linear(in_channels, width)
        self.class_embed = nn.Parameter(torch.zeros(1, num_classes, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.proj_patch = nn.Parameter(width**-0.5 * torch.randn(width, width))
        self.proj_class = nn.Parameter(width**-0.5 * torch.randn(width, width))
        self.mask_norm = nn.LayerNorm(num_classes)
        trunc_normal_(self.class_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        tokens = features[-1]
        n, _, h, w = tokens.shape
        x = self.proj_in(tokens.flatten(2).transpose(1, 2))
        x = torch.cat([x, self.class_embed.expand(n, -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        patches = F.normalize(x[:, : h * w] @ self.proj_patch, dim=-1)
        classes = F.normalize(x[:, h * w :] @ self.proj_class, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))
        return masks.transpose(1, 2).reshape(n, self.num_classes, h, w)
