"""The segmentation model: normalise (or not), encode, decode, upsample; Segmenter pads to its patch size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainables.models.normalize import ImageNetNormalize

# What a model does to its [0, 1] input before the backbone: ImageNet mean/std, or nothing (the paper's models).
INPUT_NORMS = ("imagenet", "none")


def check_input_norm(value: str) -> str:
    """`value` if it is a known input normalisation; ValueError naming the valid ones otherwise."""
    if value not in INPUT_NORMS:
        raise ValueError(f"model.input_norm = {value!r}: must be one of {', '.join(INPUT_NORMS)}")
    return value


class SegmentationModel(nn.Module):
    """Images N x 3 x H x W in [0, 1] (any H, W) -> logits N x K x H x W.

    UPerNet runs the image as it is through the strided convolutions (as the paper's models do) and upsamples
    its logits bilinearly to the input size. Segmenter zero-pads on the right and bottom (after normalisation)
    to a multiple of its patch size and crops the logits back. `forward(x, with_aux=True)` also returns the
    auxiliary head's logits (None without one), for the training loss.
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, *, decoder: str, backbone_name: str, stem: str,
                 num_classes: int, auxiliary_head: nn.Module | None = None, aux_weight: float = 0.0,
                 input_norm: str = "imagenet"):
        super().__init__()
        self.normalize: nn.Module = nn.Identity()
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.aux_weight = float(aux_weight) if auxiliary_head is not None else 0.0
        self.decoder_name = decoder
        self.backbone_name = backbone_name
        self.stem_name = stem
        self.num_classes = num_classes
        self.pad_multiple = 1 if decoder == "upernet" else int(backbone.reduction)
        self.input_norm = input_norm
        self.init_report: dict = {"source": "random"}

    @property
    def input_norm(self) -> str:
        """'imagenet' (mean/std as the first layer) or 'none' (the backbone sees [0, 1] images)."""
        return self._input_norm

    @input_norm.setter
    def input_norm(self, value: str) -> None:
        self._input_norm = check_input_norm(value)
        self.normalize = ImageNetNormalize() if value == "imagenet" else nn.Identity()

    def forward(self, images: torch.Tensor, with_aux: bool = False):
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
        features = self.backbone(x)
        logits = self._upsample(self.decode_head(features), x.shape[-2:], height, width)
        if not with_aux:
            return logits
        aux = None
        if self.auxiliary_head is not None:
            aux = self._upsample(self.auxiliary_head(features), x.shape[-2:], height, width)
        return logits, aux

    @staticmethod
    def _upsample(logits: torch.Tensor, size, height: int, width: int) -> torch.Tensor:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits[..., :height, :width]
