"""Benchmark: one APGD iteration on a fixed full batch (each SEA loss) against one bare forward+backward.

Model: UPerNet on ConvNeXt-atto at 128x128, batch 4, with 21 (VOC) and 151 (ADE20K) classes, at the UPerNet's
default decoder width (512, the recipes') and at the demo's 32, all in one run. Measured side by side:
- bare: the model's forward and its backward to the input from a fixed output gradient (no loss at all);
- ce-step: forward + cross-entropy + backward, what a naive attack iteration costs (context only);
- each SEA loss: a red-ε APGD run of --iterations with early exit off (`apgd(..., early_exit=False)`), so every
  iteration runs the whole batch; its time (start, checks and all) divided by the iterations. The script checks
  that every forward pass saw the full batch.
Labels are the model's clean predictions (5% ignored). Each ce-step and attack block is bracketed by bare blocks
and its ratio taken against their mean (drift of the machine's speed cancels); the median over repeats counts.
Separately, SEA's end-to-end images/s with early exit on (what a user gets), next to the images/s it would reach
if each of its iterations cost one bare step. Target: every APGD-iteration ratio <= 1.10. The last line holds the
ratios.

    PYTHONPATH=. python experiments/benchmarks/attack_speed.py [--repeats 3] [--iterations 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data.classes import IGNORE_INDEX  # noqa: E402
from trainables.attacks import SEA_LOSSES, apgd, sea  # noqa: E402
from trainables.models import build_model  # noqa: E402

TARGET = 1.10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[21, 151])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--decoder-width", type=int, nargs="+", default=[512, 32],
                        help="UPerNet channels, one model each (default: 512, the recipes', and 32, the demo's)")
    parser.add_argument("--backbone", default="convnext_atto")
    parser.add_argument("--iterations", type=int, default=20, help="APGD iterations per timed run (red-ε on)")
    parser.add_argument("--sea-iterations", type=int, default=20,
                        help="APGD iterations per loss of the end-to-end SEA run (early exit on)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eps", type=float, default=8.0, help="in units of 1/255")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--losses", nargs="+", default=list(SEA_LOSSES))
    return parser.parse_args(argv)


class Timer:
    """Wall and process-CPU seconds of a block (synchronising CUDA around it)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - wall, time.process_time() - cpu


def bare_step(model: torch.nn.Module, x: torch.Tensor, out_grad: torch.Tensor) -> None:
    """One forward and one backward to the input from a fixed output gradient: the floor of any attack step."""
    x_in = x.detach().clone().requires_grad_(True)
    torch.autograd.grad(model(x_in), x_in, out_grad)


def ce_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Forward, pixel-averaged cross-entropy, backward to the input."""
    x_in = x.detach().clone().requires_grad_(True)
    torch.autograd.grad(F.cross_entropy(model(x_in), y, ignore_index=IGNORE_INDEX), x_in)


class ForwardCounter:
    """Batch size of every forward pass of a model (to check that a run kept its full batch)."""

    def __init__(self, model: torch.nn.Module):
        self.sizes: list[int] = []
        self.handle = model.register_forward_pre_hook(lambda _m, inputs: self.sizes.append(int(inputs[0].shape[0])))

    def full(self, batch: int, count: int) -> bool:
        return len(self.sizes) == count and all(size == batch for size in self.sizes)


def problem(width: int, num_classes: int, args: argparse.Namespace, device: torch.device):
    """(model in eval mode, images, labels = clean predictions with 5% ignored, a fixed output gradient)."""
    torch.manual_seed(0)
    model = build_model("upernet", args.backbone, num_classes, decoder_width=width).to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    y[torch.rand(y.shape, generator=g).to(device) < 0.05] = IGNORE_INDEX
    return model, x, y, torch.randn(logits.shape, generator=g).to(device)


Samples = dict[str, list[tuple[float, float]]]


def bench_model(width: int, num_classes: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Per-iteration (wall, cpu) samples of bare, ce-step and each loss, the bare brackets, and SEA end to end."""
    model, x, y, out_grad = problem(width, num_classes, args, device)
    eps = args.eps / 255.0
    counter = ForwardCounter(model)
    n = args.iterations

    def repeat(fn: Callable[[], None], times: int) -> Callable[[], None]:
        return lambda: [fn() for _ in range(times)]

    def attack(loss: str, iterations: int) -> Callable[[], None]:
        return lambda: apgd(model, x, y, eps=eps, n_iter=iterations, loss=loss, red_eps=True, seed=0,
                            early_exit=False)

    timer = Timer(device)
    timer(repeat(lambda: bare_step(model, x, out_grad), 3))  # warm-up of every path
    for loss in args.losses:
        timer(attack(loss, 4))
    timer(repeat(lambda: ce_step(model, x, y), 2))
    samples: Samples = {"bare": [], "ce-step": [], **{loss: [] for loss in args.losses}}
    brackets: Samples = {name: [] for name in samples if name != "bare"}

    def bare_block() -> tuple[float, float]:
        wall, cpu = timer(repeat(lambda: bare_step(model, x, out_grad), n))
        samples["bare"].append((wall / n, cpu / n))
        return samples["bare"][-1]

    for index in range(args.repeats):
        before = bare_block()
        for name in ("ce-step", *args.losses):
            counter.sizes.clear()
            wall, cpu = timer(repeat(lambda: ce_step(model, x, y), n) if name == "ce-step" else attack(name, n))
            if name != "ce-step" and not counter.full(args.batch, n):
                raise RuntimeError(f"{name}: {len(counter.sizes)} forwards with batch sizes "
                                   f"{sorted(set(counter.sizes))}, expected {n} of {args.batch}: the batch shrank")
            samples[name].append((wall / n, cpu / n))
            after = bare_block()
            brackets[name].append(((before[0] + after[0]) / 2, (before[1] + after[1]) / 2))
            before = after
        print(f"  width {width} K={num_classes} repeat {index + 1}/{args.repeats}: "
              f"bare {1e3 * samples['bare'][-1][0]:.1f} ms, "
              + ", ".join(f"{loss} {1e3 * samples[loss][-1][0]:.1f} ms" for loss in args.losses), flush=True)

    counter.sizes.clear()
    wall, _ = timer(lambda: sea(model, x, y, eps=eps, num_classes=num_classes, n_iter=args.sea_iterations,
                                losses=args.losses, seed=0))
    forwards = len(counter.sizes)
    counter.handle.remove()
    bare_s = statistics.median(v[0] for v in samples["bare"])
    # what SEA would cost if each of its iterations were one bare step on the full batch (predictions left out)
    floor_s = bare_s * len(args.losses) * args.sea_iterations
    end_to_end = {"images_per_s": args.batch / wall, "forwards": forwards,
                  "full_forwards": len(args.losses) * (args.sea_iterations + 1) + 1,
                  "floor_images_per_s": args.batch / floor_s}
    return {"samples": samples, "brackets": brackets, "sea": end_to_end}


