"""Benchmark: one APGD iteration (each SEA loss, red-ε on) against one bare forward+backward of the model.

A UPerNet on ConvNeXt-atto at 128×128 (batch 4) with 21 and with 151 classes, at the UPerNet's default decoder
width (512 channels, the recipes') and at the demo's 32 channels, measured side by side in one run:
the bare step is the model's forward and its backward to the input from a fixed output gradient (no loss at
all); an APGD iteration is the time of a red-ε APGD run divided by its forward passes. For context
it also times a plain forward + cross-entropy + backward step ("ce-step"), what a naive attack iteration costs.
Labels are the model's clean predictions (5% ignored), so images start at 100% accuracy. Target: every ratio
≤ 1.10. Every ce-step and attack block is bracketed by bare blocks, its ratio is taken against the mean of the
bare block just before and just after it (so slow drift of the machine's speed cancels), and the median over
repeats is reported (wall and process-CPU time); the fastest repeat of each, against the fastest bare block, is
shown too. The attack's own cost (loss, step control) does not depend on the decoder width, so the 32-channel
decoder, about a tenth of the default model's time, is the harder case. On a shared machine other processes
inflate some repeats: the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainables.attacks import apgd  # noqa: E402
from trainables.attacks.sea import SEA_LOSSES  # noqa: E402
from trainables.models import build_model  # noqa: E402

TARGET = 1.10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[21, 151])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--decoder-width", type=int, nargs="+", default=[512, 32],
                        help="UPerNet channels, one model each (default: 512, the UPerNet default and the recipes', "
                             "and 32, the demo's)")
    parser.add_argument("--iterations", type=int, default=20, help="APGD iterations per run (red-ε on)")
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

    def __call__(self, fn) -> tuple[float, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - wall, time.process_time() - cpu


Samples = dict[str, list[tuple[float, float]]]


def bench_model(
    width: int, num_classes: int, args: argparse.Namespace, device: torch.device
) -> tuple[Samples, Samples]:
    """Per repeat, per-iteration (wall, cpu) seconds of the bare step, the CE step and APGD with each loss, and
    for each non-bare step the mean of the bare blocks around it."""
    torch.manual_seed(0)
    model = build_model("upernet", "convnext_atto", num_classes, decoder_width=width).to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    y[torch.rand(y.shape, generator=g).to(device) < 0.05] = 255
    out_grad = torch.randn(logits.shape, generator=g).to(device)
    eps = args.eps / 255.0

    forwards: list[int] = []
    model.register_forward_pre_hook(lambda _m, inputs: forwards.append(inputs[0].shape[0]))

    def bare(iterations: int):
        def run():
            for _ in range(iterations):
                x_in = x.clone().requires_grad_(True)
                torch.autograd.grad(model(x_in), x_in, out_grad)
        return run

    def ce_step(iterations: int):
        def run():
            for _ in range(iterations):
                x_in = x.clone().requires_grad_(True)
                torch.autograd.grad(F.cross_entropy(model(x_in), y, ignore_index=255), x_in)
        return run

    def attack(loss: str, iterations: int):
        return lambda: apgd(model, x, y, eps=eps, n_iter=iterations, loss=loss, red_eps=True, seed=0)

    timer = Timer(device)
    timer(bare(3))
    for loss in args.losses:
        timer(attack(loss, 4))
    timer(ce_step(2))
    samples: Samples = {"bare": [], "ce-step": [], **{loss: [] for loss in args.losses}}
    brackets: Samples = {name: [] for name in samples if name != "bare"}

    def bare_block() -> tuple[float, float]:
        wall, cpu = timer(bare(args.iterations))
        samples["bare"].append((wall / args.iterations, cpu / args.iterations))
        return samples["bare"][-1]

    for repeat in range(args.repeats):
        before = bare_block()
        for name in ("ce-step", *args.losses):
            forwards.clear()
            if name == "ce-step":
                wall, cpu = timer(ce_step(args.iterations))
                count = args.iterations
            else:
                wall, cpu = timer(attack(name, args.iterations))
                count = len(forwards)
                if count != args.iterations or min(forwards) != args.batch:
                    print(f"  note: {name} ran {count} forwards with batch sizes {sorted(set(forwards))} "
                          "(images at 0% accuracy left early); per-iteration time is per forward", flush=True)
            samples[name].append((wall / count, cpu / count))
            after = bare_block()
            brackets[name].append(((before[0] + after[0]) / 2, (before[1] + after[1]) / 2))
            before = after
        print(f"  width {width} K={num_classes} repeat {repeat + 1}/{args.repeats}: "
              f"bare {1e3 * samples['bare'][-1][0]:.1f} ms, "
              + ", ".join(f"{loss} {1e3 * samples[loss][-1][0]:.1f} ms" for loss in args.losses), flush=True)
    return samples, brackets


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    widths = ", ".join(map(str, args.decoder_width))
    print(f"attack speed: UPerNet({widths})/ConvNeXt-atto {args.size}x{args.size}, batch {args.batch}, "
          f"{args.iterations} APGD iterations (red-eps), eps {args.eps:g}/255, {args.threads} threads, {device}, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}", flush=True)
    results = {(w, k): bench_model(w, k, args, device) for w in args.decoder_width for k in args.classes}
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (other processes on the machine inflate some repeats)")
    worst: dict[int, dict[str, float]] = {w: {} for w in args.decoder_width}
    print("\nper step: median time over repeats; ratio: median over repeats of (step / mean of the bare blocks "
          "around it); min: the fastest repeat of each")
    header = (("width", 5), ("classes", 7), ("step", 8), ("wall ms", 8), ("ratio", 6), ("cpu ms", 8), ("ratio", 6),
              ("min wall", 9), ("ratio", 6))
    print(" ".join(f"{title:>{width}}" for title, width in header))
    for (w, k), (samples, brackets) in results.items():
        for name, values in samples.items():
            bare = brackets.get(name, values)
            wall = statistics.median(v[0] for v in values)
            cpu = statistics.median(v[1] for v in values)
            ratio_wall = statistics.median(v[0] / b[0] for v, b in zip(values, bare, strict=True))
            ratio_cpu = statistics.median(v[1] / b[1] for v, b in zip(values, bare, strict=True))
            fastest = min(v[0] for v in values)
            ratio_min = fastest / min(b[0] for b in samples["bare"])
            if name not in ("bare", "ce-step"):
                for key, value in (("wall", ratio_wall), ("cpu", ratio_cpu), ("min wall", ratio_min)):
                    worst[w][key] = max(worst[w].get(key, 0.0), value)
            print(f"{w:>5} {k:>7} {name:>8} {1e3 * wall:8.1f} {ratio_wall:6.3f} {1e3 * cpu:8.1f} {ratio_cpu:6.3f} "
                  f"{1e3 * fastest:9.1f} {ratio_min:6.3f}")
    for w, values in worst.items():
        print(f"\nwidth {w}: largest APGD-iteration / bare-step ratio (target <= {TARGET:.2f}): "
              + ", ".join(f"{name} {value:.3f}" for name, value in values.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
