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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import shards  # noqa: E402
from trainables.models.backbones import BACKBONES, family  # noqa: E402
from trainables.models.stems import STEMS  # noqa: E402
from trainables.pretrain import LAYOUTS, classifier, layout_state, train_classifier  # noqa: E402
from trainables.units import to_unit  # noqa: E402


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


def save(obj, uri: str) -> None:
    """torch.save to a local path, file://, s3:// or gs:// URI (locally through a temporary name)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    shards.write_bytes(uri, buffer.getvalue())


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
    model = classifier(args.backbone, args.stem, args.classes)
    test = colour_discs(256, args.classes, args.image_size, torch.Generator().manual_seed(10**6))
    result = train_classifier(
        model, lambda count: colour_discs(count, args.classes, args.image_size, generator), test, steps=args.steps,
        batch_size=args.batch_size, eps=to_unit(args.eps), attack_steps=args.attack_steps,
        eval_eps=to_unit(args.eval_eps), lr=args.lr, log=lambda line: print(line, flush=True))
    clean, robust = result.clean_accuracy, result.pgd_accuracy
    save(layout_state(model.model, args.layout), args.out)
    summary = {
        "backbone": args.backbone, "stem": args.stem, "layout": args.layout, "steps": args.steps,
        "eps_255": args.eps, "eval_eps_255": args.eval_eps, "attack_steps": args.attack_steps, "classes": args.classes,
        "image_size": args.image_size, "clean_accuracy": round(clean, 4), "pgd10_accuracy": round(robust, 4),
        "chance": round(1 / args.classes, 4), "seconds": round(result.seconds, 1),
    }
    shards.write_bytes(args.out + ".json", (json.dumps(summary, indent=2) + "\n").encode())
    print(f"saved {args.out} ({args.layout} layout); held-out clean accuracy {clean:.3f}, "
          f"PGD-10 accuracy at eps {args.eval_eps:g}/255 {robust:.3f} (chance {1 / args.classes:.3f})", flush=True)
    return summary


if __name__ == "__main__":
    main()
