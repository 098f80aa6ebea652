"""The segmentation model: normalise, pad to the backbone's stride, encode, decode, upsample, crop back."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainables.models.normalize import ImageNetNormalize


class SegmentationModel(nn.Module):
    """Images N x 3 x H x W in [0, 1] (any H, W) -> logits N x K x H x W.

    Inputs are zero-padded on the right and bottom after normalisation (zero is the mean colour) up to a
    multiple of the backbone's total stride, and the logits are cropped back: every logit stays aligned with
    its input pixel, no pixel is resampled, and every input pixel gets an exact gradient.
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, *, decoder: str, backbone_name: str, stem: str,
                 num_classes: int):
        super().__init__()
        self.normalize = ImageNetNormalize()
        self.backbone = backbone
        self.decode_head = decode_head
        self.decoder_name = decoder
        self.backbone_name = backbone_name
        self.stem_name = stem
        self.num_classes = num_classes
        self.pad_multiple = int(backbone.reduction)
        self.init_report: dict = {"source": "random"}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images N x 3 x H x W in [0, 1], got shape {tuple(images.shape)}")
        if self.training and images.shape[0] < 2 and self.decoder_name == "upernet":
            raise ValueError(
                "UPerNet's BatchNorm (its 1x1 pyramid-pooling branch) needs >= 2 images per worker in training, "
                "got 1: raise train.batch_size or use fewer cluster.workers"
            )
        height, width = images.shape[-2:]
        x = self.normalize(images)
        pad_h, pad_w = (-height) % self.pad_multiple, (-width) % self.pad_multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        logits = self.decode_head(self.backbone(x))
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :height, :width]
