"""Adversarially train (PGD, l_inf) a small timm classifier on generated images; save it in a published layout.

It stands in for the robust ImageNet checkpoints of the paper, which cannot be downloaded here, so the demo and
the tests exercise PIR initialisation end to end. The images are procedural: a disc whose colour is the class, at a
random place and size, on a grey grating background with noise. Nothing is downloaded; `--eps 0` gives a clean
(non-robust) counterpart for `model.init: clean`.

    python experiments/make_robust_backbone.py --backbone convnext_atto --stem patch --out robust_atto.pt
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import math
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainables.models.backbones import BACKBONES, family  # noqa: E402
from trainables.models.normalize import ImageNetNormalize  # noqa: E402
from trainables.models.stems import STEMS, set_convnext_stem  # noqa: E402
from trainables.units import to_unit  # noqa: E402

LAYOUTS = ("plain", "module", "normalize")


def palette(classes: int) -> torch.Tensor:
    """`classes` saturated colours with evenly spaced hues, one per class."""
    return torch.tensor([colorsys.hsv_to_rgb(c / classes, 0.8, 0.9) for c in range(classes)])


def colour_discs(count: int, classes: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` images in [0, 1]: a disc of the class colour, random place and size, on a grey grating with noise."""
    labels = torch.randint(classes, (count,), generator=generator)
    coords = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    def uniform(low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(count, generator=generator))[:, None, None]

    cx, cy, radius = uniform(0.25, 0.75), uniform(0.25, 0.75), uniform(0.15, 0.3)
    disc = (((xx - cx) ** 2 + (yy - cy) ** 2).sqrt() < radius).float()[:, None]
    angle, freq = uniform(0, math.pi), uniform(3, 8)
    wave = torch.sin(2 * math.pi * freq * (xx * angle.cos() + yy * angle.sin()))[:, None]
    background = uniform(0.35, 0.65)[:, None] + 0.15 * wave
    foreground = palette(classes)[labels][:, :, None, None] * uniform(0.8, 1.0)[:, None]
    noise = 0.04 * torch.randn(count, 3, size, size, generator=generator)
    return (background * (1 - disc) + foreground * disc + noise).clamp(0, 1), labels


class Classifier(nn.Module):
    """ImageNet normalisation + a timm classifier: the `normalize` / `model` wrapping of the robust checkpoints."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.normalize = ImageNetNormalize()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int) -> torch.Tensor:
    """l_inf PGD on cross-entropy from a uniform random start; the model is in eval mode while it runs."""
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
    """The classifier's state dict (head included) in one of the published layouts."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if layout == "plain":
        return state
    if layout == "module":
        return {f"module.{k}": v for k, v in state.items()}
    norm = ImageNetNormalize()
    wrapped = {"normalize.mean": norm.mean.clone(), "normalize.std": norm.std.clone()}
    wrapped.update({f"model.{k}": v for k, v in state.items()})
    return {"state_dict": wrapped}


def save(obj, uri: str) -> None:
    """torch.save to a local path or any smart_open URI (s3://, gs://, ...)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    if "://" in uri and not uri.startswith("file://"):
        import smart_open

        with smart_open.open(uri, "wb") as handle:
            handle.write(buffer.getvalue())
        return
    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="convnext_atto", choices=BACKBONES)
    parser.add_argument("--stem", default="patch", choices=STEMS, help="cvst: ConvNeXt only")
    parser.add_argument("--out", required=True, help="where to save: a path or an s3:// / gs:// URI")
    parser.add_argument("--layout", default="normalize", choices=LAYOUTS,
                        help="plain state dict, module.-prefixed, or {'state_dict': normalize.* + model.*}")
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps")
    parser.add_argument("--eps", type=float, default=4.0, help="l_inf budget in units of 1/255")
    parser.add_argument("--eval-eps", type=float, default=4.0,
                        help="l_inf budget (1/255) of the held-out PGD-10 check; also for --eps 0 (clean) runs")
    parser.add_argument("--attack-steps", type=int, default=2, help="PGD steps per training batch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=8, help="2 to 12 colours")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.stem == "cvst" and family(args.backbone) != "convnext":
        parser.error(f"--stem cvst: the CvSt stem exists for ConvNeXt backbones only, not {args.backbone}")
    if not 2 <= args.classes <= 12:
        parser.error(f"--classes = {args.classes}: must be 2 to 12 (distinct colours)")
    for name in ("steps", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} = {getattr(args, name)}: must be >= 1")
    if args.eps < 0 or args.eval_eps < 0 or args.attack_steps < 0:
        parser.error("--eps, --eval-eps and --attack-steps must be >= 0")
    if args.image_size < 32 or args.image_size % 32:
        parser.error(f"--image-size = {args.image_size}: must be a multiple of 32, >= 32")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    extra = {"dynamic_img_size": True} if family(args.backbone) == "vit" else {}
    net = timm.create_model(args.backbone, pretrained=False, num_classes=args.classes, **extra)
    if family(args.backbone) == "convnext":
        set_convnext_stem(net, args.stem)
    model = Classifier(net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.1)
    eps = to_unit(args.eps)
    start = time.time()
    every = max(1, args.steps // 10)
    for step in range(1, args.steps + 1):
        images, labels = colour_discs(args.batch_size, args.classes, args.image_size, generator)
        adversarial = pgd(model, images, labels, eps, args.attack_steps) if args.eps > 0 else images
        model.train()
        loss = F.cross_entropy(model(adversarial), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % every == 0 or step == args.steps:
            elapsed = time.time() - start
            print(f"step {step}/{args.steps}  adversarial loss {loss.item():.3f}  {elapsed:.0f}s", flush=True)
    test_images, test_labels = colour_discs(256, args.classes, args.image_size, torch.Generator().manual_seed(10**6))
    clean = accuracy(model, test_images, test_labels)
    robust = accuracy(model, pgd(model, test_images, test_labels, to_unit(args.eval_eps), 10), test_labels)
    save(layout_state(model.model, args.layout), args.out)
    summary = {
        "backbone": args.backbone, "stem": args.stem, "layout": args.layout, "steps": args.steps,
        "eps_255": args.eps, "eval_eps_255": args.eval_eps, "attack_steps": args.attack_steps, "classes": args.classes,
        "image_size": args.image_size, "clean_accuracy": round(clean, 4), "pgd10_accuracy": round(robust, 4),
        "chance": round(1 / args.classes, 4), "seconds": round(time.time() - start, 1),
    }
    save_json = json.dumps(summary, indent=2)
    if "://" in args.out and not args.out.startswith("file://"):
        import smart_open

        with smart_open.open(args.out + ".json", "w") as handle:
            handle.write(save_json)
    else:
        Path(args.out.removeprefix("file://") + ".json").write_text(save_json + "\n")
    print(f"saved {args.out} ({args.layout} layout); held-out clean accuracy {clean:.3f}, "
          f"PGD-10 accuracy at eps {args.eval_eps:g}/255 {robust:.3f} (chance {1 / args.classes:.3f})", flush=True)
    return summary


if __name__ == "__main__":
    main()