def summarise(samples: Samples, brackets: Samples) -> dict[str, dict[str, float]]:
    """Per step: median wall and cpu ms, median bracketed ratios, fastest repeat and its ratio to the fastest bare."""
    out = {}
    fastest_bare = min(v[0] for v in samples["bare"])
    for name, values in samples.items():
        bare = brackets.get(name, values)
        out[name] = {
            "wall_ms": 1e3 * statistics.median(v[0] for v in values),
            "ratio_wall": statistics.median(v[0] / b[0] for v, b in zip(values, bare, strict=True)),
            "cpu_ms": 1e3 * statistics.median(v[1] for v in values),
            "ratio_cpu": statistics.median(v[1] / b[1] for v, b in zip(values, bare, strict=True)),
            "min_wall_ms": 1e3 * min(v[0] for v in values),
            "ratio_min": min(v[0] for v in values) / fastest_bare,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    widths = ", ".join(map(str, args.decoder_width))
    print(f"attack speed: UPerNet({widths})/{args.backbone} {args.size}x{args.size}, batch {args.batch}, "
          f"{args.iterations} APGD iterations (red-eps, early exit off), eps {args.eps:g}/255, {args.threads} threads, "
          f"{device}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}", flush=True)
    results = {(w, k): bench_model(w, k, args, device) for w in args.decoder_width for k in args.classes}
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (other processes on the machine inflate some repeats)")
    print("\nper iteration: median over repeats; ratio: median over repeats of (step / mean of the bare blocks "
          "around it); min: the fastest repeat, against the fastest bare block")
    header = (("width", 5), ("classes", 7), ("step", 8), ("wall ms", 8), ("ratio", 6), ("cpu ms", 8), ("ratio", 6),
              ("min wall", 9), ("ratio", 6))
    print(" ".join(f"{title:>{size}}" for title, size in header))
    ratios: dict[tuple[int, int, str], float] = {}
    for (w, k), result in results.items():
        for name, row in summarise(result["samples"], result["brackets"]).items():
            if name not in ("bare", "ce-step"):
                ratios[(w, k, name)] = row["ratio_wall"]
            print(f"{w:>5} {k:>7} {name:>8} {row['wall_ms']:8.1f} {row['ratio_wall']:6.3f} {row['cpu_ms']:8.1f} "
                  f"{row['ratio_cpu']:6.3f} {row['min_wall_ms']:9.1f} {row['ratio_min']:6.3f}")
    print(f"\nSEA end to end, early exit on, {len(args.losses)} losses x {args.sea_iterations} iterations "
          "(what a user gets):")
    for (w, k), result in results.items():
        e2e = result["sea"]
        print(f"  width {w} K={k}: {e2e['images_per_s']:.3f} images/s ({e2e['forwards']} forward passes, "
              f"{e2e['full_forwards']} without early exit); "
              f"{e2e['floor_images_per_s']:.3f} images/s if every iteration cost one bare step")
    worst = max(ratios.values())
    print(f"ratios APGD iteration / bare fwd+bwd (target <= {TARGET:.2f}; worst {worst:.3f} "
          f"{'meets' if worst <= TARGET else 'MISSES'} it): "
          + "; ".join(f"w{w} K{k} {name} {value:.3f}" for (w, k, name), value in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
