"""Clean or adversarial (ℓ∞ PGD) training of a timm classifier: the ImageNet stand-ins PIR initialises from.

A sampler gives the images (float N×3×H×W in [0, 1]) and labels of each step, so the same loop trains on any
generated classification set; the result is saved in one of the published backbone layouts."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn

from trainables.models.backbones import family
from trainables.models.normalize import ImageNetNormalize
from trainables.models.stems import set_convnext_stem

LAYOUTS = ("plain", "module", "normalize")
Sampler = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


class Classifier(nn.Module):
    """ImageNet normalisation + a timm classifier: the `normalize` / `model` wrapping of the robust checkpoints."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.normalize = ImageNetNormalize()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def classifier(backbone: str, stem: str, classes: int) -> Classifier:
    """A randomly initialised timm classifier with the segmentation model's backbone and stem."""
    extra = {"dynamic_img_size": True} if family(backbone) == "vit" else {}
    net = timm.create_model(backbone, pretrained=False, num_classes=classes, **extra)
    if family(backbone) == "convnext":
        set_convnext_stem(net, stem)
    return Classifier(net)


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int) -> torch.Tensor:
    """ℓ∞ PGD on cross-entropy from a uniform random start, step 2.5·ε/steps; the model is in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    step_size = 2.5 * eps / max(steps, 1)
    x = (images + torch.empty_like(images).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(x), labels), x)
        x = x.detach() + step_size * grad.sign()
        x = torch.min(torch.max(x, images - eps), images + eps).clamp(0, 1)
    model.train(was_training)
    return x.detach()


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model.eval()(images).argmax(1) == labels).float().mean().item()


def layout_state(model: nn.Module, layout: str) -> dict:
    """The timm classifier's state dict (head included) in one of the published layouts."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if layout == "plain":
        return state
    if layout == "module":
        return {f"module.{k}": v for k, v in state.items()}
    if layout != "normalize":
        raise ValueError(f"layout {layout!r}: must be one of {', '.join(LAYOUTS)}")
    norm = ImageNetNormalize()
    wrapped = {"normalize.mean": norm.mean.clone(), "normalize.std": norm.std.clone()}
    wrapped.update({f"model.{k}": v for k, v in state.items()})
    return {"state_dict": wrapped}


@dataclass
class Pretrained:
    """A trained classifier and its held-out scores."""

    model: Classifier
    clean_accuracy: float
    pgd_accuracy: float
    seconds: float


def train_classifier(model: Classifier, sample: Sampler, test: tuple[torch.Tensor, torch.Tensor], *, steps: int,
                     batch_size: int, eps: float, attack_steps: int, eval_eps: float, lr: float,
                     log: Callable[[str], None] = print) -> Pretrained:
    """AdamW + one-cycle schedule; each step trains on PGD examples at `eps` (clean images when eps is 0).
    `eps`/`eval_eps` are in [0, 1] units; the held-out check is clean accuracy and PGD-10 accuracy at eval_eps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    start, every = time.time(), max(1, steps // 10)
    for step in range(1, steps + 1):
        images, labels = sample(batch_size)
        inputs = pgd(model, images, labels, eps, attack_steps) if eps > 0 else images
        model.train()
        loss = F.cross_entropy(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % every == 0 or step == steps:
            log(f"step {step}/{steps}  {'adversarial' if eps > 0 else 'clean'} loss {loss.item():.3f}  "
                f"{time.time() - start:.0f}s")
    images, labels = test
    clean = accuracy(model, images, labels)
    robust = accuracy(model, pgd(model, images, labels, eval_eps, 10), labels)
    return Pretrained(model, clean, robust, time.time() - start)
