"""The panoptic seed's defence: non-local-means denoising of the input before the model, with BPDA for attacks.

The filter (OpenCV's coloured variant on 8-bit images) is not differentiable; an honest evaluation attacks
through it with BPDA, i.e. it passes gradients through the filter as the identity. `defended_models` gives
the (attacked, scored) pair for the non-adaptive evaluation (attack the bare model, score the defended one)
and for the BPDA one (attack and score the defended model).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import Tensor, nn

# cv2.fastNlMeansDenoisingColored(img, None, h, hColor, templateWindowSize, searchWindowSize) as in the seed
NLM_PARAMS = {"h": 10.0, "hColor": 10.0, "templateWindowSize": 7, "searchWindowSize": 21}
DEFENSES = (None, "nlm", "nlm-bpda")


def nlm_denoise(x: Tensor) -> Tensor:
    """Denoise RGB images in [0, 1] (N×3×H×W) with OpenCV's coloured non-local means on their 8-bit version."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"nlm_denoise: expects RGB images N×3×H×W, got {tuple(x.shape)}")
    images = (x.detach().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(images)
    p = NLM_PARAMS
    for i, rgb in enumerate(images):
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # OpenCV's colour conversion assumes BGR order
        den = cv2.fastNlMeansDenoisingColored(bgr, None, p["h"], p["hColor"], p["templateWindowSize"],
                                              p["searchWindowSize"])
        out[i] = den[:, :, ::-1]
    return torch.from_numpy(out).to(device=x.device).permute(0, 3, 1, 2).to(x.dtype).div_(255.0)


class _DenoiseBPDA(torch.autograd.Function):
    """Forward: non-local-means denoising; backward: identity (BPDA)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return nlm_denoise(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def nlm_bpda(x: Tensor) -> Tensor:
    """Non-local-means denoising whose gradient is the identity, so attacks can go through it."""
    return _DenoiseBPDA.apply(x)


class NLMDefended(nn.Module):
    """A segmentation model behind the non-local-means front end (gradients pass the filter by BPDA)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(nlm_bpda(x))


def defended_models(model: nn.Module, defense: str | None) -> tuple[nn.Module, nn.Module]:
    """(model the attacks see, model whose predictions are scored) for a defence setting in DEFENSES."""
    if defense not in DEFENSES:
        raise ValueError(f"defense = {defense!r}; valid: {', '.join(repr(d) for d in DEFENSES)}")
    if defense is None:
        return model, model
    defended = NLMDefended(model).train(model.training)
    return (model if defense == "nlm" else defended), defended
